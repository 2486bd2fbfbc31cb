"""Tests for lingua/args.py: defaults < YAML < CLI dotlist, strict keys and types,
dump/load round trip, Meta Lingua configs loading unchanged into TrainArgs, and the
train entry point stopping on a bad key before it creates anything."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import pytest
import yaml

from apps.main.train import TrainArgs
from lingua.args import ConfigError, choice, dump_config, from_dict, load_config, to_dict

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- small local schema


@dataclass
class Inner:
    width: int = 8
    rate: float = 0.5
    tag: Optional[str] = None
    mode: str = choice("fast", ("fast", "slow", "exact"))


@dataclass
class Outer:
    name: str = "default"
    steps: int = 10
    flag: bool = False
    limit: Optional[int] = None
    weights: dict[str, float] = field(default_factory=dict)
    layers: list[int] = field(default_factory=list)
    inner: Inner = field(default_factory=Inner)
    other: Inner = field(default_factory=Inner)


def write_yaml(tmp_path: Path, text: str, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def config_error(cls: type, argv: list[str]) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(cls, argv)
    return str(info.value)


# ---------------------------------------------------------------- precedence


def test_defaults_only() -> None:
    cfg = load_config(Outer, [])
    assert cfg == Outer()
    # Sections are fresh instances, not shared between objects.
    assert cfg.inner is not cfg.other and cfg.inner is not load_config(Outer, []).inner


def test_precedence_defaults_yaml_cli(tmp_path: Path) -> None:
    path = write_yaml(
        tmp_path,
        """
        name: from_yaml
        steps: 20
        inner:
          width: 16
          rate: 0.25
        """,
    )
    cfg = load_config(Outer, [f"config={path}", "steps=30", "inner.rate=0.125", "other.width=3"])
    assert cfg.name == "from_yaml"  # YAML over default
    assert cfg.steps == 30  # CLI over YAML
    assert cfg.inner.width == 16  # YAML, untouched by CLI on a sibling key
    assert cfg.inner.rate == 0.125  # CLI over YAML in a nested section
    assert cfg.inner.mode == "fast"  # default kept inside a section YAML mentions
    assert cfg.other.width == 3 and cfg.other.rate == 0.5  # CLI over default in a section YAML omits
    assert cfg.flag is False and cfg.limit is None


def test_cli_order_independent_of_config_position(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "steps: 20\n")
    a = load_config(Outer, ["steps=5", f"config={path}"])
    b = load_config(Outer, [f"config={path}", "steps=5"])
    assert a.steps == b.steps == 5


def test_trainargs_precedence(tmp_path: Path) -> None:
    path = write_yaml(
        tmp_path,
        """
        name: yaml_run
        steps: 77
        model:
          dim: 128
          n_layers: 3
        optim:
          lr: 1.0e-3
        """,
    )
    cfg = load_config(TrainArgs, [f"config={path}", "model.n_layers=5", "optim.scheduler=wsd", "data.batch_size=3"])
    defaults = TrainArgs()
    assert isinstance(cfg, TrainArgs)
    assert cfg.name == "yaml_run" and cfg.steps == 77
    assert cfg.model.dim == 128 and cfg.model.n_layers == 5
    assert cfg.optim.lr == pytest.approx(1e-3) and cfg.optim.scheduler == "wsd"
    assert cfg.optim.warmup == defaults.optim.warmup
    assert cfg.data.batch_size == 3 and cfg.data.seq_len == defaults.data.seq_len
    assert cfg.model.norm_eps == defaults.model.norm_eps


def test_yaml_exponent_without_dot_is_a_float(tmp_path: Path) -> None:
    # PyYAML reads `3e-4` as a string; Meta Lingua configs write lr that way.
    path = write_yaml(tmp_path, "optim:\n  lr: 3e-4\n")
    cfg = load_config(TrainArgs, [f"config={path}"])
    assert isinstance(cfg.optim.lr, float) and cfg.optim.lr == pytest.approx(3e-4)
    assert load_config(TrainArgs, ["optim.lr=1e-2"]).optim.lr == pytest.approx(1e-2)


def test_only_one_config_file(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "steps: 1\n")
    with pytest.raises(ConfigError):
        load_config(Outer, [f"config={path}", f"config={path}"])


def test_missing_config_file_named(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    msg = config_error(Outer, [f"config={missing}"])
    assert str(missing) in msg


def test_argument_without_equals_rejected() -> None:
    msg = config_error(Outer, ["steps"])
    assert "steps" in msg


# ---------------------------------------------------------------- strict keys


def test_unknown_top_level_key_cli() -> None:
    msg = config_error(Outer, ["stepz=3"])
    assert "'stepz'" in msg and "'steps'" in msg


def test_unknown_top_level_section_names_full_key() -> None:
    msg = config_error(TrainArgs, ["modell.dim=64"])
    assert "modell.dim" in msg
    assert "did you mean 'model'" in msg


def test_unknown_nested_key_names_full_key_and_suggests_full_key() -> None:
    msg = config_error(TrainArgs, ["model.dimm=64"])
    assert "model.dimm" in msg
    assert "'model.dim'" in msg


def test_unknown_deeply_nested_key() -> None:
    msg = config_error(TrainArgs, ["data.tokenizer.nmae=bytes"])
    assert "data.tokenizer.nmae" in msg and "'data.tokenizer.name'" in msg
    msg = config_error(TrainArgs, ["checkpoint.dump.evry=3"])
    assert "checkpoint.dump.evry" in msg and "'checkpoint.dump.every'" in msg


def test_unknown_key_in_yaml_names_key_and_file(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "model:\n  dim: 64\n  n_layer: 2\n")
    msg = config_error(TrainArgs, [f"config={path}"])
    assert "model.n_layer" in msg and "'model.n_layers'" in msg
    assert str(path) in msg
    path = write_yaml(tmp_path, "optimm:\n  lr: 0.1\n", name="top.yaml")
    msg = config_error(TrainArgs, [f"config={path}"])
    assert "optimm.lr" in msg and "'optim'" in msg


def test_unknown_key_without_close_match_lists_valid_keys() -> None:
    msg = config_error(Outer, ["inner.qqqqqqqq=1"])
    assert "inner.qqqqqqqq" in msg
    for valid in ("width", "rate", "tag", "mode"):
        assert valid in msg


# ---------------------------------------------------------------- types


@pytest.mark.parametrize(
    "arg, key",
    [
        ("model.dim=wide", "model.dim"),
        ("model.dim=3.5", "model.dim"),  # a float for an int
        ("model.dim={a: 1}", "model.dim"),  # a dict for a scalar
        ("model.dim=[1,2]", "model.dim"),
        ("optim.lr=fast", "optim.lr"),
        ("optim.lr={x: 1}", "optim.lr"),
        ("data.load_async=maybe", "data.load_async"),
        ("data.add_bos=2", "data.add_bos"),
        ("steps=true", "steps"),
        ("name={a: 1}", "name"),
        ("name=null", "name"),  # not Optional: must not become the string "None"
        ("model.n_heads=four", "model.n_heads"),  # Optional[int] still checks the int
        ("data.sources=3", "data.sources"),
        ("data.sources.web=heavy", "data.sources.web"),
        ("model=3", "model"),  # a scalar for a section
    ],
)
def test_wrong_type_names_key(arg: str, key: str) -> None:
    msg = config_error(TrainArgs, [arg])
    assert f"'{key}'" in msg


def test_wrong_type_in_yaml_names_key(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "inner:\n  width: {deep: 1}\n")
    msg = config_error(Outer, [f"config={path}"])
    assert "'inner.width'" in msg and str(path) in msg


def test_scalar_coercions() -> None:
    cfg = load_config(Outer, ["steps=7", "inner.rate=2", "flag=true", "name=123", "layers=[1,2,3]"])
    assert cfg.steps == 7 and type(cfg.steps) is int
    assert cfg.inner.rate == 2.0 and type(cfg.inner.rate) is float
    assert cfg.flag is True
    assert cfg.name == "123"
    assert cfg.layers == [1, 2, 3]
    assert load_config(Outer, ["layers=[4, 5]"]).layers == [4, 5]
    assert load_config(Outer, ["flag=false"]).flag is False


def test_choice_rejects_bad_value_naming_allowed() -> None:
    msg = config_error(Outer, ["inner.mode=turbo"])
    assert "'inner.mode'" in msg and "turbo" in msg
    for allowed in ("fast", "slow", "exact"):
        assert allowed in msg
    assert load_config(Outer, ["inner.mode=exact"]).inner.mode == "exact"
    msg = config_error(TrainArgs, ["optim.scheduler=cosin"])
    assert "'optim.scheduler'" in msg
    for allowed in ("constant", "linear", "inv_sqrt", "cosine", "wsd"):
        assert allowed in msg
    msg = config_error(TrainArgs, ["model.init_std_factor=depth"])
    assert "'model.init_std_factor'" in msg and "global_depth" in msg


def test_choice_checked_in_yaml(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "distributed:\n  fsdp_type: half_shard\n")
    msg = config_error(TrainArgs, [f"config={path}"])
    assert "'distributed.fsdp_type'" in msg and "full_shard" in msg and "no_shard" in msg


def test_optional_fields_accept_null(tmp_path: Path) -> None:
    outer_path = write_yaml(tmp_path, "limit: null\ninner:\n  tag: ~\n", name="outer.yaml")
    cfg = load_config(Outer, [f"config={outer_path}", "other.tag=null"])
    assert cfg.limit is None and cfg.inner.tag is None and cfg.other.tag is None
    cfg = load_config(Outer, ["limit=5", "inner.tag=abc"])
    assert cfg.limit == 5 and cfg.inner.tag == "abc"
    cfg = load_config(Outer, ["limit=null"])
    assert cfg.limit is None
    train_path = write_yaml(tmp_path, "model:\n  n_kv_heads: null\n  head_dim: 32\n", name="t.yaml")
    cfg = load_config(TrainArgs, [f"config={train_path}", "probe_freq=null", "checkpoint.init_ckpt_path=null"])
    assert cfg.model.n_kv_heads is None and cfg.model.head_dim == 32
    assert cfg.probe_freq is None and cfg.checkpoint.init_ckpt_path is None
    # null overrides a YAML value
    cfg = load_config(TrainArgs, [f"config={train_path}", "model.head_dim=null"])
    assert cfg.model.head_dim is None


def test_dict_sources_from_yaml_and_cli(tmp_path: Path) -> None:
    path = write_yaml(
        tmp_path,
        """
        data:
          sources:
            web: 3
            code: 0.5
        """,
    )
    cfg = load_config(TrainArgs, [f"config={path}"])
    assert cfg.data.sources == {"web": 3.0, "code": 0.5}
    assert all(type(v) is float for v in cfg.data.sources.values())
    cfg = load_config(TrainArgs, [f"config={path}", "data.sources.code=2", "data.sources.books=1.5"])
    assert cfg.data.sources == {"web": 3.0, "code": 2.0, "books": 1.5}
    cfg = load_config(TrainArgs, ["data.sources={a: 1, b: 2.5}"])
    assert cfg.data.sources == {"a": 1.0, "b": 2.5}
    cfg = load_config(Outer, ["weights.x=0.25"])
    assert cfg.weights == {"x": 0.25}


# ---------------------------------------------------------------- dump / load


def test_dump_config_round_trip(tmp_path: Path) -> None:
    cfg = load_config(
        TrainArgs,
        [
            "name=round_trip",
            "dump_dir=/some/where",
            "steps=123",
            "optim.lr=3e-4",
            "optim.scheduler=inv_sqrt",
            "data.sources={web: 2, code: 0.5}",
            "data.tokenizer.name=tiktoken",
            "data.tokenizer.path=/tok/x.model",
            "model.n_kv_heads=2",
            "model.ffn_dim_multiplier=1.3",
            "distributed.float8_recipe=rowwise",
            "checkpoint.dump.keep=3",
            "eval={validation: {max_steps: 5}}",
            "logging.wandb={project: p}",
        ],
    )
    path = tmp_path / "sub" / "config.yaml"
    dump_config(cfg, path)
    assert path.is_file()
    assert not list(path.parent.glob("*.tmp"))
    back = load_config(TrainArgs, [f"config={path}"])
    assert back == cfg
    assert to_dict(back) == to_dict(cfg)
    # The file is plain YAML a person can read: top-level keys in schema order.
    raw = yaml.safe_load(path.read_text())
    assert list(raw) == [f.name for f in dataclasses.fields(TrainArgs)]


def test_dump_round_trip_of_defaults_and_local_schema(tmp_path: Path) -> None:
    for obj in (TrainArgs(), Outer(name="x", limit=3, weights={"a": 1.5}, layers=[1, 2], inner=Inner(tag="t"))):
        path = tmp_path / f"{type(obj).__name__}.yaml"
        dump_config(obj, path)
        assert load_config(type(obj), [f"config={path}"]) == obj


def test_from_dict_is_strict() -> None:
    assert from_dict(Outer, {"inner": {"width": 3}}).inner.width == 3
    with pytest.raises(ConfigError, match="inner.widht"):
        from_dict(Outer, {"inner": {"widht": 3}})


# ---------------------------------------------------------------- Meta Lingua config

META_LINGUA_YAML = """
name: "llama_1B"
dump_dir: /checkpoint/someone/dumps/llama_1B
seed: 777
grad_acc_steps: 2
gc_collect_freq: 500
probe_freq: null
steps: 60000

data:
  root_dir: data/shuffled
  sources:
    dclm_baseline_1.0: 100.0
    fineweb_edu: 0.5
  batch_size: 4
  seq_len: 4096
  n_views: 2
  seed: 42
  add_bos: true
  add_eos: true
  load_async: true
  prefetch_size: 1024
  tokenizer:
    name: tiktoken
    path: tokenizers/cl_toplang_128k.tiktoken

optim:
  lr: 3e-3
  weight_decay: 0.033
  epsilon: 1e-8
  beta1: 0.9
  beta2: 0.95
  clip: 1.0
  scheduler: cosine
  warmup: 5000
  lr_min_ratio: 0.000001
  cycle_length: 1.0
  cosine_theta: 1.0
  annealing_step: 1000
  decay_fraction: 0.1
  exp_factor: 0.5

model:
  dim: 2048
  n_layers: 25
  head_dim: null
  n_heads: 16
  n_kv_heads: null
  ffn_dim_multiplier: null
  multiple_of: 256
  norm_eps: 1e-5
  rope_theta: 10000.0
  init_base_std: null
  init_std_factor: global_depth
  max_seqlen: 4096
  seed: 42
  vocab_size: -1
  weight_tying: false
  sliding_window: null

distributed:
  dp_shard: 1
  dp_replicate: 8
  tp_size: 1
  selective_activation_checkpointing: false
  compile: true
  fsdp_type: full_shard
  model_dtype: bf16
  float8_recipe: null
  float8_filter: layers\\.[0-9]+\\.
  matmul_allow_tf32: false
  allow_bf16_reduced_precision_reduction: true
  detect_anomaly: false
  compile_cache_size_limit: 8
  spawn_method: forkserver

env:
  MKL_SERVICE_FORCE_INTEL: GNU
  OMP_NUM_THREADS: "1"
  MKL_NUM_THREADS: "1"
  ENABLE_INTRA_NODE_COMM: "1"
  TORCH_NCCL_AVOID_RECORD_STREAMS: "1"
  NCCL_IB_TIMEOUT: "22"
  NCCL_DEBUG: INFO
  TORCH_NCCL_ASYNC_ERROR_HANDLING: "1"

checkpoint:
  dump:
    every: 2500
    keep: 3
  eval:
    every: 5000
    keep: -1
  path: null
  init_ckpt_path: null
  continue_training_from_init: false

profiling:
  run: true
  trace_folder: profiling
  mem_warmup: 0
  mem_steps: 4
  profile_warmup: 100
  profile_steps: 4

logging:
  freq: 1
  acc_freq: null
  wandb: null

async_eval_gpus: 8
eval:
  harness:
    tasks:
      - hellaswag
      - task: boolq
        dataset_kwargs:
          trust_remote_code: true
  validation:
    max_steps: 1000
  generator:
    max_tokens: 16384
    dtype: bf16
"""


def test_meta_lingua_config_loads_unchanged(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, META_LINGUA_YAML, name="llama_1B.yaml")
    cfg = load_config(TrainArgs, [f"config={path}"])
    assert cfg.name == "llama_1B" and cfg.seed == 777 and cfg.grad_acc_steps == 2
    assert cfg.gc_collect_freq == 500 and cfg.probe_freq is None and cfg.steps == 60000
    assert cfg.data.root_dir == "data/shuffled"
    assert cfg.data.sources == {"dclm_baseline_1.0": 100.0, "fineweb_edu": 0.5}
    assert cfg.data.tokenizer.name == "tiktoken"
    assert cfg.data.tokenizer.path == "tokenizers/cl_toplang_128k.tiktoken"
    assert (cfg.data.batch_size, cfg.data.seq_len, cfg.data.prefetch_size) == (4, 4096, 1024)
    assert cfg.optim.lr == pytest.approx(3e-3) and cfg.optim.epsilon == pytest.approx(1e-8)
    assert cfg.optim.lr_min_ratio == pytest.approx(1e-6) and cfg.optim.scheduler == "cosine"
    assert cfg.model.dim == 2048 and cfg.model.n_heads == 16 and cfg.model.head_dim is None
    assert cfg.model.norm_eps == pytest.approx(1e-5) and cfg.model.init_std_factor == "global_depth"
    assert cfg.model.sliding_window is None and cfg.model.vocab_size == -1
    assert cfg.distributed.fsdp_type == "full_shard" and cfg.distributed.compile is True
    assert cfg.distributed.float8_filter == r"layers\.[0-9]+\."
    assert cfg.distributed.dp_replicate == 8
    assert cfg.env.OMP_NUM_THREADS == "1" and cfg.env.NCCL_DEBUG == "INFO"
    assert cfg.checkpoint.dump.every == 2500 and cfg.checkpoint.dump.keep == 3
    assert cfg.checkpoint.eval.every == 5000 and cfg.checkpoint.eval.keep == -1
    assert cfg.profiling.run is True and cfg.profiling.mem_steps == 4
    assert cfg.logging.freq == 1 and cfg.logging.wandb is None
    assert cfg.async_eval_gpus == 8
    assert cfg.eval["validation"] == {"max_steps": 1000}
    assert cfg.eval["harness"]["tasks"][1]["task"] == "boolq"

    # Every key of the file landed in the object, with the value the file gave.
    raw = yaml.safe_load(path.read_text())
    loaded = to_dict(cfg)

    def check(node: Any, got: Any, key: str) -> None:
        if isinstance(node, dict) and key != "eval" and not key.endswith("sources"):
            for k, v in node.items():
                assert k in got, f"{key}.{k} lost"
                check(v, got[k], f"{key}.{k}".lstrip("."))
        elif isinstance(node, str) and isinstance(got, float):
            assert got == pytest.approx(float(node)), key
        else:
            assert got == node, key

    check(raw, loaded, "")

    # And the dump of it loads back to the same object.
    dump_config(cfg, tmp_path / "dumped.yaml")
    assert load_config(TrainArgs, [f"config={tmp_path / 'dumped.yaml'}"]) == cfg


def test_repo_debug_config_loads() -> None:
    cfg = load_config(TrainArgs, [f"config={REPO / 'apps/main/configs/debug.yaml'}"])
    assert cfg.name == "debug" and cfg.data.tokenizer.name == "bytes"


# ---------------------------------------------------------------- the entry point


def test_train_cli_bad_key_exits_before_any_work(tmp_path: Path) -> None:
    dump_dir = tmp_path / "dump"
    dump_dir.mkdir()
    keep = dump_dir / "existing.txt"
    keep.write_text("do not touch")
    before = keep.stat().st_mtime_ns
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "apps.main.train",
            "config=apps/main/configs/debug.yaml",
            f"dump_dir={dump_dir}",
            "modell.dim=64",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "modell" in proc.stderr
    assert "Traceback" not in proc.stderr  # one clear line, not a stack trace
    assert sorted(p.name for p in dump_dir.iterdir()) == ["existing.txt"]
    assert keep.read_text() == "do not touch" and keep.stat().st_mtime_ns == before


# ---------------------------------------------------------------- OmegaConf interpolation


def test_interpolation_in_yaml_and_cli_resolves_against_every_layer(tmp_path: Path) -> None:
    local = write_yaml(tmp_path, "name: a${steps}\ninner:\n  width: ${steps}\n  tag: w${inner.width}\n", "o.yaml")
    cfg = load_config(Outer, [f"config={local}", "steps=12"])
    assert cfg.name == "a12" and cfg.inner.width == 12 and type(cfg.inner.width) is int and cfg.inner.tag == "w12"
    path = write_yaml(tmp_path, "name: run7\ndump_dir: /scratch/${name}/s${steps}\n")
    train = load_config(TrainArgs, [f"config={path}", "steps=5"])
    assert train.dump_dir == "/scratch/run7/s5"
    # The CLI refers to the file and to defaults (seed is not in the file), and a default-only name works.
    train = load_config(TrainArgs, [f"config={path}", "dump_dir=./d/${name}-${seed}"])
    assert train.dump_dir == "./d/run7-42"
    assert load_config(TrainArgs, ["dump_dir=./d/${name}"]).dump_dir == "./d/lingua"
    # Interpolated values are still type-checked.
    with pytest.raises(ConfigError, match="'steps'"):
        load_config(TrainArgs, ["steps=${name}"])


def test_interpolation_to_a_missing_key_names_it_and_the_key_holding_it(tmp_path: Path) -> None:
    msg = config_error(TrainArgs, ["dump_dir=${nonexistent_key}/x"])
    assert "nonexistent_key" in msg and "'dump_dir'" in msg
    path = write_yaml(tmp_path, "model:\n  dim: ${model.width}\n")
    msg = config_error(TrainArgs, [f"config={path}"])
    assert "model.width" in msg and "'model.dim'" in msg and str(path) in msg


def test_dump_config_writes_interpolations_resolved(tmp_path: Path) -> None:
    cfg = load_config(TrainArgs, ["name=abc", "dump_dir=${name}/out", "data.root_dir=${dump_dir}/data"])
    out = tmp_path / "config.yaml"
    dump_config(cfg, out)
    text = out.read_text()
    assert "${" not in text
    assert yaml.safe_load(text)["data"]["root_dir"] == "abc/out/data"


def test_params_json_with_an_unknown_key_is_refused_naming_it(tmp_path: Path) -> None:
    from apps.main.transformer import LMTransformerArgs
    from lingua.args import load_params

    params = to_dict(TrainArgs())
    path = tmp_path / "params.json"
    path.write_text(__import__("json").dumps(params))
    assert load_params(path, LMTransformerArgs, "model") == LMTransformerArgs()
    # A key this code lacks (as a checkpoint of a newer memory model has for an older build).
    params["model"]["memory_tiles"] = {"n_tiles": 16}
    path.write_text(__import__("json").dumps(params))
    with pytest.raises(ConfigError) as info:
        load_params(path, LMTransformerArgs, "model")
    assert "model.memory_tiles" in str(info.value) and str(path) in str(info.value)

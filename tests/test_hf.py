"""Hugging Face interop: export to transformers' LlamaForCausalLM (equal logits), import back
(bit-identical), save_pretrained / from_pretrained of memory models, consolidated checkpoints,
and the refusals (memory parts HF cannot hold, an HF model we cannot follow, output dirs that
hold something)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from apps.main.eval import load_model_from_checkpoint  # noqa: E402
from apps.main.export import ExportArgs, export  # noqa: E402
from apps.main.import_hf import ImportArgs, import_hf  # noqa: E402
from apps.main.transformer import LMTransformer, LMTransformerArgs, build_model  # noqa: E402
from lingua.args import ConfigError  # noqa: E402
from lingua.checkpoint import consolidate_checkpoint, save_model_checkpoint  # noqa: E402
from lingua.hf import metalingua_to_rotate_half  # noqa: E402
from lingua.mhc import MHCArgs  # noqa: E402
from lingua.product_key.memory import ProductKeyArgs  # noqa: E402

VOCAB = 258  # the bytes tokenizer


def tiny_args(**overrides) -> LMTransformerArgs:
    base = dict(dim=64, n_layers=2, n_heads=4, vocab_size=VOCAB, max_seqlen=32, rope_theta=5000.0, norm_eps=1e-6,
                seed=1)
    return LMTransformerArgs(**{**base, **overrides})


def checkpoint(tmp_path: Path, args: LMTransformerArgs, tokenizer: dict | None = None) -> tuple[LMTransformer, Path]:
    model = build_model(args).eval()
    params = {"model": asdict(args), "data": {"tokenizer": tokenizer or {"name": "bytes"}}}
    return model, save_model_checkpoint(model, tmp_path / "run/checkpoints/0000000010", params)


def tokens(batch: int = 2, length: int = 32) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("n_kv_heads", [None, 2], ids=["mha", "gqa"])
def test_exported_model_gives_our_logits_in_transformers(tmp_path, tied, n_kv_heads):
    model, ckpt = checkpoint(tmp_path, tiny_args(weight_tying=tied, n_kv_heads=n_kv_heads))
    out = export(ExportArgs(ckpt_dir=str(ckpt), out=str(tmp_path / "hf")))
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is tied and config["num_key_value_heads"] == (n_kv_heads or 4)
    hf = transformers.LlamaForCausalLM.from_pretrained(out, torch_dtype=torch.float32).eval()
    x = tokens()
    with torch.no_grad():
        ours, theirs = model(x), hf(x).logits
    assert (ours - theirs).abs().max().item() <= 1e-4
    # Negative control: Meta Lingua's adjacent-pair -> rotate-half permutation, which our
    # rotate-half RoPE must not get, changes the logits: the test sees the rotary layout.
    with torch.no_grad():
        for layer in hf.model.layers:
            for proj, heads in ((layer.self_attn.q_proj, 4), (layer.self_attn.k_proj, n_kv_heads or 4)):
                proj.weight.copy_(metalingua_to_rotate_half(proj.weight, heads))
        permuted = hf(x).logits
    assert (ours - permuted).abs().max().item() > 1e-2


def test_import_of_an_export_is_bit_identical_and_starts_a_run(tmp_path):
    model, ckpt = checkpoint(tmp_path, tiny_args(n_kv_heads=2, weight_tying=True))
    hf_dir = export(ExportArgs(ckpt_dir=str(tmp_path / "run"), out=str(tmp_path / "hf")))
    back = import_hf(ImportArgs(hf_dir=str(hf_dir), dump_dir=str(tmp_path / "back")))
    assert back == tmp_path / "back/checkpoints/0000000000"
    again, tokenizer, _ = load_model_from_checkpoint(back, torch.device("cpu"))
    assert type(tokenizer).__name__ == "ByteTokenizer"  # config.json's lingua_tokenizer
    ours, theirs = model.state_dict(), again.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert again.output.weight is again.tok_embeddings.weight
    with pytest.raises(ConfigError, match="exists: not overwriting"):  # a second import leaves it be
        import_hf(ImportArgs(hf_dir=str(hf_dir), dump_dir=str(tmp_path / "back")))


@pytest.mark.parametrize("change, key", [
    ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope scaling"),
    ({"attention_bias": True}, "attention_bias"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"model_type": "mistral"}, "model_type"),
])
def test_import_refuses_what_our_model_cannot_follow(tmp_path, change, key):
    _, ckpt = checkpoint(tmp_path, tiny_args())
    hf_dir = export(ExportArgs(ckpt_dir=str(ckpt), out=str(tmp_path / "hf")))
    config = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(ConfigError, match=key):
        import_hf(ImportArgs(hf_dir=str(hf_dir), dump_dir=str(tmp_path / "back")))
    assert not (tmp_path / "back").exists()


MEMORY_MODELS = {
    "product_keys": (dict(productkey_args=ProductKeyArgs(is_enabled=True, layers="1", mem_n_keys=8, mem_heads=2,
                                                         mem_knn=4, mem_k_dim=16)),
                     "model.productkey_args.is_enabled"),
    "mhc": (dict(mhc=MHCArgs(enabled=True, n_streams=2)), "model.mhc.enabled"),
    "slots": (dict(segment_length=8, use_internal_memory=True, memory_slots=4, num_mem_heads=2, bos_id=256),
              "model.use_internal_memory"),
    "bank": (dict(segment_length=8, use_external_memory=True, chunk_size=4, external_memory_size=16, retrieval_k=8,
                  bos_id=256), "model.use_external_memory"),
}


@pytest.mark.parametrize("kind", list(MEMORY_MODELS))
def test_memory_models_are_refused_by_hf_and_round_trip_with_save_pretrained(tmp_path, kind):
    overrides, key = MEMORY_MODELS[kind]
    model, ckpt = checkpoint(tmp_path, tiny_args(weight_tying=kind == "mhc", **overrides))
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        export(ExportArgs(ckpt_dir=str(ckpt), out=str(tmp_path / "hf")))
    assert not (tmp_path / "hf").exists()
    out = export(ExportArgs(ckpt_dir=str(ckpt), out=str(tmp_path / "pretrained"), format="pretrained"))
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "model.safetensors"]
    loaded = LMTransformer.from_pretrained(out)
    x = tokens()
    x[:, 0] = 256  # documents start at BOS (segment models find them by it)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert loaded.args == model.args


def test_save_pretrained_keeps_tying_and_precision_and_refuses_a_full_dir(tmp_path):
    model = build_model(tiny_args(weight_tying=True)).eval()
    model.save_pretrained(tmp_path / "half", dtype=torch.bfloat16)
    loaded = LMTransformer.from_pretrained(tmp_path / "half")
    assert loaded.output.weight is loaded.tok_embeddings.weight
    from safetensors import safe_open

    with safe_open(tmp_path / "half/model.safetensors", "pt") as f:
        assert f.get_tensor("tok_embeddings.weight").dtype == torch.bfloat16
        assert "output.weight" not in f.keys()  # stored once
    # loaded into the model's fp32 parameters, with the bf16 values
    assert torch.equal(loaded.tok_embeddings.weight, model.tok_embeddings.weight.to(torch.bfloat16).float())
    before = (tmp_path / "half/model.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match="not overwriting"):
        model.save_pretrained(tmp_path / "half")
    assert (tmp_path / "half/model.safetensors").read_bytes() == before
    (tmp_path / "cfg.yaml").mkdir()
    (tmp_path / "cfg.yaml/config.yaml").write_text("dim: 64\nmodel_dimm: 3\n")
    (tmp_path / "cfg.yaml/model.safetensors").write_bytes(before)
    with pytest.raises(ConfigError, match="model_dimm"):  # strict config
        LMTransformer.from_pretrained(tmp_path / "cfg.yaml")


def test_export_refuses_an_out_dir_that_holds_something(tmp_path):
    _, ckpt = checkpoint(tmp_path, tiny_args())
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf/notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not an empty directory"):
        export(ExportArgs(ckpt_dir=str(ckpt), out=str(tmp_path / "hf")))
    assert [p.name for p in (tmp_path / "hf").iterdir()] == ["notes.txt"]


def test_consolidated_checkpoint_loads_like_the_dcp_one_and_exports(tmp_path):
    model, ckpt = checkpoint(tmp_path, tiny_args())
    consolidated = consolidate_checkpoint(ckpt, precision="fp32").parent
    from_file, _, _ = load_model_from_checkpoint(consolidated, torch.device("cpu"))
    from_dcp, _, _ = load_model_from_checkpoint(ckpt, torch.device("cpu"))
    x = tokens()
    with torch.no_grad():
        assert torch.equal(from_file(x), from_dcp(x)) and torch.equal(from_dcp(x), model(x))
    out = export(ExportArgs(ckpt_dir=str(consolidated), out=str(tmp_path / "hf")))
    assert (out / "model.safetensors").exists()


def test_sentencepiece_tokenizer_is_exported_for_autotokenizer(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"def function_{i}(x):\n    return x * {i} + {i % 7}" for i in range(300)))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "sp"), vocab_size=120,
                                   model_type="bpe", unk_id=0, bos_id=1, eos_id=2, pad_id=3, minloglevel=2)
    from lingua.tokenizer import build_tokenizer

    ours = build_tokenizer("sp", str(tmp_path / "sp.model"))
    _, ckpt = checkpoint(tmp_path, tiny_args(vocab_size=ours.n_words),
                         tokenizer={"name": "sp", "path": str(tmp_path / "sp.model")})
    out = export(ExportArgs(ckpt_dir=str(ckpt), out=str(tmp_path / "hf")))
    theirs = transformers.AutoTokenizer.from_pretrained(out)
    # (runs of whitespace aside: this model's normaliser collapses them, HF's conversion does not)
    for text in ("def function_12(x): return x * 3", " x*3 + 7"):
        assert theirs(text)["input_ids"] == ours.encode(text, add_bos=True, add_eos=False)

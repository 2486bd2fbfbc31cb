"""Evaluation of a model: validation (loss per token and bits per byte on each source's
*.val.jsonl), input/output pairs (`pairs.path`), and lm-eval tasks (`harness.tasks`).

Every document is scored on its own (split into windows of seq_len when longer), so the
numbers do not depend on packing. Input/output and chat documents are scored on their trained
part only (the answers), and bits per byte count the bytes of that part. Runs in-process from training (`run_validation`) or from
the command line on a checkpoint:

    python -m apps.main.eval ckpt_dir=<dump_dir>/checkpoints/0000001000 dump_dir=<dump_dir>
    python -m apps.main.eval ckpt_dir=<dump_dir> 'harness.tasks=[hellaswag]' validation=null

Validation rows go to metrics.validation.jsonl; pairs and harness rows to metrics.eval.jsonl (the
harness's whole output also to evals/<step>/results.json), all in the dump dir.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from apps.main.transformer import IGNORE_INDEX, LMTransformer, LMTransformerArgs
from lingua.args import ConfigError, cli_main, load_params
from apps.main.pairs import PairsArgs, evaluate_pairs
from lingua.checkpoint import CONSOLIDATED_NAME, list_checkpoints, load_model_weights
from lingua.storage import StoragePath, resolve
from lingua.data import VAL_GLOB, DataArgs, DataError, encode_document, labels_from, read_documents
from lingua.distributed import (
    WorldInfo,
    collective_device,
    default_device,
    init_distributed,
    set_cpu_threads,
    shutdown_distributed,
    world_info,
)
from lingua.logger import init_logger
from lingua.metrics import MetricLogger
from lingua.tokenizer import Tokenizer, build_tokenizer

logger = logging.getLogger(__name__)


@dataclass
class ValidationArgs:
    max_steps: Optional[int] = None  # batches per source; None reads the whole val file
    use_val_from_train_src: bool = True
    root_dir: str = ""
    sources: list[str] = field(default_factory=list)
    batch_size: int = 8


@dataclass
class LMHarnessArgs:
    """lm-eval's simple_evaluate arguments, as Meta Lingua's `harness` section names them; the
    harness runs when `tasks` is set (apps/main/harness.py)."""
    tasks: Optional[list[Any]] = None  # task names (or task dicts); None: no harness
    num_fewshot: Optional[int] = None
    device: Optional[str] = None  # accepted for Meta Lingua configs; the model's device is used
    use_cache: Optional[str] = None  # accepted for Meta Lingua configs; requests are not cached
    cache_requests: bool = False
    rewrite_requests_cache: bool = False
    delete_requests_cache: bool = False
    limit: Optional[float] = None  # documents per task (a fraction when < 1)
    bootstrap_iters: int = 100000
    check_integrity: bool = False
    write_out: bool = False
    log_samples: bool = True
    system_instruction: Optional[str] = None
    apply_chat_template: bool = False
    fewshot_as_multiturn: bool = False
    gen_kwargs: Optional[str] = None
    verbosity: str = "INFO"
    predict_only: bool = False
    random_seed: int = 0
    numpy_random_seed: int = 1234
    torch_random_seed: int = 1234
    fewshot_random_seed: int = 1234
    # not in Meta Lingua:
    include_path: Optional[str] = None  # a folder of local task YAMLs
    include_defaults: Optional[bool] = None  # lm-eval's built-in tasks too; None: only without include_path
    batch_size: int = 8  # sequences per forward
    rolling_context_len: Optional[int] = None  # perplexity windows' context; None: half of max_seqlen


@dataclass
class EvalArgs:
    name: str = "evals"
    dump_dir: Optional[str] = None  # defaults to the dump_dir that holds ckpt_dir
    metric_log_dir: Optional[str] = None  # where metrics.validation.jsonl goes; defaults to dump_dir
    ckpt_dir: str = ""
    global_step: Optional[int] = None
    validation: Optional[ValidationArgs] = field(default_factory=ValidationArgs)  # null: no validation
    pairs: PairsArgs = field(default_factory=PairsArgs)  # input/output pairs: loss, exact match, ROUGE-L
    generator: Optional[dict] = None  # accepted for Meta Lingua configs; sampling is apps.main.generate
    harness: LMHarnessArgs = field(default_factory=LMHarnessArgs)  # lm-eval tasks
    wandb: Optional[dict] = None


def _val_files(val: ValidationArgs, data: DataArgs) -> dict[str, StoragePath]:
    root = resolve(val.root_dir or data.root_dir or ".")  # a path or an fsspec URL
    names = list(val.sources) or (list(data.sources) if val.use_val_from_train_src else [])
    if not names:
        raise DataError("eval: no validation sources (set validation.sources or train with data.sources)")
    out = {}
    for name in names:
        files = sorted((root / name).glob(VAL_GLOB))
        if not files:
            raise DataError(f"eval: no {VAL_GLOB} in '{root / name}' (validation source '{name}')")
        out[name] = files[0]
    return out


def _windows(tokens: np.ndarray, mask: np.ndarray, seq_len: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(input, label) pieces covering every next-token prediction of the document once;
    labels the document does not train on are IGNORE_INDEX, so they are not scored either."""
    pieces = []
    for start in range(0, max(1, len(tokens) - 1), seq_len):
        chunk, chunk_mask = tokens[start : start + seq_len + 1], mask[start : start + seq_len + 1]
        if len(chunk) >= 2:
            pieces.append((chunk[:-1], labels_from(chunk, chunk_mask)))
    return pieces


@torch.no_grad()
def validate_file(
    model: LMTransformer,
    tokenizer: Tokenizer,
    path: StoragePath,
    seq_len: int,
    batch_size: int,
    max_steps: Optional[int],
    device: torch.device,
    rank: int = 0,
    world_size: int = 1,
    add_bos: bool = True,
    add_eos: bool = True,
    text_field: Optional[list[str]] = None,
    separator: str = "\n",
) -> dict:
    """Sums of NLL (nats), scored tokens and their UTF-8 bytes over this rank's documents,
    framed with bos/eos as the model was trained (data.add_bos / add_eos): a model trained
    without eos is not scored on eos predictions it never learned.

    In a distributed run every rank runs the same forward passes in number and width
    (agreed_widths; a dummy batch where a rank has run out), because a sharded model's forward
    is a collective."""
    pieces: list[tuple[np.ndarray, np.ndarray]] = []
    n_bytes, n_docs = 0, 0
    for doc_idx, segments in enumerate(read_documents(path, text_field=text_field, separator=separator)):
        if doc_idx % world_size != rank:
            continue
        tokens, mask = encode_document(tokenizer, segments, add_bos, add_eos)
        # A segment model scores a document whole: its memory carries across the segments, as
        # at inference; a plain model in windows of seq_len.
        window = seq_len if getattr(model, "args", None) is None or model.args.segment_length == 0 \
            else max(seq_len, len(tokens))
        doc_pieces = _windows(tokens, mask, window)
        # A document counts (its bytes for bpb) only if all of its windows are scored.
        if max_steps is not None and n_docs and len(pieces) + len(doc_pieces) > max_steps * batch_size:
            break
        pieces += doc_pieces
        n_bytes += sum(len(text.encode("utf-8")) for text, trained in segments if trained)
        n_docs += 1
    batches = [pieces[i : i + batch_size] for i in range(0, len(pieces), batch_size)]
    widths = agreed_widths([max(len(x) for x, _ in batch) for batch in batches])

    nll, n_tokens = 0.0, 0
    for i, width in enumerate(widths):
        if i >= len(batches):
            model(torch.zeros(1, width, dtype=torch.long, device=device))  # keep collectives in step
            continue
        batch = batches[i]
        # Padded at the end (unscored, after every scored token, so it changes no score).
        x = torch.zeros(len(batch), width, dtype=torch.long)
        y = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
        for j, (xj, yj) in enumerate(batch):
            x[j, : len(xj)] = torch.from_numpy(xj)
            y[j, : len(yj)] = torch.from_numpy(yj)
        logits = model(x.to(device))
        loss = F.cross_entropy(
            logits.flatten(0, 1).float(), y.to(device).flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
        )
        nll += loss.item()
        n_tokens += int((y != IGNORE_INDEX).sum())
    return {"nll": nll, "tokens": n_tokens, "bytes": n_bytes, "docs": n_docs}


def agreed_widths(widths: list[int]) -> list[int]:
    """The width of each forward pass, the same on every rank: as many passes as the rank with
    the most batches, each as wide as that pass's widest batch on any rank. A sharded model's
    forward is a collective, and a segment model's runs once per segment, so ranks must agree on
    both (a 4-rank hybrid hung in validation when documents were longer on one rank)."""
    if not (dist.is_available() and dist.is_initialized()):
        return widths
    count = torch.tensor(len(widths), device=collective_device())
    dist.all_reduce(count, op=dist.ReduceOp.MAX)
    padded = torch.ones(int(count), dtype=torch.long, device=collective_device())
    padded[: len(widths)] = torch.tensor(widths, dtype=torch.long)
    dist.all_reduce(padded, op=dist.ReduceOp.MAX)
    return padded.tolist()


def run_validation(
    model: LMTransformer,
    tokenizer: Tokenizer,
    val: ValidationArgs,
    data: DataArgs,
    device: torch.device,
    rank: int = 0,
    world_size: int = 1,
    replicas_per_shard: int = 1,
) -> dict:
    """{source: {loss, bpb, tokens, bytes, docs}} reduced over ranks. `rank`/`world_size` are
    data-parallel; `replicas_per_shard` ranks (tensor-parallel peers) score the same documents,
    so the all-reduced sums are divided by it."""
    was_training = model.training
    model.eval()
    results = {}
    try:
        for name, path in _val_files(val, data).items():
            sums = validate_file(
                model, tokenizer, path, data.seq_len, val.batch_size, val.max_steps, device, rank, world_size,
                data.add_bos, data.add_eos, data.text_field, data.text_field_separator,
            )
            vec = torch.tensor([sums["nll"], sums["tokens"], sums["bytes"], sums["docs"]], dtype=torch.float64,
                               device=collective_device())
            if dist.is_available() and dist.is_initialized():
                dist.all_reduce(vec)
                vec /= replicas_per_shard
            nll, tokens, n_bytes, docs = vec.tolist()
            results[name] = {
                "loss": nll / max(tokens, 1),
                "bpb": nll / math.log(2) / max(n_bytes, 1),
                "tokens": int(tokens),
                "bytes": int(n_bytes),
                "docs": int(docs),
            }
    finally:
        model.train(was_training)
    return results


def load_train_config(ckpt_dir: StoragePath) -> dict:
    params = ckpt_dir / "params.json"
    if not params.exists():
        raise FileNotFoundError(f"'{params}' not found: ckpt_dir must be a checkpoint saved by apps.main.train")
    return json.loads(params.read_text())


def load_model_from_checkpoint(ckpt_dir: StoragePath, device: torch.device) -> tuple[LMTransformer, Tokenizer, dict]:
    """Model with the checkpoint's weights, its tokenizer, and its training config."""
    config = load_train_config(ckpt_dir)
    # Strict: a key this code lacks (a memory layer's, say) must fail, not load a plain model.
    model_args = load_params(ckpt_dir / "params.json", LMTransformerArgs, "model")
    data_args = load_params(ckpt_dir / "params.json", DataArgs, "data")
    tokenizer = build_tokenizer(data_args.tokenizer.name, data_args.tokenizer.path)
    with torch.device(device):
        model = LMTransformer(model_args)
    consolidated = ckpt_dir / CONSOLIDATED_NAME  # consolidate_checkpoint's dir holds it and params.json
    load_model_weights(consolidated if consolidated.exists() else ckpt_dir, model)
    model.eval()
    return model, tokenizer, config


def step_checkpoint(ckpt: StoragePath) -> StoragePath:
    """The step checkpoint dir (<dump_dir>/checkpoints/<step>) of `ckpt`, which may be its
    consolidated/ dir (lingua.checkpoint.consolidate_checkpoint)."""
    return ckpt.parent if ckpt.name == "consolidated" else ckpt


def resolve_ckpt_dir(path: str) -> StoragePath:
    """A checkpoint dir, or a dump dir / checkpoints dir (its newest checkpoint); a path or an
    fsspec URL."""
    p = resolve(path)
    if (p / "params.json").exists():
        return p
    for base in (p / "checkpoints", p):
        found = list_checkpoints(base)
        if found:
            return found[-1]
    raise FileNotFoundError(f"no checkpoint found at ckpt_dir='{path}'")


def main(argv: Optional[list[str]] = None) -> dict:
    args = cli_main(EvalArgs, argv)
    info = world_info()
    init_logger(info.rank)
    if not args.ckpt_dir:
        raise SystemExit("config error: ckpt_dir is required (a checkpoint dir or a training dump_dir)")
    set_cpu_threads(info)
    device = default_device(info.local_rank)
    init_distributed(info)  # torchrun, or srun: master address and port from the SLURM job
    if args.generator:
        logger.warning("eval: 'generator' is accepted for Meta Lingua configs; sampling is apps.main.generate")
    try:
        results = evaluate(args, info, device)
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    shutdown_distributed()  # after evaluate() returned: nothing holds the model any more
    return results


def evaluate(args: EvalArgs, info: WorldInfo, device: torch.device) -> dict:
    """Evaluate the checkpoint args.ckpt_dir names; rank 0 appends the figures to
    metrics.validation.jsonl and metrics.eval.jsonl. Returns {source name: {loss, bpb, docs, ...},
    "pairs": {...}, "harness": {task: {metric: value}}} for what ran."""
    ckpt = resolve_ckpt_dir(args.ckpt_dir)
    if not (args.validation or args.pairs.path or args.harness.tasks):
        raise ConfigError("nothing to evaluate: validation is null and neither pairs.path nor harness.tasks is set")
    model, tokenizer, config = load_model_from_checkpoint(ckpt, device)
    data_args = load_params(ckpt / "params.json", DataArgs, "data")
    step_dir = step_checkpoint(ckpt)
    step = args.global_step if args.global_step is not None else int(step_dir.name) if step_dir.name.isdigit() \
        else None
    out_dir = resolve(args.metric_log_dir or args.dump_dir) if (args.metric_log_dir or args.dump_dir) \
        else step_dir.parent.parent
    results: dict = {}
    if args.validation is not None:
        results = run_validation(model, tokenizer, args.validation, data_args, device, info.rank, info.world_size)
    if info.rank == 0 and args.validation is not None:
        with MetricLogger(out_dir / "metrics.validation.jsonl") as m:
            m.log({"global_step": step, "checkpoint": str(ckpt), "val": results})
        for name, r in results.items():
            logger.info("%s: loss %.4f  bpb %.4f over %d docs", name, r["loss"], r["bpb"], r["docs"])
        logger.info("validation metrics appended to %s", out_dir / "metrics.validation.jsonl")
    if args.pairs.path:
        pairs = evaluate_pairs(model, tokenizer, args.pairs, data_args, device, info.rank, info.world_size)
        if info.rank == 0:
            log_pairs(out_dir, step, str(ckpt), args.pairs.path, pairs)
        results = {**results, "pairs": pairs}
    if args.harness.tasks:
        harness = evaluate_harness(args.harness, model, tokenizer, device, out_dir, step, str(ckpt), info.rank)
        results = {**results, "harness": harness}
    return results


def evaluate_harness(harness: LMHarnessArgs, model, tokenizer, device, out_dir, step: Optional[int], ckpt: str,
                     rank: int = 0) -> Optional[dict]:
    """lm-eval on harness.tasks (every rank takes part); rank 0 writes lm-eval's whole output to
    <out_dir>/evals/<step>/results.json and a row {global_step, <task>: {<metric>: value}} to
    metrics.eval.jsonl (nested, as Meta Lingua's). Returns the per-task results on rank 0."""
    from apps.main.harness import run_harness  # lm-eval is imported only when a harness runs

    output = run_harness(harness, model, tokenizer, device)
    if rank != 0 or output is None:
        return None
    from lm_eval.utils import handle_non_serializable

    run_dir = out_dir / "evals" / (f"{step:010d}" if step is not None else "latest")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "results.json").write_text(json.dumps(output, indent=2, default=handle_non_serializable))
    per_task = output["results"]
    with MetricLogger(out_dir / "metrics.eval.jsonl") as m:
        m.log({"global_step": step, "checkpoint": ckpt, **per_task}, nested=True)
    for task, metrics in per_task.items():
        shown = {k: round(v, 4) for k, v in metrics.items() if isinstance(v, float) and "stderr" not in k}
        logger.info("harness %s: %s", task, shown)
    logger.info("harness results in %s and %s", run_dir / "results.json", out_dir / "metrics.eval.jsonl")
    return per_task


def log_pairs(out_dir, step: Optional[int], ckpt: str, path: str, pairs: dict) -> None:
    with MetricLogger(out_dir / "metrics.eval.jsonl") as m:
        m.log({"global_step": step, "checkpoint": ckpt, "pairs_path": path, "pairs": pairs})
    logger.info("pairs %s: loss %.4f  exact match %.3f  ROUGE-L %.3f over %d pairs (metrics.eval.jsonl)", path,
                pairs["loss"], pairs["exact_match"], pairs["rouge_l"], pairs["pairs"])


if __name__ == "__main__":
    main()

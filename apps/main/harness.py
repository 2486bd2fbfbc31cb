"""Downstream evaluation with EleutherAI's lm-eval harness (version 0.4.13).

`LinguaLM` answers the harness's three request types with our model and tokenizer:

- `loglikelihood(context, continuation)`: the summed log-probability of the continuation and
  whether greedy decoding would produce it. The token boundary is the one lm-eval's own HF
  model draws: trailing spaces of the context move to the continuation, the pair is encoded
  whole, and the continuation is what follows the context's own tokens.
- `loglikelihood_rolling(text)`: the text's log-probability in windows of the model's length,
  each window with a full context of earlier tokens (`rolling_context_len`, default half the
  window); plain floats, as the perplexity metrics expect. A segment model (memory slots, bank)
  reads the text whole: its memory carries the context across segments.
- `generate_until(context, {until, max_gen_toks, ...})`: apps.main.generate's decoder (KV cache,
  and a segment model's memory).

Under torchrun/srun the harness gives each rank its share of the documents and gathers the
metrics with the `all_gather`, `gather_object` and `barrier` overridden here, so the figures equal
those of one process. Each rank holds the whole model (apps.main.eval loads it unsharded).

    python -m apps.main.eval ckpt_dir=./dump/debug 'harness.tasks=[hellaswag]' harness.limit=100
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from lm_eval.api.model import LM  # importing lm-eval costs seconds: eval.py imports this module on demand
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from lingua.args import ConfigError
from lingua.distributed import collective_device

if TYPE_CHECKING:
    from apps.main.eval import LMHarnessArgs

logger = logging.getLogger(__name__)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


class LinguaLM(LM):
    def __init__(self, model, tokenizer, device: torch.device, batch_size: int = 8,
                 rolling_context_len: Optional[int] = None, max_gen_len: int = 256):
        super().__init__()
        self.model, self.tokenizer = model, tokenizer
        self._device = device  # LM.device is a read-only property in 0.4.13
        self.batch_size = batch_size
        self.segmented = model.args.segment_length > 0
        # A plain model attends over max_seqlen tokens; a segment model over any length.
        self.max_len = None if self.segmented else model.args.max_seqlen
        self.rolling_context_len = rolling_context_len
        self.max_gen_len = max_gen_len
        if _distributed():
            self._rank, self._world_size = dist.get_rank(), dist.get_world_size()

    # --- the three request types -------------------------------------------------------
    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        return self.score([self.encode_pair(*r.args) for r in requests])

    def loglikelihood_rolling(self, requests) -> list[float]:
        out = []
        for request in requests:
            windows = self.rolling_windows(self.tokenizer.encode(request.args[0], add_bos=False, add_eos=False))
            out.append(float(sum(logprob for logprob, _ in self.score(windows))))
        return out

    def generate_until(self, requests) -> list[str]:
        from apps.main.generate import GeneratorArgs, generate

        out = []
        for request in requests:
            context, kwargs = request.args
            kwargs = dict(kwargs or {})
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            sampling = bool(kwargs.pop("do_sample", False))
            max_gen = int(kwargs.pop("max_gen_toks", self.max_gen_len))
            args = GeneratorArgs(
                temperature=float(kwargs.pop("temperature", 1.0 if sampling else 0.0)) if sampling else 0.0,
                max_gen_len=max_gen, until=until,
            )
            # As lm-eval's HF model: the context keeps its last max_len - max_gen_toks tokens, so
            # a long few-shot prompt still leaves room for the answer.
            budget = None if self.max_len is None else max(1, self.max_len - max_gen)
            out.append(generate(self.model, self.tokenizer, [context], args, prompt_budget=budget)[0])
        return out

    # --- tokens and scores -------------------------------------------------------------
    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(context tokens, continuation tokens) with lm-eval's boundary (see the module doc)."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = self.tokenizer.encode(context + continuation, add_bos=True, add_eos=False)
        context_ids = self.tokenizer.encode(context, add_bos=True, add_eos=False)
        if len(context_ids) >= len(whole):  # the pair merges into the context's tokens: encode them apart
            return context_ids, self.tokenizer.encode(continuation, add_bos=False, add_eos=False)
        return whole[: len(context_ids)], whole[len(context_ids) :]

    def rolling_windows(self, tokens: list[int]) -> list[tuple[list[int], list[int]]]:
        """(context, predicted) pieces that predict every token once, the first from BOS."""
        bos = self.tokenizer.bos_id
        if self.max_len is None:
            return [([bos], tokens)] if tokens else []
        context_len = self.rolling_context_len or self.max_len // 2
        if not 1 <= context_len <= self.max_len:
            raise ConfigError(f"harness.rolling_context_len={context_len} must be in [1, {self.max_len}]")
        return [make_disjoint_window(w) for w in get_rolling_token_windows(tokens, bos, self.max_len, context_len)]

    @torch.no_grad()
    def score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), greedy) per pair, in batches of similar length
        (longest first), right-padded: the model is causal, so padding after a sequence changes
        none of its logits."""
        results: list[Optional[tuple[float, bool]]] = [None] * len(pairs)
        inputs = []
        for i, (context, continuation) in enumerate(pairs):
            if not continuation:
                raise ValueError("lm-eval sent an empty continuation: nothing to score")
            whole = (context + continuation)
            if self.max_len is not None:
                whole = whole[-(self.max_len + 1) :]
            inputs.append((i, whole[:-1], continuation))
        inputs.sort(key=lambda item: -len(item[1]))
        for start in range(0, len(inputs), self.batch_size):
            batch = inputs[start : start + self.batch_size]
            width = len(batch[0][1])
            x = torch.zeros(len(batch), width, dtype=torch.long)
            for row, (_, tokens, _) in enumerate(batch):
                x[row, : len(tokens)] = torch.tensor(tokens)
            logprobs = F.log_softmax(self.model(x.to(self.device)).float(), dim=-1)
            for row, (i, tokens, continuation) in enumerate(batch):
                # a continuation longer than the window is scored on its last max_len tokens
                n = min(len(continuation), len(tokens))
                continuation = continuation[-n:]
                scored = logprobs[row, len(tokens) - n : len(tokens)]  # predictions of the continuation
                target = torch.tensor(continuation, device=scored.device)
                total = scored.gather(-1, target[:, None]).sum().item()
                results[i] = (float(total), bool((scored.argmax(-1) == target).all()))
        return results  # type: ignore[return-value]

    # --- several ranks -----------------------------------------------------------------
    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        if not _distributed():
            return tensor
        local = tensor.reshape(-1).to(collective_device())
        parts = [torch.empty_like(local) for _ in range(self.world_size)]
        dist.all_gather(parts, local)
        return torch.cat(parts).to(tensor.device)

    def gather_object(self, obj: Any, dst: int = 0) -> Optional[list]:
        if not _distributed():
            return [obj]
        out = [None] * self.world_size if self.rank == dst else None
        dist.gather_object(obj, out, dst=dst)
        return out

    def barrier(self) -> None:
        if _distributed():
            dist.barrier()


def task_manager(args: "LMHarnessArgs"):
    """lm-eval's TaskManager over args.include_path (local task YAMLs) and, unless
    include_defaults is false, the built-in tasks (default: built-ins only without an
    include_path, local ones only with one: scanning all built-ins takes a while)."""
    from lm_eval.tasks import TaskManager

    paths = [args.include_path] if isinstance(args.include_path, str) else list(args.include_path or [])
    for p in paths:
        if not Path(p).is_dir():
            raise ConfigError(f"harness.include_path: '{p}' is not a directory of task YAMLs")
    include_defaults = not paths if args.include_defaults is None else args.include_defaults
    return TaskManager(include_path=paths or None, include_defaults=include_defaults)


def checked_task_manager(args: "LMHarnessArgs"):
    """The TaskManager, once every named task is known to it: ConfigError naming harness.tasks
    otherwise (the training loop calls this before its first step)."""
    if not args.tasks:
        raise ConfigError("harness.tasks is empty: name at least one lm-eval task")
    manager = task_manager(args)
    known = set(manager.all_tasks)
    unknown = [t for t in args.tasks if isinstance(t, str) and t not in known]
    if unknown:
        where = f"in {args.include_path}" if args.include_path else "among lm-eval's tasks"
        raise ConfigError(f"harness.tasks: {unknown} not found {where}")
    return manager


def run_harness(args: "LMHarnessArgs", model, tokenizer, device: torch.device) -> Optional[dict]:
    """simple_evaluate on args.tasks; lm-eval's results dict on rank 0, None on the others."""
    from lm_eval import simple_evaluate

    manager = checked_task_manager(args)
    lm = LinguaLM(model, tokenizer, device, args.batch_size, args.rolling_context_len)
    was_training = model.training
    model.eval()
    try:
        results = simple_evaluate(
            model=lm, tasks=list(args.tasks), num_fewshot=args.num_fewshot, limit=args.limit,
            use_cache=args.use_cache, cache_requests=args.cache_requests,
            rewrite_requests_cache=args.rewrite_requests_cache, delete_requests_cache=args.delete_requests_cache,
            bootstrap_iters=args.bootstrap_iters, check_integrity=args.check_integrity, write_out=args.write_out,
            log_samples=args.log_samples, system_instruction=args.system_instruction,
            apply_chat_template=args.apply_chat_template, fewshot_as_multiturn=args.fewshot_as_multiturn,
            gen_kwargs=args.gen_kwargs, task_manager=manager, verbosity=args.verbosity,
            predict_only=args.predict_only, random_seed=args.random_seed, numpy_random_seed=args.numpy_random_seed,
            torch_random_seed=args.torch_random_seed, fewshot_random_seed=args.fewshot_random_seed,
        )
    finally:
        model.train(was_training)
    return dict(results) if results is not None else None

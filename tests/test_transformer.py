"""The model: attention variants against a naive reference, KV-cache decoding, init, sampling."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from apps.main.generate import GeneratorArgs, generate, sample_next
from apps.main.transformer import LMTransformerArgs, build_model
from lingua.tokenizer import build_tokenizer
from lingua.transformer import Attention, BaseTransformerArgs, RotaryEmbedding
from tests.conftest import failure_report, ROOT, decode_step_by_step


def tiny(**kw) -> LMTransformerArgs:
    base = dict(dim=32, n_layers=2, n_heads=4, vocab_size=258, max_seqlen=64)
    base.update(kw)
    return LMTransformerArgs(**base)


def naive_attention(attn: Attention, x: torch.Tensor, rope, window=None) -> torch.Tensor:
    """Dense softmax attention written out, with kv heads repeated for GQA."""
    from lingua.transformer import apply_rope

    b, s, _ = x.shape
    q = apply_rope(attn.wq(x).view(b, s, attn.n_heads, attn.head_dim), *rope).transpose(1, 2)
    k = apply_rope(attn.wk(x).view(b, s, attn.n_kv_heads, attn.head_dim), *rope).transpose(1, 2)
    v = attn.wv(x).view(b, s, attn.n_kv_heads, attn.head_dim).transpose(1, 2)
    rep = attn.n_heads // attn.n_kv_heads
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(attn.head_dim)
    i, j = torch.arange(s)[:, None], torch.arange(s)[None, :]
    allowed = j <= i
    if window is not None:
        allowed &= j > i - window
    out = scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v
    return attn.wo(out.transpose(1, 2).reshape(b, s, -1))


@pytest.mark.parametrize("n_kv_heads, window", [(4, None), (2, None), (1, 5), (4, 8)])
def test_attention_matches_naive(n_kv_heads, window):
    torch.manual_seed(0)
    args = BaseTransformerArgs(dim=32, n_heads=4, n_kv_heads=n_kv_heads, max_seqlen=32)
    attn = Attention(args, sliding_window=window)
    rope = RotaryEmbedding(8, 32, 10000.0)(0, 20)
    x = torch.randn(2, 20, 32)
    torch.testing.assert_close(attn(x, rope), naive_attention(attn, x, rope, window), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "dtype, window, q_len, fused",
    [
        (torch.float32, None, 16, False),  # fp32: no flash on CUDA
        (torch.bfloat16, None, 16, True),  # causal bf16: flash takes GQA
        (torch.bfloat16, 4, 16, False),  # a window needs a mask: flash cannot take it
        (torch.bfloat16, None, 1, True),  # one decoded token attends to every cached key: no mask
        (torch.bfloat16, None, 3, False),  # several decoded tokens: a bottom-right causal mask
    ],
)
def test_gqa_reaches_sdpa_in_a_form_a_fused_cuda_kernel_takes(monkeypatch, dtype, window, q_len, fused):
    """What a GPU's sdpa receives, recorded on fake CUDA tensors: torch 2.13 runs `enable_gqa` on
    the flash kernels only (bf16/fp16, no mask); anything else went to the math kernel, which keeps
    the S x S scores. There the 2 kv heads must arrive expanded to the 4 query heads."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    seen = []
    real_sdpa = F.scaled_dot_product_attention

    def recording_sdpa(q, k, v, attn_mask=None, is_causal=False, enable_gqa=False, **kw):
        seen.append((k.shape[1], v.shape[1], enable_gqa, attn_mask is not None, is_causal))
        return real_sdpa(q, k, v, attn_mask=attn_mask, is_causal=is_causal, enable_gqa=enable_gqa, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording_sdpa)
    # arange cannot make fake CUDA tensors on a CPU-only build; the mask's values do not matter here.
    monkeypatch.setattr("lingua.transformer._causal_mask",
                        lambda q_len, kv_len, window, device: torch.ones(q_len, kv_len, dtype=torch.bool, device=device))
    attn = Attention(BaseTransformerArgs(dim=32, n_heads=4, n_kv_heads=2, max_seqlen=32), sliding_window=window)
    with FakeTensorMode():
        q = torch.empty(2, 4, q_len, 8, device="cuda", dtype=dtype)
        kv = torch.empty(2, 2, 16, 8, device="cuda", dtype=dtype)
        attn._attend(q, kv, kv)
    (k_heads, v_heads, enable_gqa, masked, causal), = seen
    assert enable_gqa == fused and (k_heads, v_heads) == ((2, 2) if fused else (4, 4)), seen
    assert masked == (window is not None or q_len not in (1, 16)) and causal == (window is None and q_len == 16)


def test_expanded_gqa_matches_enable_gqa(monkeypatch):
    """The expanded path computes what sdpa's GQA does (forced here on CPU, where flash takes GQA)."""
    import lingua.transformer as transformer

    torch.manual_seed(0)
    model = build_model(tiny(n_kv_heads=2, sliding_window=6))
    x = torch.randint(0, 258, (2, 20))
    with torch.no_grad():
        native = model(x)
        monkeypatch.setattr(transformer, "sdpa_gqa_is_fused", lambda *a, **k: False)
        expanded = model(x)
    torch.testing.assert_close(expanded, native, atol=1e-5, rtol=1e-5)


def test_flex_attention_matches_sdpa_forward():
    torch.manual_seed(0)
    m_sdpa = build_model(tiny(n_kv_heads=2, attn_impl="sdpa"))
    m_flex = build_model(tiny(n_kv_heads=2, attn_impl="flex"))
    x = torch.randint(0, 258, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(m_flex(x), m_sdpa(x), atol=1e-4, rtol=1e-4)


def test_kv_cache_decoding_equals_full_forward():
    torch.manual_seed(0)
    model = build_model(tiny(n_kv_heads=2)).eval()
    x = torch.randint(0, 258, (1, 30))
    with torch.no_grad():
        full = model(x)
    torch.testing.assert_close(decode_step_by_step(model, x, prefix=12, cache_len=64), full, atol=1e-4, rtol=1e-4)


def test_loss_at_init_is_near_uniform_and_ignores_masked_labels():
    model = build_model(tiny())
    x = torch.randint(0, 258, (2, 16))
    loss = model(x, target=x)
    assert abs(loss.item() - math.log(258)) < 0.5
    y = x.clone()
    y[:, 8:] = -100
    logits = model(x)
    expected = F.cross_entropy(logits[:, :8].flatten(0, 1), x[:, :8].flatten())
    torch.testing.assert_close(model(x, target=y), expected)


@pytest.mark.parametrize("factor", ["disabled", "global_depth", "current_depth", "dim_ratio"])
def test_init_std_factor_scales_output_projections(factor):
    model = build_model(tiny(n_layers=4, dim=64, init_std_factor=factor))
    base = 64**-0.5
    expected = {"disabled": [1.0] * 4, "global_depth": [8**0.5] * 4,
                "current_depth": [(2 * (i + 1)) ** 0.5 for i in range(4)], "dim_ratio": [64 / 4096] * 4}[factor]
    for layer, f in zip(model.layers, expected):
        assert layer.attention.wq.weight.std().item() == pytest.approx(base, rel=0.15)
        assert layer.attention.wo.weight.std().item() == pytest.approx(base / f, rel=0.15)


def test_build_is_deterministic_and_weight_tying_shares_storage():
    a, b = build_model(tiny(seed=3)), build_model(tiny(seed=3))
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n
    tied = build_model(tiny(weight_tying=True))
    assert tied.output.weight.data_ptr() == tied.tok_embeddings.weight.data_ptr()


def test_bad_head_config_names_keys():
    with pytest.raises(ValueError, match="model.n_kv_heads"):
        build_model(tiny(n_heads=4, n_kv_heads=3))
    with pytest.raises(ValueError, match="max_seqlen"):
        build_model(tiny(max_seqlen=8))(torch.zeros(1, 9, dtype=torch.long))


def test_sampling_filters():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    g = torch.Generator().manual_seed(0)
    assert sample_next(logits, GeneratorArgs(temperature=0.0), g).item() == 3
    top1 = [sample_next(logits, GeneratorArgs(temperature=1.0, top_k=1), g).item() for _ in range(20)]
    assert set(top1) == {3}
    # probs ~ [0.03, 0.09, 0.24, 0.64]: top_p=0.7 needs {3, 2}; top_p=0.6 is met by {3} alone.
    nucleus = {sample_next(logits, GeneratorArgs(temperature=1.0, top_p=0.7), g).item() for _ in range(200)}
    assert {sample_next(logits, GeneratorArgs(temperature=1.0, top_p=0.6), g).item() for _ in range(50)} == {3}
    assert nucleus == {2, 3}


def test_generate_is_deterministic_and_stops_at_until():
    model = build_model(tiny()).eval()
    tok = build_tokenizer("bytes")
    args = GeneratorArgs(temperature=0.8, top_p=0.95, max_gen_len=20, seed=1)
    first, second = generate(model, tok, ["def f():"], args), generate(model, tok, ["def f():"], args)
    assert first == second
    greedy = generate(model, tok, ["abc"], GeneratorArgs(max_gen_len=30))[0]
    if len(greedy) > 3:
        cut = generate(model, tok, ["abc"], GeneratorArgs(max_gen_len=30, until=[greedy[2:4]]))[0]
        assert cut == greedy[: greedy.index(greedy[2:4])]


def test_rope_in_bf16_is_rounded_once():
    """Rotated in fp32 and rounded once, a bf16 query equals the fp64 rotation rounded to bf16;
    with bf16 tables and bf16 products (as before) most entries were off by an ulp or more."""
    from lingua.transformer import apply_rope

    cos, sin = RotaryEmbedding(64, 4096, 10000.0)(0, 4096)
    x = torch.randn(1, 4096, 2, 64, generator=torch.Generator().manual_seed(0)).bfloat16()
    half = 32
    xd = x.double()
    ref = xd * cos[:, None].double() + torch.cat([-xd[..., half:], xd[..., :half]], -1) * sin[:, None].double()
    out = apply_rope(x, cos, sin)
    assert out.dtype == torch.bfloat16
    exact = (out == ref.to(torch.bfloat16)).double().mean().item()
    assert exact > 0.99, exact


def test_fsdp_hands_the_blocks_fp32_rope_tables(tmp_path):
    """FSDP's mixed precision casts a module's floating forward inputs to the parameter dtype by
    default, which made the RoPE tables bf16 inside every block. One rank, bf16 parameters."""
    script = """
import sys, torch, torch.distributed as dist
import lingua.distributed as ld
from apps.main.transformer import LMTransformerArgs, build_model
from lingua.distributed import DistributedArgs, ParallelDims, apply_fsdp, build_mesh, shutdown_distributed
dist.init_process_group("gloo", rank=0, world_size=1, init_method="file://" + sys.argv[1])
ld.training_dtype = lambda args, device: torch.bfloat16  # as on a GPU
dims = ParallelDims(1, 1, 1)
model = build_model(LMTransformerArgs(dim=32, n_layers=2, n_heads=2, vocab_size=64, max_seqlen=16))
apply_fsdp(model, build_mesh(dims, "cpu"), dims, DistributedArgs(), torch.device("cpu"))
seen = []
model.layers[0].attention.register_forward_pre_hook(lambda m, args: seen.append((args[0].dtype, args[1][0].dtype)))
model(torch.randint(0, 64, (1, 16)))
print(*seen[0])
shutdown_distributed()  # destroy_process_group alone may SIGABRT at exit
"""
    env = dict(__import__("os").environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "init")], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, failure_report(proc)
    assert proc.stdout.split() == ["torch.bfloat16", "torch.float32"], proc.stdout


def test_selective_checkpointing_keeps_every_attention_kernel():
    """SAC recomputed flex, cuDNN and xformers attention in backward: only sdpa's flash and
    efficient kernels were in its saved set."""
    from torch.utils.checkpoint import CheckpointPolicy

    from lingua.transformer import selective_checkpoint_context

    class Ctx:
        is_recompute = False

    forward_ctx, _ = selective_checkpoint_context()
    policy = forward_ctx.policy_fn
    ops = [torch.ops.aten._scaled_dot_product_flash_attention.default,
           torch.ops.aten._scaled_dot_product_efficient_attention.default,
           torch.ops.aten._scaled_dot_product_cudnn_attention.default,
           torch.ops.higher_order.flex_attention]

    class XformersOp:  # how an xformers kernel shows itself to the policy (its library is not installed here)
        namespace, __name__ = "xformers_flash3", "flash_fwd"

    for op in ops + [XformersOp()]:
        assert policy(Ctx(), op) == CheckpointPolicy.MUST_SAVE, op
    assert policy(Ctx(), torch.ops.aten.add.Tensor) == CheckpointPolicy.PREFER_RECOMPUTE


def test_eager_flex_is_compiled_once_and_builds_one_mask_per_shape(monkeypatch):
    """attn_impl=flex without distributed.compile ran flex_attention eagerly (scores
    materialised) and built its block mask in every layer at every step."""
    import lingua.transformer as transformer

    built, compiled_calls = [], []
    real_mask, real_compiled = transformer.flex_block_mask, transformer.compiled_flex_attention()
    monkeypatch.setattr(transformer, "flex_block_mask", lambda *a: built.append(a[:3]) or real_mask(*a))

    def counting_compiled():
        def run(*args, **kwargs):
            compiled_calls.append(args[0].shape)
            return real_compiled(*args, **kwargs)
        return run

    monkeypatch.setattr(transformer, "compiled_flex_attention", counting_compiled)
    torch.manual_seed(0)
    m_flex = build_model(tiny(n_kv_heads=2, attn_impl="flex", n_layers=3))
    m_sdpa = build_model(tiny(n_kv_heads=2, attn_impl="sdpa", n_layers=3))
    m_sdpa.load_state_dict(m_flex.state_dict())
    x = torch.randint(0, 258, (2, 40))
    with torch.no_grad():
        for _ in range(2):  # two "steps"
            torch.testing.assert_close(m_flex(x), m_sdpa(x), atol=1e-4, rtol=1e-4)
    assert built == [(40, 40, None)]  # one mask for 3 layers x 2 forwards
    assert len(compiled_calls) == 6  # every layer ran the compiled kernel


def test_flex_kv_cache_decoding_equals_full_forward():
    """Decoding changes the key length every token: the compiled flex kernel goes dynamic after
    one recompile instead of compiling a graph per length."""
    torch.manual_seed(0)
    flex = build_model(tiny(n_kv_heads=2, attn_impl="flex")).eval()
    sdpa = build_model(tiny(n_kv_heads=2)).eval()
    sdpa.load_state_dict(flex.state_dict())
    x = torch.randint(0, 258, (1, 30))
    with torch.no_grad():
        full = sdpa(x)
    torch.testing.assert_close(decode_step_by_step(flex, x, prefix=12, cache_len=64), full, atol=1e-4, rtol=1e-4)

"""HMT (apps/hmt/model.py): how segments are assembled and scored, truncated BPTT, recall over
past memories only, the cache's pruning, and the Hugging Face backbone path."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from apps.hmt.model import HMT, HMTArgs, HFBackbone, LinguaBackbone, MemoryCache
from apps.main.transformer import LMTransformerArgs, build_model
from lingua.data import IGNORE_INDEX

VOCAB = 258


def backbone_model(**overrides):
    args = LMTransformerArgs(dim=32, n_layers=2, n_heads=2, vocab_size=VOCAB, max_seqlen=32, seed=5, **overrides)
    return build_model(args).eval()


class Recording(LinguaBackbone):
    """The real backbone, keeping what it embedded and every input it read (for assembly and
    gradient checks)."""

    def __init__(self, model):
        super().__init__(model)
        self.embedded, self.read = [], []

    def embed(self, tokens):
        out = super().embed(tokens)
        if out.requires_grad:
            out.retain_grad()
        self.embedded.append(out)
        return out

    def hidden(self, embeds):
        self.read.append(embeds)
        return super().hidden(embeds)


def hmt(mode="hmt", **overrides) -> tuple[HMT, Recording]:
    backbone = Recording(backbone_model())
    args = HMTArgs(mode=mode, segment_length=12, num_sensory=2, mem_recall_context=4, mem_recall_hidden_dim=16,
                   sum_fraction=0.5, bptt_depth=0)
    model = HMT(backbone, replace(args, **overrides))
    backbone.embedded.clear()  # (the initialisation reads the embedding scale)
    return model, backbone


def tokens(n_segments: int, content: int = 8, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (batch, n_segments * content), generator=torch.Generator().manual_seed(seed))


def test_segments_are_recall_sensory_text_memory_and_only_the_text_is_scored():
    model, bb = hmt(summary="current")  # the paper's assembly (the causal default: the test after this)
    assert model.args.content_length == 12 - 2 - 2
    x = tokens(3)
    with torch.no_grad():
        logits = model(x)
    # per segment: the representation read, then the segment read
    assert [r.shape[1] for r in bb.read] == [4 + 2, 1 + 0 + 8 + 1, 4 + 2, 1 + 2 + 8 + 1, 4 + 2, 1 + 2 + 8 + 1]
    seg1, seg2 = bb.read[1], bb.read[3]
    E1, E2, _ = bb.embedded
    # [T | first half of the segment | T]
    assert torch.equal(bb.read[0][:, 1:5], E1[:, :4])
    assert torch.equal(bb.read[0][:, 0], model.memory_token.expand(2, -1))
    # segment 1: the cache is empty, so recall returns the learned initial memory itself
    assert torch.allclose(seg1[:, 0], model.initial_memory.expand(2, -1)) and torch.equal(seg1[:, 0], seg1[:, -1])
    assert torch.equal(seg1[:, 1:9], E1)
    # segment 2: one cached memory (M_1, the last hidden state of segment 1's read): recall is it
    with torch.no_grad():
        M1 = bb.hidden(seg1)[:, -1]
    assert torch.allclose(seg2[:, 0], M1, atol=1e-6) and torch.equal(seg2[:, 0], seg2[:, -1])
    assert torch.equal(seg2[:, 1:3], E1[:, -2:])  # sensory: segment 1's last two embeddings
    assert torch.equal(seg2[:, 3:11], E2)
    # the scored logits are those at the text's positions
    with torch.no_grad():
        expected = bb.logits(bb.hidden(seg2)[:, 3:11])
    assert torch.allclose(logits[:, 8:16], expected, atol=1e-5)
    # the loss is the cross entropy of those logits with the labels
    y = tokens(3, seed=1)
    y[:, :3] = IGNORE_INDEX
    with torch.no_grad():
        loss = model(x, target=y)
        direct = F.cross_entropy(model(x).flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX)
    assert torch.allclose(loss, direct, atol=1e-6)


@pytest.mark.parametrize("mode, reads", [("stage1", [10, 12, 12]), ("rmt", [12, 12, 12]), ("baseline", [12, 12])])
def test_other_modes_read_what_they_should(mode, reads):
    model, bb = hmt(mode)
    L = model.args.content_length
    x = tokens(len(reads), content=L)
    with torch.no_grad():
        logits = model(x)
    assert [r.shape[1] for r in bb.read] == reads  # no representation reads: no recall
    if mode == "baseline":  # the backbone alone on each segment
        with torch.no_grad():
            assert torch.allclose(logits[:, L:], bb.model(x[:, L:]), atol=1e-5)
    else:  # P_n is the previous segment's memory
        with torch.no_grad():
            M1 = bb.hidden(bb.read[0])[:, -1]
        assert torch.allclose(bb.read[1][:, 0], M1, atol=1e-6)


def test_the_causal_summary_reads_the_previous_segment():
    model, bb = hmt()
    x = tokens(3)
    with torch.no_grad():
        model(x)
    # segment 1 has nothing before it: no representation read, the initial memory as P_1
    assert [r.shape[1] for r in bb.read] == [1 + 0 + 8 + 1, 4 + 2, 1 + 2 + 8 + 1, 4 + 2, 1 + 2 + 8 + 1]
    E1, E2, _ = bb.embedded
    assert torch.allclose(bb.read[0][:, 0], model.initial_memory.expand(2, -1))
    assert torch.equal(bb.read[1][:, 1:5], E1[:, -4:])  # segment 2's summary: [T | last half of segment 1 | T]
    assert torch.equal(bb.read[3][:, 1:5], E2[:, -4:])


@pytest.mark.parametrize("mode", ["hmt", "stage1", "rmt", "baseline"])
def test_later_tokens_change_nothing_before_them(mode):
    """Every position t: changing token t (and all after it) leaves the logits before t as they
    were, in every segment, first positions included (a summary of the segment's own first
    tokens leaked them into every position before them)."""
    model, _ = hmt(mode)
    x = tokens(3)
    with torch.no_grad():
        a = model(x)
        for t in range(1, x.shape[1]):
            y = x.clone()
            y[:, t:] = (y[:, t:] + 7) % 256
            b = model(y)
            assert torch.equal(a[:, :t], b[:, :t]), f"position < {t} moved by {(a[:, :t] - b[:, :t]).abs().max()}"


def test_the_papers_summary_sees_later_tokens_of_its_segment():
    """summary="current" (the paper's) is kept for comparison, leak and all: a token changes
    the logits before it, within its segment."""
    model, _ = hmt(summary="current")
    x = tokens(3)
    y = x.clone()
    y[:, 17] = (y[:, 17] + 7) % 256  # segment 3's second token (recall has 2 memories to weigh there)
    with torch.no_grad():
        a, b = model(x), model(y)
    assert not torch.allclose(a[:, 16], b[:, 16])  # segment 3's first position saw token 17


def test_recall_attends_to_past_memories_only_within_its_context():
    model, _ = hmt(mem_recall_context=2)
    with torch.no_grad():
        model(tokens(5))
    # segment n (from 2) attends over the memories of segments max(1, n-2) .. n-1
    assert [w.shape[1] for w in model.last_recall_weights] == [1, 2, 2, 2]
    assert all(torch.allclose(w.sum(-1), torch.ones(2)) for w in model.last_recall_weights)


def test_cache_drops_the_oldest_or_the_least_recalled_memory():
    mems = [torch.full((1, 3), float(i)) for i in range(3)]
    fifo = MemoryCache(2, "fifo")
    for m in mems:
        fifo = fifo.appended(m)
    assert fifo.memories[0, :, 0].tolist() == [1.0, 2.0]
    by_attention = MemoryCache(2, "attention").appended(mems[0]).appended(mems[1])
    before = by_attention
    by_attention = by_attention.attended(torch.tensor([[0.9, 0.1]])).appended(mems[2])  # 1 was recalled least
    assert by_attention.memories[0, :, 0].tolist() == [0.0, 2.0]
    assert before.memories.shape[1] == 2 and before.attention.sum() == 0  # updates make a new cache


@pytest.mark.parametrize("prompt_length", [13, 16, 1])
def test_generation_carries_the_memory_and_equals_greedy_on_the_whole_text(prompt_length):
    model, _ = hmt()
    prompt = tokens(2, batch=1)[0, :prompt_length].tolist()
    new = model.generate(prompt, max_new_tokens=12)
    assert len(new) == 12
    text = list(prompt)
    with torch.no_grad():
        for token in new:
            assert int(model(torch.tensor([text]))[0, -1].argmax()) == token
            text.append(token)


def gradient_reach(bptt_depth: int, scored_segment: int, n_segments: int = 3) -> list[bool]:
    """Which segments' embeddings get a gradient from the loss of one segment."""
    model, bb = hmt(bptt_depth=bptt_depth)
    model.train()
    x = tokens(n_segments)
    y = torch.full_like(x, IGNORE_INDEX)
    L = model.args.content_length
    y[:, scored_segment * L : (scored_segment + 1) * L] = x[:, scored_segment * L : (scored_segment + 1) * L]
    model(x, target=y).backward()
    return [e.grad is not None and bool(e.grad.abs().sum() > 0) for e in bb.embedded]


def test_bptt_depth_really_truncates_the_gradient():
    # the embeddings of a segment are read by its representation and its own read (always a
    # gradient there), and by later segments only through the carried memory and sensory tokens
    assert gradient_reach(bptt_depth=0, scored_segment=2) == [True, True, True]
    assert gradient_reach(bptt_depth=2, scored_segment=1) == [True, True, False]
    assert gradient_reach(bptt_depth=2, scored_segment=2) == [False, False, True]
    assert gradient_reach(bptt_depth=1, scored_segment=1) == [False, True, False]


def test_hmt_parameters_are_the_memory_component_and_the_backbone_base():
    from lingua.optim import param_components

    model, _ = hmt()
    components = param_components(model)
    assert components["memory_token"] == components["recall.wq.weight"] == "memory"
    assert components["backbone.model.layers.0.attention.wq.weight"] == "base"


@pytest.mark.parametrize("overrides, key", [
    (dict(segment_length=4, num_sensory=2), "segment_length"),
    (dict(sum_fraction=0.0), "sum_fraction"),
    (dict(mem_recall_context=0), "mem_recall_context"),
    (dict(segment_length=64), "exceeds the backbone"),
])
def test_bad_settings_name_the_key(overrides, key):
    with pytest.raises(ValueError, match=key):
        hmt(**overrides)


def test_hugging_face_backbone_gives_the_same_hmt(tmp_path):
    transformers = pytest.importorskip("transformers")
    from dataclasses import asdict

    from apps.main.export import ExportArgs, export
    from lingua.checkpoint import save_model_checkpoint

    ours = backbone_model(n_kv_heads=1)
    ckpt = save_model_checkpoint(ours, tmp_path / "run/checkpoints/0000000001",
                                 {"model": asdict(ours.args), "data": {"tokenizer": {"name": "bytes"}}})
    hf = transformers.LlamaForCausalLM.from_pretrained(export(ExportArgs(ckpt_dir=str(ckpt), out=str(tmp_path / "hf"))),
                                                       torch_dtype=torch.float32).eval()
    args = HMTArgs(segment_length=12, num_sensory=2, mem_recall_context=4, mem_recall_hidden_dim=16)
    a, b = HMT(LinguaBackbone(ours), args), HMT(HFBackbone(hf), args)
    own = {k: v for k, v in a.state_dict().items() if not k.startswith("backbone.")}  # HMT's parameters
    assert b.load_state_dict(own, strict=False).unexpected_keys == []
    x = tokens(3)
    with torch.no_grad():
        assert (a(x) - b(x)).abs().max().item() < 1e-4


def test_dynamic_reading_varies_segment_lengths_in_training_only():
    model, bb = hmt(dynamic=True, summary="current")  # a summary read before every segment read
    x = tokens(6)
    model.train()
    model(x)
    lengths = [r.shape[1] - 2 - (2 if i else 0) for i, r in enumerate(bb.read[1::2])]  # text per segment read
    assert len(set(lengths)) > 1 and all(4 <= n <= 8 for n in lengths[:-1]) and sum(lengths) == 48
    first = list(lengths)
    bb.read.clear()
    model(x)  # the same window reads the same way (exact resume)
    assert [r.shape[1] - 2 - (2 if i else 0) for i, r in enumerate(bb.read[1::2])] == first
    bb.read.clear()
    model.eval()
    with torch.no_grad():
        model(x)
    assert [r.shape[1] for r in bb.read[1::2]] == [10] + [12] * 5  # evaluation: fixed segments

"""The LongMem memory bank: FAISS search equals an exact top-k, the FIFO keeps the newest
tokens, a document only ever retrieves from its own past, and the bank carries information."""

from __future__ import annotations

import pytest
import torch

from apps.main.transformer import LMTransformerArgs, build_model
from lingua.memory_bank import BankState, MemoryBank, exact_top_chunks, search
from lingua.segments import MemoryState, SegmentContext, document_ids, split_segments

BOS = 1


def _model(**extra):
    settings = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=40, max_seqlen=64, multiple_of=32,
                    bos_id=BOS, segment_length=8, use_external_memory=True, external_memory_size=16, chunk_size=4,
                    retrieval_k=8, retrieval_layer_index=1)
    return build_model(LMTransformerArgs(**{**settings, **extra})).double()


def _tokens(seed: int, shape=(2, 32)) -> torch.Tensor:
    t = torch.randint(2, 40, shape, generator=torch.Generator().manual_seed(seed))
    t[:, 0] = BOS
    return t


def test_faiss_search_equals_exact_top_k():
    g = torch.Generator().manual_seed(0)
    B, Hq, Hkv, L, C, D = 3, 4, 2, 5, 9, 16
    bank = BankState.empty(B, Hkv, C, 4, D, torch.zeros(1))
    bank.chunk_keys = torch.randn(B, Hkv, C, D, generator=g)
    bank.n_chunks = torch.tensor([9, 4, 0])
    q = torch.randn(B, Hq, L, D, generator=g)
    got = search(q, bank, 3)
    expected = exact_top_chunks(q, bank.chunk_keys.repeat_interleave(2, dim=1), bank.n_chunks, 3)
    assert torch.equal(got, expected)
    assert (got[2] == -1).all() and (got[1] < 4).all()


def _write(bank_module, k, v, bank, doc, segment_length):
    """Write each segment's keys/values through the module, as the model does."""
    state = None
    for seg in split_segments(doc, segment_length):
        ctx = SegmentContext(seg, MemoryState())
        state = bank_module.write(k[:, :, seg.start : seg.end], v[:, :, seg.start : seg.end], state, ctx)
    return state


def test_fifo_keeps_the_newest_tokens_of_the_document():
    bank_module = MemoryBank(n_heads=2, n_kv_heads=2, head_dim=3, external_memory_size=12, chunk_size=4, retrieval_k=4)
    T = 40
    pos = torch.arange(T, dtype=torch.float64)
    k = pos.view(1, 1, T, 1).expand(1, 2, T, 3).clone()  # each key holds its position
    doc = torch.ones(1, T, dtype=torch.long)
    bank = _write(bank_module, k, k.clone(), None, doc, 8)
    assert int(bank.n_chunks[0]) == 3 and int(bank.n_tokens()[0]) == 12
    kept = bank.keys[0, 0, :3, :, 0].flatten()
    assert kept.tolist() == list(range(T - 12, T)), "not the newest 12 tokens, oldest first"
    assert bank.chunk_keys[0, 0, :3, 0].tolist() == [29.5, 33.5, 37.5]  # mean key of each chunk


def test_a_new_document_starts_an_empty_bank():
    bank_module = MemoryBank(n_heads=2, n_kv_heads=2, head_dim=3, external_memory_size=32, chunk_size=4, retrieval_k=4)
    tokens = torch.full((1, 24), 5)
    tokens[0, 0], tokens[0, 13] = BOS, BOS  # document 2 starts inside the second segment
    doc = document_ids(tokens, BOS)
    pos = torch.arange(24, dtype=torch.float64)
    k = pos.view(1, 1, 24, 1).expand(1, 2, 24, 3).clone()
    bank = _write(bank_module, k, k.clone(), None, doc, 8)
    stored = bank.keys[0, 0, : int(bank.n_chunks[0])][bank.token_valid[0, : int(bank.n_chunks[0])]][:, 0]
    assert stored.tolist() == list(range(13, 24)), "the bank holds tokens of the previous document"


def test_a_token_never_sees_a_later_token():
    model = _model()
    x = _tokens(0)
    base = model(x)
    for t in (3, 9, 20):
        y = x.clone()
        y[:, t] = (y[:, t] + 7) % 38 + 2
        out = model(y)
        assert torch.equal(out[:, :t], base[:, :t]), f"changing token {t} changed an earlier position"


def test_the_bank_carries_information_to_later_segments():
    x = _tokens(1)
    y = x.clone()
    y[:, 2] = (y[:, 2] + 5) % 38 + 2
    with_bank, without = _model(), _model(use_external_memory=False)
    assert not torch.allclose(with_bank(x)[:, 16:], with_bank(y)[:, 16:])
    assert torch.equal(without(x)[:, 8:], without(y)[:, 8:])


@pytest.mark.parametrize("boundary", [5, 8, 19])
def test_no_leak_across_documents_or_rows(boundary):
    """Two rows, two documents per row: changing document A leaves B bit-identical, and each
    row computes as it would alone (no bank shared across the batch)."""
    model = _model()
    x = _tokens(2)
    x[:, boundary] = BOS
    y = x.clone()
    y[:, 1:boundary] = (y[:, 1:boundary] + 3) % 38 + 2
    a, b = model(x), model(y)
    assert torch.equal(a[:, boundary:], b[:, boundary:])
    alone = torch.cat([model(x[:1]), model(x[1:])])
    assert torch.allclose(alone, a, atol=1e-12)


def test_gate_starts_at_half_and_half():
    model = _model()
    gate = model.layers[1].attention.memory_bank.gate
    assert torch.equal(gate, torch.zeros_like(gate))
    assert model.layers[0].attention.memory_bank is None


def test_bank_settings_are_checked():
    for extra, key in (({"chunk_size": 3}, "model.chunk_size"), ({"retrieval_k": 6}, "model.retrieval_k"),
                       ({"external_memory_size": 2}, "model.external_memory_size"),
                       ({"retrieval_layer_index": 2}, "model.retrieval_layer_index")):
        with pytest.raises(ValueError, match=key):
            _model(**extra)


def test_hybrid_training_resumes_exactly(corpus, tmp_path, monkeypatch):
    """Slots and bank together through the trainer: a run killed after its step-4 save and
    resumed logs the same losses as an uninterrupted one (checkpoints hold no memory)."""
    from apps.main.train import TrainArgs, train
    from lingua.args import load_config
    from tests.conftest import read_losses, tiny_overrides, train_killed_after_first_save_then_resumed

    hybrid = {"model.segment_length": 8, "model.use_internal_memory": "true", "model.memory_slots": 4,
              "model.num_mem_heads": 2, "model.use_external_memory": "true", "model.external_memory_size": 16,
              "model.chunk_size": 4, "model.retrieval_k": 8, "model.retrieval_layer_index": 1,
              "data.load_async": "false", "checkpoint.eval.every": 4}
    args = lambda d: load_config(TrainArgs, tiny_overrides(corpus, d, steps=8, **hybrid))  # noqa: E731
    train(args(tmp_path / "whole"))
    train_killed_after_first_save_then_resumed(monkeypatch, lambda: args(tmp_path / "cut"))
    losses = read_losses(tmp_path / "whole")
    assert read_losses(tmp_path / "cut") == losses and len(losses) == 8


@pytest.mark.parametrize("kind", ["slots", "bank", "hybrid"])
def test_decoding_with_memory_equals_the_full_forward(kind):
    """Greedy tokens from the segment decoder (KV cache within a segment, memory across) are
    the full forward's argmax at every position, over several segments and a document start."""
    extra = {"slots": dict(use_external_memory=False, use_internal_memory=True, memory_slots=4, num_mem_heads=2),
             "bank": {}, "hybrid": dict(use_internal_memory=True, memory_slots=4, num_mem_heads=2)}[kind]
    model = _model(**extra)
    prompt = _tokens(5, (1, 11))
    prompt[0, 6] = BOS  # a second document starts inside the prompt
    decoder = model.new_segment_decoder(1)
    logits = decoder.feed(prompt)
    seq = prompt
    for _ in range(21):  # past two segment boundaries (8, 16, 24, 32)
        nxt = logits.argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
        logits = decoder.feed(nxt)
        full = model(seq)
        assert torch.allclose(full[:, -1], logits, atol=1e-9), f"decoder logits differ at length {seq.shape[1]}"
    full = model(seq)
    assert torch.equal(full[0, prompt.shape[1] - 1 : -1].argmax(-1), seq[0, prompt.shape[1]:])


@pytest.mark.parametrize("grad, depth, flows", [(False, 0, False), (True, 0, True), (True, 2, False)])
def test_external_memory_grad_lets_gradients_reach_the_cached_keys(grad, depth, flows):
    """Detached by default (LongMem); with external_memory_grad the last segment's loss reaches
    the keys cached after the first, unless bptt_depth truncates the state in between."""
    model = _model(external_memory_grad=grad, bptt_depth=depth)
    bank_module = model.layers[1].attention.memory_bank
    written = []
    real_write = bank_module.write

    def capture(*args, **kwargs):
        state = real_write(*args, **kwargs)
        if state.keys.requires_grad:
            state.keys.retain_grad()
        written.append(state)
        return state

    bank_module.write = capture
    try:
        model(_tokens(6, (1, 24)))[:, 16:].sum().backward()
    finally:
        del bank_module.write
    first = written[0].keys
    assert first.requires_grad == grad
    reached = first.grad is not None and first.grad.abs().sum() > 0
    assert reached == flows

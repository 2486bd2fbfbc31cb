"""Segments of a window and the memory state handed along them (LM2 slots, the LongMem bank, HMT).

A window of tokens is processed `segment_length` tokens at a time. Each memory module reads
the state earlier segments left and writes its update only after the segment, so no token sees
a later one. The state is an explicit `MemoryState` the caller passes from segment to segment;
modules keep nothing between calls.

Documents: a packed window holds several documents, each starting with BOS. Nothing crosses a
document boundary: local attention is masked to the token's own document, a token reads the
carried state only if it continues the document that state was written by (a document that
starts inside the segment reads the initial state), and the write after a segment covers only
the row's last document, on top of the carried state if that document was already under way,
else on top of the initial state. Every window starts from the initial state (tokens before the
window's first BOS continue a document whose start is in an earlier window, which is never
carried across training steps).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import torch


def document_ids(tokens: torch.Tensor, bos_id: int) -> torch.Tensor:
    """[B, S] -> [B, S] int: the index of each token's document within its row (0 for the
    tokens before the row's first BOS, the tail of a document begun in an earlier window)."""
    return torch.cumsum(tokens == bos_id, dim=1)


@dataclass
class Segment:
    """One segment of a window: its position and the masks that keep documents apart."""

    index: int
    start: int
    end: int
    doc: torch.Tensor  # [B, L] document index of each token
    carried: torch.Tensor  # [B, L] bool: the token continues the document the incoming state holds
    continues: torch.Tensor  # [B] bool: the row's last document here is the one the state holds
    last_doc: torch.Tensor  # [B, L] bool: tokens of the row's last document (what the write sees)

    @property
    def length(self) -> int:
        return self.end - self.start

    def attention_mask(self) -> torch.Tensor:
        """[B, 1, L, L] bool, True = attend: causal within the token's own document."""
        same_doc = self.doc[:, :, None] == self.doc[:, None, :]
        causal = torch.ones(self.length, self.length, dtype=torch.bool, device=self.doc.device).tril()
        return (same_doc & causal)[:, None]


def split_segments(doc: torch.Tensor, segment_length: int, carry_doc: Optional[torch.Tensor] = None) -> Iterator[Segment]:
    """The segments of a window whose tokens have document ids `doc` [B, S]. `carry_doc` [B]:
    the document the incoming state belongs to (None: nothing carried, the window's start)."""
    B, S = doc.shape
    if carry_doc is None:
        carry_doc = torch.full((B,), -1, dtype=doc.dtype, device=doc.device)
    for index, start in enumerate(range(0, S, segment_length)):
        end = min(start + segment_length, S)
        seg_doc = doc[:, start:end]
        last = seg_doc[:, -1]
        yield Segment(index, start, end, seg_doc, carried=seg_doc == carry_doc[:, None],
                      continues=last == carry_doc, last_doc=seg_doc == last[:, None])
        carry_doc = last


def select_rows(keep: torch.Tensor, carried: torch.Tensor, initial: torch.Tensor) -> torch.Tensor:
    """Per row of the batch: `carried` where keep[b], else `initial` (broadcast over the rest)."""
    return torch.where(keep.view(-1, *([1] * (carried.dim() - 1))), carried, initial)


@dataclass
class MemoryState:
    """What the memory modules carry from one segment to the next, by layer: `layers[i]` is the
    state block i's module wrote (None before its first write). Detached every `bptt_depth`
    segments, so gradients flow through at most that many segments of state."""

    layers: dict[Any, Any] = field(default_factory=dict)

    def get(self, key: Any) -> Any:
        return self.layers.get(key)

    def detached(self) -> "MemoryState":
        return MemoryState({k: _detach(v) for k, v in self.layers.items()})


def _detach(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, (tuple, list)):
        return type(value)(_detach(v) for v in value)
    if isinstance(value, dict):
        return {k: _detach(v) for k, v in value.items()}
    if hasattr(value, "detached"):
        return value.detached()
    return value


class SegmentContext:
    """Handed to every block for one segment: the segment, the state it reads, and the updates
    its modules write (collected here, applied by the caller after the segment).

    A plain class, not a dataclass, on purpose: FSDP2's pre-forward hook rebuilds dataclass
    arguments with dataclasses.replace (torch.distributed.utils._apply_to_tensors) when grad is
    enabled, so the blocks would write their updates into a copy and the state would be lost."""

    def __init__(self, segment: Segment, state: MemoryState, mask: Optional[torch.Tensor] = None,
                 writes: bool = True):
        self.segment, self.state = segment, state
        self.updates: dict[Any, Any] = {}
        # Made once for all blocks; decoding passes its own (one query against the cached keys).
        self.mask = segment.attention_mask() if mask is None else mask
        # False while decoding inside a segment: its memory is written once the segment is full.
        self.writes = writes

    def write(self, key: Any, value: Any) -> None:
        self.updates[key] = value

    def next_state(self, bptt_depth: int) -> MemoryState:
        """The state after this segment; detached at the end of every `bptt_depth` segments."""
        state = MemoryState({**self.state.layers, **self.updates})
        if bptt_depth > 0 and (self.segment.index + 1) % bptt_depth == 0:
            state = state.detached()
        return state

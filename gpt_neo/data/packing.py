"""Packing: documents into windows of n_ctx + 1 tokens, each document its own segment.

GPT-Neo joins documents with end-of-text and lets attention cross the joins. The `packed`
sampling mode instead places whole documents side by side in a window and numbers them
(segment ids 1, 2, ... in row order; 0 is padding), so that the model attends only within a
document and positions restart in each (`gpt_neo.models.attention`).

How a window is filled (greedy first-fit over a look-ahead of `LOOKAHEAD` documents, read in
the reader's order, so the result is a pure function of the seed and the data):
1. keep up to LOOKAHEAD documents pending, oldest first;
2. put the oldest pending document that fits in the room left, whole; repeat;
3. when none fits: a pending document longer than a whole window has to be cut anyway, so
   its next piece fills the room (each piece starts a segment); if there is none, the rest
   of the window is padding.
A window that is empty takes the oldest document whatever its length (cut if it is longer),
so no document waits more than one window once it is the oldest.

The position is small and exact: the reader's position before the oldest pending document,
how many documents were read since, which of those are still pending and how much of each
was used. Restoring re-reads those few documents; nothing else is saved.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from gpt_neo.data.batch import Batch

LOOKAHEAD = (
    64  # pending documents: the more, the less padding (bench/packing.py), the more to re-read
)


@dataclass
class Document:
    """A pending document: its tokens (and loss mask), how much of it is already packed, its
    number among the documents read since the anchor, and the reader's position before it."""

    tokens: np.ndarray
    loss_mask: np.ndarray | None
    ordinal: int
    before: dict
    used: int = 0

    @property
    def left(self) -> int:
        return self.tokens.size - self.used

    def take(self, count: int) -> tuple[np.ndarray, np.ndarray | None]:
        start, self.used = self.used, self.used + count
        mask = None if self.loss_mask is None else self.loss_mask[start : self.used]
        return self.tokens[start : self.used], mask


class Packer:
    """Windows of `length` tokens from `read()` -> (tokens, loss mask or None) documents, or
    None at the end of a finite source (training's readers never end: epochs follow).

    `position()` -> the reader's current position (a JSON-able dict) and `seek(position)`
    returns the reader to one: the packer's own state is built on them.
    """

    def __init__(
        self,
        read: Callable[[], tuple[np.ndarray, np.ndarray | None] | None],
        position: Callable[[], dict],
        seek: Callable[[dict], None],
        *,
        length: int,
        pad_id: int,
        lookahead: int | None = None,
    ):
        self._read, self._position, self._seek = read, position, seek
        self.length, self.pad_id = length, pad_id
        self.lookahead = LOOKAHEAD if lookahead is None else lookahead
        self.pending: list[Document] = []
        self.read_count = 0  # documents read since the anchor (the oldest pending one)
        self.ended = False

    def _fill(self) -> None:
        while len(self.pending) < self.lookahead and not self.ended:
            before = self._position()
            document = self._read()
            if document is None:
                self.ended = True
                break
            self.pending.append(Document(*document, self.read_count, before))
            self.read_count += 1

    def next_window(self) -> Batch | None:
        """One row: tokens, segments and (for fine-tuning documents) the loss mask; None
        when a finite source has nothing left."""
        tokens = np.full(self.length, self.pad_id, np.int32)
        segments = np.zeros(self.length, np.int32)
        mask = np.zeros(self.length, np.int32)
        has_mask, filled, segment = False, 0, 0
        while filled < self.length:
            self._fill()
            room = self.length - filled
            pick = next((i for i, d in enumerate(self.pending) if d.left <= room), None)
            if pick is None:
                pick = next((i for i, d in enumerate(self.pending) if d.left > self.length), None)
                if pick is None:
                    break  # nothing fits and nothing must be cut: pad the rest
            document = self.pending[pick]
            piece, piece_mask = document.take(min(room, document.left))
            segment += 1
            tokens[filled : filled + piece.size] = piece
            segments[filled : filled + piece.size] = segment
            if piece_mask is not None:
                mask[filled : filled + piece.size] = piece_mask
                has_mask = True
            filled += piece.size
            if document.left == 0:
                del self.pending[pick]
            if not self.pending and self.ended:
                break
        self._rebase()
        if filled == 0:
            return None
        return Batch(tokens, segments, mask if has_mask else None)

    def _rebase(self) -> None:
        """Count ordinals from the oldest pending document (the anchor), so they stay small."""
        if self.pending:
            first = self.pending[0].ordinal
            for document in self.pending:
                document.ordinal -= first
            self.read_count -= first

    # --- position ------------------------------------------------------------------------
    def state(self) -> dict:
        """The anchor (the reader's position before the oldest pending document, or its
        current position when nothing is pending), the documents read since, and which of
        them are pending with how much of each is packed."""
        anchor = self.pending[0].before if self.pending else self._position()
        return {
            "anchor": anchor,
            "read": self.read_count,
            "pending": [[d.ordinal, d.used] for d in self.pending],
        }

    def restore(self, state: dict) -> None:
        """Re-read the documents since the anchor and keep the pending ones as they were."""
        self._seek(state["anchor"])
        used = {int(ordinal): int(count) for ordinal, count in state["pending"]}
        self.pending, self.read_count = [], 0
        for ordinal in range(int(state["read"])):
            before = self._position()
            document = self._read()
            assert document is not None  # documents read before are there to read again
            if ordinal in used:
                self.pending.append(Document(*document, ordinal, before, used[ordinal]))
        self.read_count = int(state["read"])


def packing_figures(lengths: Iterable[int], length: int) -> tuple[float, float]:
    """(share of padding, mean documents per window) when documents of `lengths` tokens, in
    this order, are packed into windows of `length` (what `--check_dataset` reports)."""
    documents = iter(lengths)

    def read():
        size = next(documents, None)
        return None if size is None else (np.zeros(size, np.int32), None)

    packer = Packer(read, dict, lambda position: None, length=length, pad_id=0)
    windows = []
    while (window := packer.next_window()) is not None:
        windows.append(window.segments)
    if not windows:
        return 0.0, 0.0
    segments = np.stack(windows)
    return float((segments == 0).mean()), float(segments.max(axis=1).mean())

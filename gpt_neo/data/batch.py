"""What the input pipeline hands the training step: rows of n_ctx + 1 tokens, and, for packed
or fine-tuning data, what each token carries beside its id.

A batch is a pytree (a NamedTuple with optional fields), so the same `jit`, sharding and
placement code moves all of it: fields that a run's data never has are None, which is static
per config, so the step compiles once.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np


class Batch(NamedTuple):
    """Rows [batch, n_ctx + 1]; inputs are [:, :-1] and targets [:, 1:].

    `segments` (packed data): each token's document within its row, numbered from 1 in row
    order; 0 is padding. A target counts only where it continues its input's document.
    None: every row is one stream (GPT-Neo's modes, where attention crosses document joins).
    `loss_mask` (supervised fine-tuning records): 1 where a token is a target that counts
    (a completion), 0 where it is context only (a prompt). None: every target counts.
    """

    tokens: Any
    segments: Any = None
    loss_mask: Any = None


def as_batch(batch) -> Batch:
    """A `Batch`, or a bare token array [batch, n_ctx + 1] as one."""
    return batch if isinstance(batch, Batch) else Batch(batch)


def stack_rows(rows: list[Batch]) -> Batch:
    """Rows [n_ctx + 1] -> one batch; a field any row has is filled in for those without it
    (one segment, every target counting), so a mixture of packed and unpacked sources stacks."""

    def field(name: str, default: int):
        values = [getattr(row, name) for row in rows]
        if all(v is None for v in values):
            return None
        return np.stack(
            [
                np.full(row.tokens.shape, default, np.int32) if v is None else v
                for row, v in zip(rows, values, strict=True)
            ]
        )

    return Batch(
        np.stack([row.tokens for row in rows]), field("segments", 1), field("loss_mask", 1)
    )

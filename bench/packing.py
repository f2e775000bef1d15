"""Packing's worth on short documents: real tokens per second with `packed` rows against one
document per padded row and against GPT-Neo's join, in one invocation.

    python bench/packing.py [--steps 30] [--rounds 3] [--n_ctx 256]

The corpus: 20,000 synthetic documents whose lengths are log-normal with a median of n_ctx / 8
(sigma 1), each ending with end-of-text. Three ways to make rows of n_ctx + 1 tokens:
- packed: `gpt_neo.data.packing` (first-fit over its look-ahead), segment ids, no attention
  across documents;
- padded: one document per row, cut to the row, the rest padding (what `documents_fixed`
  with a loss mask would need to keep documents apart without segment ids);
- joined: GPT-Neo's `documents_*` modes, every token text, attention across documents.
The share of real tokens comes from the rows themselves; the step time from the project's
jitted train step on this CPU (2 layers, d128, 4 heads, global + local, vocab 4096, batch 8,
float32), with and without segment ids, alternating `--steps`-step intervals over `--rounds`
rounds (each side's best round kept). Targets: packed rows at least 95% real tokens, and the
packed step within 5% of the unpacked one.
"""

import argparse
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # a CPU figure unless asked: no TPU probing

import jax
import numpy as np

import gpt_neo
from gpt_neo.config import from_dict
from gpt_neo.data.batch import Batch
from gpt_neo.data.packing import Packer
from gpt_neo.training.trainer import Trainer

DOCUMENTS = 20_000
BATCH = 8


def corpus(n_ctx: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(np.log(n_ctx / 8), 1.0, DOCUMENTS).astype(int), 1, 8 * n_ctx)
    return [rng.integers(1, 4096, n).astype(np.int32) for n in lengths]


def packed_rows(documents: list[np.ndarray], length: int) -> list[Batch]:
    """Every document packed (end-of-text id 0 appended), in corpus order."""
    stream = iter(documents)

    def read():
        doc = next(stream, None)
        return None if doc is None else (np.append(doc, np.int32(0)), None)

    packer = Packer(read, dict, lambda position: None, length=length, pad_id=0)
    rows = []
    while (row := packer.next_window()) is not None:
        rows.append(row)
    return rows


def real_share_padded(documents: list[np.ndarray], length: int) -> float:
    kept = sum(min(doc.size + 1, length) for doc in documents)
    return kept / (len(documents) * length)


def step_seconds(args, packed_batch: Batch) -> dict[str, float]:
    cfg = from_dict(
        {
            "n_layer": 2,
            "n_embd": 128,
            "n_head": 4,
            "n_ctx": args.n_ctx,
            "n_vocab": 4096,
            "attention_types": ["global", "local"],
            "local_attention_radius": args.n_ctx // 4,
            "train_batch_size": BATCH,
            "train_steps": 1_000_000,
        }
    )
    trainer = Trainer(cfg, gpt_neo.make_mesh(cfg))
    unpacked_batch = Batch(packed_batch.tokens)
    best = {}
    with jax.set_mesh(trainer.mesh):
        sides = {
            "unpacked": [trainer.init_state(0), trainer.place(unpacked_batch)],
            "packed": [trainer.init_state(0), trainer.place(packed_batch)],
        }
        for _ in range(args.rounds):
            for name, side in sides.items():
                state, batch = side
                state, metrics = trainer.step(state, batch)  # compiled in the first round
                jax.block_until_ready(metrics)
                start = time.perf_counter()
                for _ in range(args.steps):
                    state, metrics = trainer.step(state, batch)
                jax.block_until_ready(metrics)
                seconds = (time.perf_counter() - start) / args.steps
                best[name] = min(best.get(name, np.inf), seconds)
                side[0] = state
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--n_ctx", type=int, default=256)
    args = parser.parse_args()
    length = args.n_ctx + 1
    documents = corpus(args.n_ctx)
    rows = packed_rows(documents, length)
    segments = np.stack([row.segments for row in rows])
    real = {
        "packed": float((segments != 0).mean()),
        "padded": real_share_padded(documents, length),
        "joined": 1.0,
    }
    median = int(np.median([doc.size + 1 for doc in documents]))
    print(
        f"corpus: {len(documents):,} documents, median {median} tokens (n_ctx {args.n_ctx}); "
        f"packed into {len(rows):,} rows, {segments.max(axis=1).mean():.1f} documents per row"
    )
    batch = Batch(np.stack([row.tokens for row in rows[:BATCH]]), segments[:BATCH].astype(np.int32))
    seconds = step_seconds(args, batch)
    tokens = BATCH * args.n_ctx
    rates = {
        "packed": real["packed"] * tokens / seconds["packed"],
        "padded": real["padded"] * tokens / seconds["unpacked"],
        "joined": real["joined"] * tokens / seconds["unpacked"],
    }
    for name in ("packed", "padded", "joined"):
        print(
            f"{name:>7}: {100 * real[name]:6.2f}% real tokens, {rates[name]:10,.0f} real tok/s"
            + ("  (attention crosses documents)" if name == "joined" else "")
        )
    ratio = seconds["packed"] / seconds["unpacked"]
    print(
        f"step time packed / unpacked: {ratio:.3f} ({1e3 * seconds['packed']:.1f} ms vs "
        f"{1e3 * seconds['unpacked']:.1f} ms, best of {args.rounds} rounds of {args.steps})"
    )
    print(
        f"packed / padded real tok/s: {rates['packed'] / rates['padded']:.2f}x; "
        f"packed / joined: {rates['packed'] / rates['joined']:.2f}"
    )
    verdicts = [
        ("packed rows >= 95% real tokens", real["packed"] >= 0.95),
        ("packed step within 5% of unpacked", ratio <= 1.05),
    ]
    for what, ok in verdicts:
        print(f"target {what}: {'met' if ok else 'MISSED'}")


if __name__ == "__main__":
    main()

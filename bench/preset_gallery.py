"""The presets in configs/ side by side: size, the smallest TPU v5e slice the auto layout's
memory planner fits each on, and training throughput on this machine's CPU where a step is
small enough to time.

    python bench/preset_gallery.py [--markdown-out FILE]

Parameters are counted as `gpt-neo summary` counts them (`gpt_neo.models.gpt.param_count`;
for MoE presets also the parameters active per token).

The slice column tries v5e slices in ascending size and keeps the first on which the best
candidate of the auto layout search (`gpt_neo.planning.auto_layout.choose` with
`compile_step=None`: ranked by the planner and the roofline, nothing compiled) fits the chip by
the planner's estimate. Each preset keeps its own train_batch_size, n_ctx and
tokens_per_mb_per_replica, with bfloat16 activations and recompute_grad true, and
`mesh_shape`/`layout`/`param_layout` set to "auto". The slices' devices come from
`gpt_neo.planning.aot.topology_devices` (libtpu, no TPU needed); a slice the TPU runtime does
not know (v5e:1x1 is tried) is left out.

The CPU column times the project's jitted train step (`Trainer.step`) on one CPU device,
as bench/train_throughput.py does: one step to compile and warm up, then timed rounds of a
few steps on one batch already placed, the best round kept (`TIMED`: 2 rounds of 3 steps for
the demo presets, 1 round of 2 steps for 125M, whose step takes about half a minute on two
cores). The preset's own config (precision, recompute_grad, batch) on mesh x:1, except where
the cell says otherwise (125M: batch 1). The larger presets are not timed.
"""

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax
import numpy as np

import gpt_neo
from gpt_neo import hardware
from gpt_neo.errors import ConfigError
from gpt_neo.mesh import make_mesh
from gpt_neo.models.gpt import param_count
from gpt_neo.planning import aot, auto_layout
from gpt_neo.training.trainer import Trainer

PRESETS = [
    "demo",
    "demo_moe",
    "gpt_neo_125M",
    "gpt_neo_1.3B",
    "gpt_neo_2.7B",
    "gpt3_350M",
    "gpt3_6.7B",
    "gpt3_13B",
    "llama_demo",
    "qwen3_demo",
    "llama_1B",
    "qwen3_1.7B",
]
SLICES = [
    "v5e:1x1",
    "v5e:2x2",
    "v5e:2x4",
    "v5e:4x4",
    "v5e:4x8",
    "v5e:8x8",
    "v5e:8x16",
    "v5e:16x16",
]
PLANNED = {
    "mesh_shape": "auto",
    "layout": "auto",
    "param_layout": "auto",
    "precision": "bfloat16",
    "recompute_grad": True,
}
ON_ONE_CPU = {"mesh_shape": "x:1", "layout": "batch:x"}
# Presets timed on the CPU: overrides beyond ON_ONE_CPU, what the cell says about them, and
# (steps per round, rounds). The whole script runs in about four minutes on two cores.
TIMED = {
    "demo": ({}, "", (3, 2)),
    "demo_moe": ({}, "", (3, 2)),
    "gpt_neo_125M": ({"train_batch_size": 1}, "batch 1", (2, 1)),
    "llama_demo": ({}, "", (3, 2)),
    "qwen3_demo": ({}, "", (3, 2)),
}
GIB = 2**30


def _human(n: int) -> str:
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{n / scale:.2f}{suffix}"
    return str(n)


def slices() -> tuple[list[tuple[str, list]], list[str]]:
    """(name, devices) of each slice in SLICES that the TPU runtime knows, and the names of
    those it does not."""
    known, unknown = [], []
    for name in SLICES:
        try:
            known.append((name, aot.topology_devices(name)))
        except ConfigError:
            unknown.append(name)
    return known, unknown


def smallest_slice(preset: str, known: list[tuple[str, list]]) -> tuple[str, str]:
    """Cells: the first slice of `known` on which the best auto layout fits by the planner,
    and that layout with its estimated memory per chip."""
    cfg = gpt_neo.load_config(preset, overrides=PLANNED)
    for name, devices in known:
        try:
            choice = auto_layout.choose(cfg, devices, compile_step=None)
        except ConfigError:  # no candidate passes the layout checks, or none fits
            continue
        best = choice.ranked[0]
        if best.tier == 0:  # fits by the planner's estimate, not merely within its error
            gib = best.memory.train_total / GIB
            return f"{name} ({len(devices)} chips)", f"{best.split.describe()}; {gib:.2f} GiB"
    return f"none up to {known[-1][0]}", "—"


def cpu_tokens_per_second(preset: str, overrides: dict, steps: int, rounds: int) -> float:
    """Tokens/s of the project's jitted train step on one CPU device, best of `rounds`."""
    cfg = gpt_neo.load_config(preset, overrides={**ON_ONE_CPU, **overrides})
    trainer = Trainer(cfg, make_mesh(cfg, devices=jax.devices("cpu")[:1]))
    tokens = np.random.default_rng(0).integers(
        0, cfg.n_vocab, (cfg.train_batch_size, cfg.n_ctx + 1), dtype=np.int32
    )
    state = trainer.init_state(0)
    best = float("inf")
    with jax.set_mesh(trainer.mesh):
        batch = trainer.place(tokens)
        state, metrics = trainer.step(state, batch)  # compile and warm up
        jax.block_until_ready(metrics)
        for _ in range(rounds):
            start = time.perf_counter()
            for _ in range(steps):
                state, metrics = trainer.step(state, batch)
            jax.block_until_ready(metrics)
            best = min(best, time.perf_counter() - start)
    return steps * cfg.train_batch_size * cfg.n_ctx / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--markdown-out", type=Path, help="also write the table to this file")
    args = parser.parse_args()
    known, unknown = slices()
    chip = known[0][1][0]
    rows = []
    for preset in PRESETS:
        cfg = gpt_neo.load_config(preset)
        total = param_count(cfg)
        params = f"{total:,} ({_human(total)})"
        if cfg.moe_layers:
            active = param_count(cfg, active=True)
            params += f"; active {active:,} ({_human(active)})"
        where, layout = smallest_slice(preset, known)
        if preset in TIMED:
            overrides, note, (steps, rounds) = TIMED[preset]
            rate = cpu_tokens_per_second(preset, overrides, steps, rounds)
            speed = f"{rate:,.0f}" + (f" ({note})" if note else "")
        else:
            speed = "—[^cpu]"
        rows.append(
            [
                preset,
                params,
                str(cfg.n_layer),
                str(cfg.n_embd),
                str(cfg.n_ctx),
                str(cfg.n_vocab),
                where,
                layout,
                speed,
            ]
        )
        print(f"{preset}: done", file=sys.stderr, flush=True)
    timing = "; ".join(
        f"{preset} best of {rounds} round(s) of {steps} steps"
        for preset, (_, _, (steps, rounds)) in TIMED.items()
    )
    skipped = f" ({', '.join(unknown)}: not a slice the TPU runtime knows)" if unknown else ""
    lines = [
        f"Presets in configs/. Smallest TPU slice (planner): the first of "
        f"{', '.join(n for n, _ in known)}{skipped} on which the best auto layout "
        '(mesh_shape/layout/param_layout "auto", ranked by the library\'s search without '
        f"compiling) fits a {chip.device_kind} chip's {hardware.memory_limit(chip) / GIB:.2f} "
        "GiB by the memory planner's estimate (not merely within its 10% error), at the "
        "preset's own train_batch_size, n_ctx and tokens_per_mb_per_replica, bfloat16 "
        "precision and recompute_grad true. CPU tok/s: the project's jitted train step on one "
        f"CPU device of this machine ({os.cpu_count()} cores), the preset's own precision and "
        f"batch on mesh x:1 unless the cell says otherwise; a warm-up step, then {timing}.",
        "",
        "| preset | parameters | n_layer | n_embd | n_ctx | n_vocab | smallest TPU slice "
        "(planner) | layout there; planner memory per chip | CPU tok/s (this machine) |",
        "|---|---:|---:|---:|---:|---:|---|---|---:|",
        *(f"| {' | '.join(row)} |" for row in rows),
        "",
        f"[^cpu]: too large to time on a {os.cpu_count()}-core CPU.",
    ]
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if args.markdown_out:
        args.markdown_out.write_text(text)


if __name__ == "__main__":
    main()

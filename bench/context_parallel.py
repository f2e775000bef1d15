"""Context parallelism on 8 simulated CPU devices: the ring's train step against the
all-gather's, in the same process, and where the planner says the ring starts to win.

    python bench/context_parallel.py [--n_ctx 2048] [--repeats 5]

1. Step time: one sequence of `n_ctx` tokens split over 8 devices (`layout` sequence:x), a
   small model with global and local layers, float32; each implementation's train step is
   compiled once, then timed `repeats` times, alternating the two (the machine is noisy). It
   prints the median step time of each and their ratio (ring / all_gather).
2. Crossover: for the 1.3B preset (rotary positions) with the sequence split 8 ways on v5e:4x4
   (16 chips: batch over the other 2, FSDP over all 16), bfloat16 and full remat, the planner's per-chip memory
   of each implementation at n_ctx 16k to 512k, and the longest that fits the chip's HBM:
   the all-gather holds every device's keys and values (and their float32 gradients) for a
   layer, the ring two chunks, so the ring fits longer sequences.
"""

import argparse
import os
import statistics
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax
import numpy as np

import gpt_neo
from gpt_neo.config import from_dict, load_config
from gpt_neo.training.memory import plan
from gpt_neo.training.trainer import Trainer

IMPLEMENTATIONS = ("all_gather", "ring")
V5E_HBM = int(15.75 * 2**30)  # per chip, as the TPU compiler reports it
GIB = 2**30


def small_model(n_ctx: int, implementation: str):
    return from_dict(
        {
            "n_embd": 256,
            "n_head": 8,
            "n_kv_head": 4,
            "n_layer": 4,
            "n_ctx": n_ctx,
            "n_vocab": 1024,
            "attention_types": [[["global", "local"], 2]],
            "local_attention_radius": 128,
            "rotary_emb": True,
            "train_batch_size": 1,
            "train_steps": 100,
            "mesh_shape": "x:8",
            "layout": "sequence:x",
            "context_parallel": implementation,
        },
        source="bench",
    )


def step_times(n_ctx: int, repeats: int) -> dict[str, list[float]]:
    runs = {}
    batch = np.random.default_rng(0).integers(0, 1024, (1, n_ctx + 1)).astype(np.int32)
    for name in IMPLEMENTATIONS:
        cfg = small_model(n_ctx, name)
        mesh = gpt_neo.make_mesh(cfg)
        trainer = Trainer(cfg, mesh)
        state = trainer.init_state(0)
        placed = trainer.place(batch)
        with jax.set_mesh(mesh):
            state, metrics = trainer.step(state, placed)  # compile
            jax.block_until_ready(metrics)
        runs[name] = (trainer, mesh, state, placed)
    times: dict[str, list[float]] = {name: [] for name in IMPLEMENTATIONS}
    for _ in range(repeats):
        for name, (trainer, mesh, state, placed) in runs.items():
            with jax.set_mesh(mesh):
                start = time.perf_counter()
                state, metrics = trainer.step(state, placed)
                jax.block_until_ready(metrics)
            times[name].append(time.perf_counter() - start)
            runs[name] = (trainer, mesh, state, placed)
    return times


def crossover() -> None:
    base = load_config("configs/gpt_neo_1.3B.json").replace(
        precision="bfloat16",
        recompute_grad=True,
        train_batch_size=2,
        mesh_shape="x:2,y:8",
        layout="batch:x,sequence:y",
        param_layout="embd:x+y",
        rotary_emb=True,  # a learned position table would be 0.5B parameters at 256k
    )
    print("\n1.3B (rotary), sequence split 8 ways on v5e:4x4 (15.75 GiB per chip), planner:")
    print("| n_ctx | all_gather | ring |")
    print("|---|---|---|")
    longest = dict.fromkeys(IMPLEMENTATIONS, 0)
    for n_ctx in (16384, 32768, 65536, 131072, 262144, 524288):
        cells = []
        for name in IMPLEMENTATIONS:
            total = plan(base.replace(n_ctx=n_ctx, context_parallel=name)).train_total
            cells.append(f"{total / GIB:.2f} GiB")
            if total <= V5E_HBM:
                longest[name] = n_ctx
        print(f"| {n_ctx} | " + " | ".join(cells) + " |")
    print("longest n_ctx that fits: " + ", ".join(f"{k} {v}" for k, v in longest.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n_ctx", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    times = step_times(args.n_ctx, args.repeats)
    medians = {name: statistics.median(t) for name, t in times.items()}
    print(f"one sequence of {args.n_ctx} tokens over 8 CPU devices (sequence:x), 4 layers:")
    for name, median in medians.items():
        print(f"  {name:10s} median step {median * 1e3:7.1f} ms  ({len(times[name])} steps)")
    print(f"ring / all_gather: {medians['ring'] / medians['all_gather']:.2f}x")
    crossover()


if __name__ == "__main__":
    main()

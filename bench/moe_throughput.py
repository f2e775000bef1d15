"""MoE training throughput, one invocation on the CPU:

1. an MoE model (8 experts, top-2, MoE every other layer) against the dense model with the
   same active FLOPs per token (each expert's hidden layer is half the dense MLP's, and a token
   uses two experts), on one device: train tokens/s of each and their ratio;
2. the same MoE model on 8 simulated devices, data-parallel 8 ways, with the experts split 4
   ways (`experts:y`, tokens move with an all-to-all) against not split: tokens/s and ratio;
3. the fraction of (token, expert) assignments dropped at capacity factors 1.0 / 1.25 / 2.0
   (the first steps of training on the same batch).

    python bench/moe_throughput.py [--steps 3] [--rounds 3] [--gating top_2]
"""

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
)

import jax
import numpy as np
from train_throughput import ours  # bench/ (this script's folder is on sys.path)

from gpt_neo.config import from_dict
from gpt_neo.mesh import parse_mesh_shape
from gpt_neo.models.gpt import flops_per_token, param_count

BATCH = 16
DENSE = dict(
    n_layer=4,
    n_embd=256,
    n_head=4,
    n_ctx=256,
    n_vocab=4096,
    attention_types=["global", "local"] * 2,
    local_attention_radius=64,
    train_batch_size=BATCH,
    lr=1e-3,
)


def moe_keys(gating: str, factor: float = 1.25) -> dict:
    return {
        **DENSE,
        "moe_layers": [1, 3],
        "moe_params": {
            "moe_num_experts": 8,
            "moe_hidden_size": 2 * DENSE["n_embd"],  # two of them = the dense 4 * n_embd
            "moe_group_size": DENSE["n_ctx"],
            "moe_gating": gating,
            "moe_capacity_factor_train": factor,
        },
    }


def stepper(keys: dict, mesh_shape: str, layout: str, tokens):
    cfg = from_dict({**keys, "mesh_shape": mesh_shape, "layout": layout})
    return cfg, ours(cfg, tokens, devices=int(np.prod(list(parse_mesh_shape(mesh_shape).values()))))


def race(sides: dict, steps: int, rounds: int, tokens_per_step: int) -> dict:
    """Best tokens/s of each side over alternating rounds (noise only ever slows a side)."""
    for step in sides.values():
        step()  # compile
    best = dict.fromkeys(sides, 0.0)
    for _ in range(rounds):
        for name, step in sides.items():
            start = time.perf_counter()
            for _ in range(steps):
                step()
            rate = steps * tokens_per_step / (time.perf_counter() - start)
            best[name] = max(best[name], rate)
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="steps per timed round")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per side")
    parser.add_argument("--gating", default="top_2", help="top_2, rand_1 or dropless_top_k")
    args = parser.parse_args()
    tokens = np.random.default_rng(0).integers(0, DENSE["n_vocab"], (BATCH, DENSE["n_ctx"] + 1))
    tokens = tokens.astype(np.int32)
    per_step = BATCH * DENSE["n_ctx"]
    print(
        f"backend {jax.default_backend()}, {os.cpu_count()} cores, batch {BATCH} x {DENSE['n_ctx']}"
    )

    moe_cfg, moe_step = stepper(moe_keys(args.gating), "x:1", "batch:x", tokens)
    dense_cfg, dense_step = stepper(DENSE, "x:1", "batch:x", tokens)
    print(
        f"MoE: {param_count(moe_cfg):,} parameters, {param_count(moe_cfg, active=True):,} active; "
        f"dense: {param_count(dense_cfg):,}; training FLOPs/token "
        f"{flops_per_token(moe_cfg) / 1e6:.1f}M vs {flops_per_token(dense_cfg) / 1e6:.1f}M"
    )
    best = race({"moe": moe_step, "dense": dense_step}, args.steps, args.rounds, per_step)
    print(
        f"1 device   MoE ({args.gating}) {best['moe']:>8,.0f} tok/s | dense, same active FLOPs "
        f"{best['dense']:>8,.0f} tok/s | MoE step time / dense {best['dense'] / best['moe']:.2f}x"
    )

    split = stepper(moe_keys(args.gating), "x:2,y:4", "batch:x+y,experts:y", tokens)[1]
    whole = stepper(moe_keys(args.gating), "x:2,y:4", "batch:x+y", tokens)[1]
    best = race({"split": split, "whole": whole}, args.steps, args.rounds, per_step)
    print(
        f"8 devices  experts split 4 ways (batch:x+y,experts:y) {best['split']:>8,.0f} tok/s | "
        f"not split {best['whole']:>8,.0f} tok/s | split / not split {best['split'] / best['whole']:.2f}x"
    )

    if args.gating != "dropless_top_k":
        for factor in (1.0, 1.25, 2.0):
            step = stepper(moe_keys(args.gating, factor), "x:1", "batch:x", tokens)[1]
            metrics = [step() for _ in range(3)]
            dropped = [np.mean([float(m[k]) for k in m if k.endswith("/dropped")]) for m in metrics]
            print(
                f"capacity factor {factor:<4}: dropped {', '.join(f'{100 * d:.1f}%' for d in dropped)} "
                "of assignments (steps 1-3, mean over MoE layers)"
            )


if __name__ == "__main__":
    main()

"""Compile time against depth: the train step of the 125M shape at 12, 24 and 48 layers, its
layers unrolled by a Python loop (`scan_layers: false`) against one `lax.scan` over stacked
parameters (the default), compiled for this machine's CPU and, without a TPU, for a TPU v5e:2x2
(libtpu's compiler, as `gpt_neo.planning.aot` does).

    python bench/compile_time.py [--layers 12 24 48] [--targets cpu tpu]

Each row prints compile seconds (lowering included), the compiled program's temporaries per
device, and its FLOPs per device (XLA counts a loop's body once; `aot` scales the layer loop's
repeats by the model's FLOPs for them), loop and scan side by side, and the ratios that the
targets are stated in: scan/loop at each depth, and each mode's 48-layer time over its
12-layer time. Every run: GPT-Neo 125M's shape with its alternating global/local layers,
global batch 32 x 2048, bfloat16, full remat, AdamW, data parallel over the 4 chips (one CPU
device on CPU). One process compiles everything, so the figures share the machine's state;
a first compile warms the compiler up, and each cell keeps the fastest of `--rounds`.
"""

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax

from gpt_neo.config import load_config
from gpt_neo.planning import aot

REPO = Path(__file__).resolve().parent.parent
COMMON = {"train_batch_size": 32, "precision": "bfloat16", "recompute_grad": True}
GIB = 2**30


def config(layers: int, scan: bool, target: str):
    cfg = load_config(str(REPO / "configs/gpt_neo_125M.json"))
    mesh = {"mesh_shape": "x:4", "layout": "batch:x"} if target == "tpu" else {"mesh_shape": "x:1"}
    return cfg.replace(
        **COMMON,
        **mesh,
        n_layer=layers,
        attention_types=[[["global", "local"], layers // 2]],
        scan_layers=scan,
    )


def devices(target: str) -> list:
    return aot.topology_devices("v5e:2x2") if target == "tpu" else jax.devices("cpu")[:1]


def measure(layers: int, scan: bool, target: str, rounds: int) -> aot.Compiled:
    """The fastest of `rounds` compiles (compile times vary by tens of percent run to run)."""
    results = []
    for _ in range(rounds):
        jax.clear_caches()  # nothing carried from the previous compile
        results.append(aot.compile_train_step(config(layers, scan, target), devices(target)))
    return min(results, key=lambda c: c.seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", nargs="+", type=int, default=[12, 24, 48])
    parser.add_argument("--targets", nargs="+", choices=["cpu", "tpu"], default=["cpu", "tpu"])
    parser.add_argument("--rounds", type=int, default=2, help="compiles per cell; the fastest kept")
    args = parser.parse_args()
    print(
        "| target | layers | loop: compile | scan: compile | scan/loop | loop: temporaries | "
        "scan: temporaries | loop: FLOPs | scan: FLOPs |"
    )
    print("|" + "---|" * 9)
    start = time.perf_counter()
    for target in args.targets:
        first: dict[bool, float] = {}
        measure(min(args.layers), True, target, 1)  # the compiler's own start-up, not timed
        for layers in args.layers:
            loop = measure(layers, False, target, args.rounds)
            scan = measure(layers, True, target, args.rounds)
            for mode, c in ((False, loop), (True, scan)):
                first.setdefault(mode, c.seconds)
            print(
                f"| {target} | {layers} | {loop.seconds:.1f} s | {scan.seconds:.1f} s | "
                f"{scan.seconds / loop.seconds:.2f} | {loop.temporaries / GIB:.2f} GiB | "
                f"{scan.temporaries / GIB:.2f} GiB | {loop.flops:.3e} | {scan.flops:.3e} |",
                flush=True,
            )
        deepest, shallowest = max(args.layers), min(args.layers)
        last = {False: loop.seconds, True: scan.seconds}
        print(
            f"| {target} | {deepest}/{shallowest} | {last[False] / first[False]:.2f}x | "
            f"{last[True] / first[True]:.2f}x | | | | | |",
            flush=True,
        )
    print(f"jax {jax.__version__}; {time.perf_counter() - start:.0f} s in all", file=sys.stderr)


if __name__ == "__main__":
    main()

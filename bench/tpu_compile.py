"""Compiled per-device memory and FLOPs of our train step on a TPU v5e:2x2, for the 125M and
1.3B presets under data-parallel, FSDP and data x tensor layouts, next to the memory planner's
estimate and (with --maxtext_python) MaxText's own compile of the same model on the same slice.

No TPU is needed: libtpu compiles for the slice on this machine (see gpt_neo/aot.py).

    python bench/tpu_compile.py [--sizes 125M 1.3B] [--maxtext_python /path/to/venv/bin/python]

Every run: global batch 32 x 2048, bfloat16 activations, float32 weights, full remat
(`recompute_grad`), Adam with decoupled weight decay (AdamW). MaxText runs its `gpt3` decoder
unscanned (its scanned layers cost more temporaries and hide FLOPs in the loop body) in a side
environment: bench/maxtext_side.py says how to make one.
"""

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from maxtext_side import maxtext_compile  # bench/maxtext_side.py (this folder is on sys.path)

from gpt_neo import aot
from gpt_neo.config import load_config
from gpt_neo.planner import plan

PRESETS = {"125M": "configs/gpt_neo_125M.json", "1.3B": "configs/gpt_neo_1.3B.json"}
COMMON = {"train_batch_size": 32, "precision": "bfloat16", "recompute_grad": True}
LAYOUTS = {  # ours, and MaxText's name for the same layout (None: no counterpart run)
    "data x:4": ({"mesh_shape": "x:4", "layout": "batch:x"}, "dp"),
    "FSDP x:4": ({"mesh_shape": "x:4", "layout": "batch:x", "param_layout": "embd:x"}, "fsdp"),
    "data x tensor x:2,y:2": (
        {
            "mesh_shape": "x:2,y:2",
            "layout": "batch:x,heads:y,intermediate_expanded:y,vocab:y",
        },
        None,
    ),
}
GIB = 2**30


def ours(size: str, layout: dict, devices) -> dict:
    cfg = load_config(PRESETS[size]).replace(**COMMON, **layout)
    estimate = plan(cfg).train_total / GIB
    try:
        c = aot.compile_train_step(cfg, devices)
    except aot.DoesNotFit as err:
        return {"estimate": estimate, "error": f"does not fit: {str(err)[:90]}"}
    return {
        "estimate": estimate,
        "args": c.arguments / GIB,
        "temp": c.temporaries / GIB,
        "flops": c.flops,
        "seconds": c.seconds,
    }


def theirs(python: str, size: str, layout: str) -> dict:
    try:
        r = maxtext_compile(python, size, layout, scan=False)
    except RuntimeError as err:
        if "HBM" in str(err) or "RESOURCE_EXHAUSTED" in str(err):
            return {"error": "does not fit"}
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        print(f"MaxText {size} {layout}: {lines[-1] if lines else err}", file=sys.stderr)
        return {"error": "failed (reason on stderr)"}
    return {
        "args": r["arguments"] / GIB,
        "temp": r["temporaries"] / GIB,
        "flops": r["flops"],
        "seconds": r["seconds"],
    }


def cells(r: dict | None) -> str:
    if r is None:
        return "- | - | - | -"
    if "error" in r:
        return f"{r['error']} | - | - | -"
    return (
        f"{r['args']:.2f} + {r['temp']:.2f} = {r['args'] + r['temp']:.2f} GiB | "
        f"{r['flops']:.3e} | {r['seconds']:.0f} s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", choices=sorted(PRESETS), default=sorted(PRESETS))
    parser.add_argument("--maxtext_python", help="the side venv's python (bench/maxtext_side.py)")
    args = parser.parse_args()
    devices = aot.topology_devices("v5e:2x2")
    hbm = aot.hbm_bytes(devices) / GIB
    print(f"TPU v5e:2x2 (HBM {hbm:.2f} GiB per chip), batch 32 x 2048, bfloat16, full remat, AdamW")
    print(
        "| model | layout | planner | ours: args + temp | ours: FLOPs | ours: compile | "
        "MaxText: args + temp | MaxText: FLOPs | MaxText: compile |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for size in args.sizes:
        for name, (layout, maxtext_layout) in LAYOUTS.items():
            mine = ours(size, layout, devices)
            other = None
            if args.maxtext_python and maxtext_layout:
                other = theirs(args.maxtext_python, size, maxtext_layout)
            elif maxtext_layout:
                other = {"error": "not run (no --maxtext_python)"}
            mine_cells = " | ".join(cells(mine).split(" | ")[:3])
            other_cells = " | ".join(cells(other).split(" | ")[:3])
            print(
                f"| {size} | {name} | {mine['estimate']:.2f} GiB | {mine_cells} | {other_cells} |"
            )


if __name__ == "__main__":
    main()

"""The memory planner (`gpt_neo.planner`) against the TPU compiler's memory_analysis, for the
presets in configs/ under several layouts: the table behind "within 10%".

    python bench/memory_planner.py [--presets gpt_neo_125M gpt3_350M ...] [--topology v5e:2x2]

Each row compiles the real train step for the slice on this machine (libtpu; no TPU needed):
global batch 32 x n_ctx, bfloat16 activations, full remat unless the layout says otherwise.
Large presets take minutes per compile on a small machine. The test suite runs the 125M rows
(tests/test_planner.py).

The planner's measured terms (the MLP's five buffers, how far saved activations and gradients
overlap, the microbatch loop's gradient buffers) were fitted to the first four layouts' rows, to
the 2-microbatch rows and to the auto-layout choices for 2.7B (FSDP) and 125M at batch 1024;
FSDP x data x tensor was left out of the fit and checks it.
"""

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from gpt_neo import aot
from gpt_neo.config import load_config
from gpt_neo.planner import plan

COMMON = {"train_batch_size": 32, "precision": "bfloat16", "recompute_grad": True}
LAYOUTS = {
    "data x:4": {"mesh_shape": "x:4", "layout": "batch:x"},
    "FSDP x:4": {"mesh_shape": "x:4", "layout": "batch:x", "param_layout": "embd:x"},
    "data x tensor x:2,y:2": {
        "mesh_shape": "x:2,y:2",
        "layout": "batch:x,heads:y,intermediate_expanded:y,vocab:y",
    },
    "data x:4, no remat": {"mesh_shape": "x:4", "layout": "batch:x", "recompute_grad": False},
    # microbatches: 125M's row set the planner's gradient buffers for the loop; the rest check
    "FSDP x:4, 2 microbatches": {
        "mesh_shape": "x:4",
        "layout": "batch:x",
        "param_layout": "embd:x",
        "tokens_per_mb_per_replica": 4 * 2048,  # 4 of each replica's 8 sequences: 2 microbatches
    },
    "data x:4, 2 microbatches": {
        "mesh_shape": "x:4",
        "layout": "batch:x",
        "tokens_per_mb_per_replica": 4 * 2048,
    },
    "FSDP x data x tensor x:2,y:2": {
        "mesh_shape": "x:2,y:2",
        "layout": "batch:x,heads:y,intermediate_expanded:y,vocab:y",
        "param_layout": "embd:x",
    },
}
GIB = 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--presets",
        nargs="+",
        default=["gpt_neo_125M", "gpt3_350M", "gpt_neo_1.3B", "gpt_neo_2.7B"],
    )
    parser.add_argument("--layouts", nargs="+", choices=sorted(LAYOUTS), default=sorted(LAYOUTS))
    parser.add_argument("--topology", default="v5e:2x2")
    args = parser.parse_args()
    devices = aot.topology_devices(args.topology)
    print(f"{args.topology}: {len(devices)} x {devices[0].device_kind}")
    print("| preset | layout | planner | compiled (args + temp) | planner / compiled | compile |")
    print("|---|---|---|---|---|---|")
    for preset in args.presets:
        for name in args.layouts:
            cfg = load_config(f"configs/{preset}.json").replace(**{**COMMON, **LAYOUTS[name]})
            estimate = plan(cfg).train_total / GIB
            try:
                c = aot.compile_train_step(cfg, devices)
            except aot.DoesNotFit:
                print(f"| {preset} | {name} | {estimate:.2f} GiB | does not fit | - | - |")
                continue
            total = c.total / GIB
            print(
                f"| {preset} | {name} | {estimate:.2f} GiB | {c.arguments / GIB:.2f} + "
                f"{c.temporaries / GIB:.2f} = {total:.2f} GiB | {estimate / total - 1:+.1%} | "
                f"{c.seconds:.0f} s |",
                flush=True,
            )


if __name__ == "__main__":
    main()

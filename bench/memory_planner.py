"""The memory planner (`gpt_neo.training.memory`) against the TPU compiler's memory_analysis, for the
presets in configs/ under several layouts: the table behind "within 10%".

    python bench/memory_planner.py [--presets gpt_neo_125M gpt3_350M ...] [--topology v5e:2x2]
                                   [--layouts data fsdp tensor ...] [--least_memory]

The layouts scale with the slice: on v5e:4x4, `fsdp` is FSDP over x:16 and `tensor` is data
x:8 by tensor y:2 (6.7B and 13B need 16 chips).

Each row compiles the real train step for the slice on this machine (libtpu; no TPU needed):
global batch 32 x n_ctx, bfloat16 activations, full remat unless the layout says otherwise.
Large presets take minutes per compile on a small machine. The test suite runs the 125M rows
(tests/training/test_memory.py).

The planner's measured terms (the MLP's five buffers, how far saved activations and gradients
overlap, the microbatch loop's gradient buffers) were fitted to the first four layouts' rows, to
the 2-microbatch rows and to the auto-layout choices for 2.7B (FSDP) and 125M at batch 1024;
FSDP x data x tensor was left out of the fit and checks it.

    python bench/memory_planner.py --verdict [--rows 0 3 ...]

prints the verdict table instead: for every row of `VERDICT_ROWS` (the presets up to 13B on
v5e:2x2, v5e:4x4, a v5p slice, v4:2x2x1 as its VMs see it, and 2 slices of v5e:2x2), whether
the planner says the train step fits the chip's HBM, and whether it fits when compiled under
the TPU scheduler's lowest memory limit (the auto layout's confirmation). The planner must
never say "fits" where that compile does not.
"""

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from gpt_neo import axes, hardware
from gpt_neo.config import load_config
from gpt_neo.mesh import mesh_axes, pieces, rules
from gpt_neo.planning import aot, roofline
from gpt_neo.training.memory import plan

COMMON = {"train_batch_size": 32, "precision": "bfloat16", "recompute_grad": True}


def layouts(n: int, slices: int = 1) -> dict[str, tuple[str, dict]]:
    """The layouts compared, by key: (name, config keys) for a slice of `n` chips."""
    tensor = "batch:x,heads:y,intermediate_expanded:y,vocab:y"
    data = {"mesh_shape": f"x:{n}", "layout": "batch:x"}
    fsdp = {**data, "param_layout": "embd:x"}
    tensor_mesh = {"mesh_shape": f"x:{n // 2},y:2", "layout": tensor}
    return {
        "data": (f"data x:{n}", data),
        "fsdp": (f"FSDP x:{n}", fsdp),
        "tensor": (f"data x tensor x:{n // 2},y:2", tensor_mesh),
        "no-remat": (f"data x:{n}, no remat", {**data, "recompute_grad": False}),
        # the layers unrolled instead of scanned (scan_layers; gpt_neo.models.stack)
        "unrolled": (f"data x:{n}, layers unrolled", {**data, "scan_layers": False}),
        "fsdp-unrolled": (f"FSDP x:{n}, layers unrolled", {**fsdp, "scan_layers": False}),
        # microbatches: 125M's row set the planner's gradient buffers for the loop; the rest check
        "fsdp-micro": (f"FSDP x:{n}, 2 microbatches", {**fsdp, "microbatches": 2}),
        "data-micro": (f"data x:{n}, 2 microbatches", {**data, "microbatches": 2}),
        "fsdp-tensor": (
            f"FSDP x data x tensor x:{n // 2},y:2",
            {**tensor_mesh, "param_layout": "embd:x"},
        ),
        # MoE presets only: the experts split over the data axis (expert parallelism)
        "experts": (f"data x:{n}, experts on x", {**data, "layout": "batch:x,experts:x"}),
        # several slices: data parallel across them, FSDP inside each
        "slices": (
            f"{slices} slices x FSDP x:{n // slices}",
            {
                "mesh_shape": f"slice:{slices},x:{n // slices}",
                "dcn_axes": "slice",
                "layout": "batch:slice+x",
                "param_layout": "embd:x",
            },
        ),
    }


# (preset, topology, slices, layout): the verdict table's rows
VERDICT_ROWS = [
    *[
        (p, "v5e:2x2", 1, k)
        for p in ("gpt_neo_125M", "gpt3_350M", "gpt_neo_1.3B", "gpt_neo_2.7B")
        for k in ("data", "fsdp", "tensor")
    ],
    *[(p, "v5e:4x4", 1, k) for p in ("gpt3_6.7B", "gpt3_13B") for k in ("fsdp", "fsdp-tensor")],
    *[(p, "v5p:2x2x2", 1, "fsdp") for p in ("gpt3_6.7B", "gpt3_13B")],
    ("gpt3_350M", "v4:2x2x1", 1, "tensor"),
    *[(p, "v5e:2x2", 2, "slices") for p in ("gpt_neo_125M", "gpt_neo_1.3B", "gpt_neo_2.7B")],
]


def verdict_table(rows: list[int]) -> None:
    """The planner's fits / does-not-fit against the least-memory compile's, row by row."""
    print(
        "| preset | slice | layout | planner | compiled (least memory) | planner / compiled "
        "| HBM | planner says | compiler says | agree |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|", flush=True)
    for i in rows:
        preset, topology, slices, key = VERDICT_ROWS[i]
        devices = aot.topology_devices(topology, slices)
        name, layout = layouts(len(devices), slices)[key]
        cfg = config(preset, layout)
        hbm = aot.hbm_bytes(devices)
        assert hbm is not None
        estimate = plan(cfg).train_total
        try:
            c = aot.compile_train_step(cfg, devices, least_memory=True)
            compiled, compiled_fits = f"{c.total / GIB:.2f} GiB", c.total <= hbm
            ratio = f"{estimate / c.total - 1:+.1%}"
        except aot.DoesNotFit:
            compiled, compiled_fits, ratio = "does not fit", False, "-"
        planner_fits = estimate <= hbm
        agree = (
            "yes"
            if planner_fits == compiled_fits
            else ("NO: planner says fits" if planner_fits else "no (planner cautious)")
        )
        where = topology + (f" x {slices}" if slices > 1 else "")
        if slices > 1 and compiled_fits:  # what crosses slices: the roofline against the program
            sent = roofline.all_reduce_bytes(sum(size for _, size in c.dcn.values()), slices)
            dcn = roofline.estimate(
                cfg, hardware.chip(devices[0].device_kind) or hardware.UNKNOWN
            ).dcn_bytes
            name += (
                f" (DCN per chip: planner {dcn / 2**20:.0f} MiB, compiled {sent / 2**20:.0f} MiB)"
            )
        print(
            f"| {preset} | {where} | {name} | {estimate / GIB:.2f} GiB | {compiled} | {ratio} | "
            f"{hbm / GIB:.2f} GiB | {'fits' if planner_fits else 'does not fit'} | "
            f"{'fits' if compiled_fits else 'does not fit'} | {agree} |",
            flush=True,
        )


def config(preset: str, layout: dict):
    """The preset at batch 32 x n_ctx with `layout`; `microbatches` becomes the number of
    tokens per microbatch and replica that makes that many."""
    layout = dict(layout)
    micro = layout.pop("microbatches", None)
    cfg = load_config(f"configs/{preset}.json").replace(**COMMON, **layout)
    if micro:
        replicas = pieces(mesh_axes(cfg), rules(cfg).activations, axes.BATCH)
        per_replica = cfg.train_batch_size // replicas
        cfg = cfg.replace(tokens_per_mb_per_replica=per_replica // micro * cfg.n_ctx)
    return cfg


GIB = 2**30


def compared(estimate: float, c: aot.Compiled) -> tuple[str, str]:
    """Table cells: the compiled memory (args + temp = total) and the estimate's error."""
    total = c.total / GIB
    return (
        f"{c.arguments / GIB:.2f} + {c.temporaries / GIB:.2f} = {total:.2f} GiB",
        f"{estimate / total - 1:+.1%}",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--presets",
        nargs="+",
        default=["gpt_neo_125M", "gpt3_350M", "gpt_neo_1.3B", "gpt_neo_2.7B"],
    )
    keys = list(layouts(4))
    parser.add_argument("--layouts", nargs="+", choices=keys, default=keys)
    parser.add_argument("--topology", default="v5e:2x2")
    parser.add_argument(
        "--least_memory",
        action="store_true",
        help="also compile each row under the scheduler's lowest memory limit (twice the "
        "compile time): the least memory the program needs, next to what the compiler spends "
        "by default, when HBM is free (gpt_neo.planning.aot.LEAST_MEMORY_OPTIONS)",
    )
    parser.add_argument(
        "--verdict", action="store_true", help="print the verdict table (VERDICT_ROWS) instead"
    )
    parser.add_argument("--rows", nargs="+", type=int, help="with --verdict: these rows only")
    args = parser.parse_args()
    if args.verdict:
        verdict_table(args.rows or list(range(len(VERDICT_ROWS))))
        return
    devices = aot.topology_devices(args.topology)
    table = layouts(len(devices))
    print(f"{args.topology}: {len(devices)} x {devices[0].device_kind}")
    least = " compiled, least memory | planner / least |" if args.least_memory else ""
    print(
        f"| preset | layout | planner | compiled (args + temp) | planner / compiled |{least} compile |"
    )
    print("|---|---|---|---|---|---|" + "---|---|" * args.least_memory, flush=True)
    for preset in args.presets:
        for key in args.layouts:
            name, layout = table[key]
            cfg = config(preset, layout)
            if key == "experts" and not cfg.moe_layers:
                continue
            estimate = plan(cfg).train_total / GIB
            try:
                c = aot.compile_train_step(cfg, devices)
            except aot.DoesNotFit:
                print(f"| {preset} | {name} | {estimate:.2f} GiB | does not fit | - | - |")
                continue
            cells = [f"{estimate:.2f} GiB", *compared(estimate, c)]
            seconds = c.seconds
            if args.least_memory:
                lean = aot.compile_train_step(cfg, devices, least_memory=True)
                cells += compared(estimate, lean)
                seconds += lean.seconds
            print(f"| {preset} | {name} | {' | '.join(cells)} | {seconds:.0f} s |", flush=True)


if __name__ == "__main__":
    main()

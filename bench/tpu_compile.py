"""Compiled per-device memory and FLOPs of our train step on a TPU v5e:2x2, for the 125M and
1.3B presets under data-parallel, FSDP and data x tensor layouts, next to the memory planner's
estimate and (with --maxtext_python) MaxText's own compile of the same model on the same slice.

No TPU is needed: libtpu compiles for the slice on this machine (see gpt_neo/planning/aot.py).

    python bench/tpu_compile.py [--sizes 125M 1.3B] [--maxtext_python /path/to/venv/bin/python]
                                [--all_global]

Every run: global batch 32 x 2048, bfloat16 activations, float32 weights, full remat
(`recompute_grad`), Adam with decoupled weight decay (AdamW). MaxText runs its `gpt3` decoder
unscanned (its scanned layers cost more temporaries and hide FLOPs in the loop body) in a side
environment: bench/maxtext_side.py says how to make one; a second MaxText column compiles
its scanned decoder. Ours scans its layers by default (`scan_layers`; docs/scanned-layers.md),
and `--unrolled` adds a column of ours with them unrolled.

Why ours is compiled twice with --maxtext_python: the temporaries depend on the compiler as
much as on the program. MaxText needs Python >= 3.12 and so a newer jax and libtpu than a
Python 3.11 environment can install; the same 1.3B FSDP step of ours needs 4.12 GiB of
temporaries under libtpu 0.0.42.1 and 3.28 GiB under 0.0.52. So the side environment also
compiles ours (it imports gpt_neo from this checkout), and the like-for-like comparison is
between the two columns it fills. `--all_global` makes every layer of ours global attention, as
in MaxText's gpt3 (the GPT-Neo presets alternate global and local layers).

    python bench/tpu_compile.py --families

compiles the Llama and Qwen presets instead (configs/llama_1B.json, configs/qwen3_1.7B.json:
n_ctx 4096, bfloat16, full remat) with FSDP over the whole slice (`mesh_shape` x:N, `layout`
batch:x, `param_layout` embd:x) on v5e:2x2 and v5e:4x4, at 2 sequences per chip (global batch
8 and 32; one microbatch, the presets' tokens_per_mb_per_replica being 8192), and prints the
compiled memory per chip beside the planner's estimate (`gpt_neo.training.memory.plan`), their
ratio, the compile time and the compiled FLOPs per step per chip; docs/model-families.md shows
its table.

    python bench/tpu_compile.py --long_context [--all_global] [--attention_kernel xla]
                                [--maxtext_python ...]

compiles the 1.3B preset at n_ctx 32,768 on v5e:4x4 (batch 16: one sequence per chip,
bfloat16, full remat) with FSDP alone and with the sequence split 4 and 8 ways (context
parallelism, all-gather and ring, FSDP over every chip), beside MaxText's compile of the same
shapes (`ici_context_parallelism`, its `context_parallel_strategy`); docs/long-context.md
shows its table. Ours runs each block of a split sequence's attention in the splash kernel
(`attention_kernel` auto); `--attention_kernel xla` compiles the XLA blocks instead.

    python bench/tpu_compile.py --longest [--sizes 125M 1.3B 2.7B]

finds the longest n_ctx that fits per GPT-Neo preset on v5e:4x4: one sequence split over all
16 chips (`sequence:x`, `context_parallel` ring, FSDP over the same chips), batch 1, bfloat16,
full remat, the presets' own layers (global and local, learned positions). n_ctx doubles
from 131,072 (`--longest_from`) until the compile no longer fits (at most 1,048,576): each
compiled under the TPU scheduler's lowest memory limit, as the auto layout's verdict is.
"""

import argparse
import json
import os
import re
import sys
from importlib.metadata import version
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from maxtext_side import MARKER, maxtext_compile, run_side  # bench/ is on sys.path

from gpt_neo.config import load_config
from gpt_neo.planning import aot
from gpt_neo.training.memory import plan

REPO = Path(__file__).resolve().parent.parent
PRESETS = {"125M": "configs/gpt_neo_125M.json", "1.3B": "configs/gpt_neo_1.3B.json"}
LONGEST_PRESETS = {**PRESETS, "2.7B": "configs/gpt_neo_2.7B.json"}
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


def config(size: str, layout: str, all_global: bool):
    cfg = load_config(str(REPO / PRESETS[size])).replace(**COMMON, **LAYOUTS[layout][0])
    if all_global:
        cfg = cfg.replace(attention_types=[[["global"], cfg.n_layer]])
    return cfg


def ours(size: str, layout: str, all_global: bool, unrolled: bool = False) -> dict:
    """Our compile with this environment's jax and libtpu, as bytes and FLOPs per device;
    the layers scanned (the default) or `unrolled`."""
    cfg = config(size, layout, all_global)
    if unrolled:
        cfg = cfg.replace(scan_layers=False)
    result = {"estimate": plan(cfg).train_total, "jax": version("jax"), "libtpu": version("libtpu")}
    return {**result, **compiled(cfg, aot.topology_devices("v5e:2x2"))}


def compiled(cfg, devices, least_memory: bool = False) -> dict:
    """Our train step compiled for `devices`: bytes and FLOPs per device, or the error cell;
    `least_memory`: under the scheduler's lowest memory limit (what "does it fit?" turns on)."""
    try:
        c = aot.compile_train_step(cfg, devices, least_memory=least_memory)
    except aot.DoesNotFit as err:
        return {"error": does_not_fit(err)}
    return {
        "arguments": c.arguments,
        "temporaries": c.temporaries,
        "flops": c.flops,
        "seconds": c.seconds,
    }


def does_not_fit(err: aot.DoesNotFit) -> str:
    """The cell of a compile that ran out of HBM, with the temporaries XLA asked for."""
    needs = re.search(r"XLA needs (\S+) for HLO temporaries", str(err))
    return f"does not fit (temp {needs.group(1)})" if needs else "does not fit"


def ours_in(python: str, size: str, layout: str, all_global: bool) -> dict:
    """`ours` run by another environment's `python` (its jax and libtpu), on this checkout."""
    args = [str(Path(__file__).resolve()), "--one", size, layout]
    if all_global:
        args.append("--all_global")
    # the side environment has no gpt_neo installed: it imports this checkout's
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    try:
        return run_side(python, args, env={"PYTHONPATH": path})
    except RuntimeError as err:
        return failed("ours (side environment)", size, layout, err)


def theirs(python: str, size: str, layout: str, scan: bool = False) -> dict:
    try:
        return maxtext_compile(python, size, layout, scan=scan)
    except RuntimeError as err:
        return failed("MaxText", size, layout, err)


def failed(who: str, size: str, layout: str, err: RuntimeError) -> dict:
    """A cell for a compile that failed: out of memory, or the reason printed on stderr."""
    if "HBM" in str(err) or "RESOURCE_EXHAUSTED" in str(err) or "does not fit" in str(err):
        return {"error": "does not fit"}
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    print(f"{who} {size} {layout}: {lines[-1] if lines else err}", file=sys.stderr)
    return {"error": "failed (reason on stderr)"}


def cells(r: dict | None) -> list[str]:
    """args + temp, FLOPs, compile time."""
    if r is None:
        return ["-", "-", "-"]
    if "error" in r:
        return [r["error"], "-", "-"]
    args, temp = r["arguments"] / GIB, r["temporaries"] / GIB
    return [
        f"{args:.2f} + {temp:.2f} = {args + temp:.2f} GiB",
        f"{r['flops']:.3e}",
        f"{r['seconds']:.0f} s",
    ]


def compiler(r: dict) -> str:
    return f"jax {r['jax']}, libtpu {r['libtpu']}"


# --families: the Llama/Qwen presets, FSDP over the whole slice, 2 sequences per chip
FAMILIES = {"llama_1B": "configs/llama_1B.json", "qwen3_1.7B": "configs/qwen3_1.7B.json"}
FAMILY_SLICES = ("v5e:2x2", "v5e:4x4")
SEQUENCES_PER_CHIP = 2


def family_config(preset: str, chips: int):
    return load_config(str(REPO / FAMILIES[preset])).replace(
        mesh_shape=f"x:{chips}",
        layout="batch:x",
        param_layout="embd:x",
        train_batch_size=SEQUENCES_PER_CHIP * chips,
    )


def families() -> None:
    """The table of --families: compiled memory per chip against the planner's estimate."""
    header = [
        "preset",
        "slice",
        "batch",
        "planner",
        "compiled per chip: args + temp + out - aliased",
        "compiled / planner",
        "FLOPs per step per chip",
        "compile",
    ]
    slices = {name: aot.topology_devices(name) for name in FAMILY_SLICES}
    hbm = aot.hbm_bytes(slices[FAMILY_SLICES[0]]) / GIB
    print(
        f"TPU v5e (HBM {hbm:.2f} GiB per chip), FSDP over every chip, {SEQUENCES_PER_CHIP} "
        f"sequences per chip, bfloat16, full remat, AdamW; jax {version('jax')}, libtpu "
        f"{version('libtpu')}"
    )
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for topology, devices in slices.items():
        for preset in FAMILIES:
            cfg = family_config(preset, len(devices))
            estimate = plan(cfg).train_total
            batch = f"{cfg.train_batch_size} x {cfg.n_ctx}"
            try:
                c = aot.compile_train_step(cfg, devices)
            except aot.DoesNotFit as err:
                cell = does_not_fit(err)
                row = [preset, topology, batch, f"{estimate / GIB:.2f} GiB", cell, "-", "-", "-"]
                print("| " + " | ".join(row) + " |", flush=True)
                continue
            parts = (c.arguments, c.temporaries, c.outputs, c.aliased)
            args, temp, out, aliased = (x / GIB for x in parts)
            row = [
                preset,
                topology,
                batch,
                f"{estimate / GIB:.2f} GiB",
                f"{args:.2f} + {temp:.2f} + {out:.2f} - {aliased:.2f} = {c.total / GIB:.2f} GiB",
                f"{c.total / estimate:.2f}",
                f"{c.flops:.3e}",
                f"{c.seconds:.0f} s",
            ]
            print("| " + " | ".join(row) + " |", flush=True)


# --long_context: the 1.3B preset at n_ctx 32,768 on v5e:4x4, one sequence per chip
LONG_SLICE, LONG_CTX, LONG_CHIPS = "v5e:4x4", 32768, 16
LONGEST_FROM = 131072  # --longest's first n_ctx (each compile of a 16-way ring takes minutes)
LONG_LAYOUTS = {  # ours; MaxText's parallelism for the same split (None: not run)
    "FSDP x:16": (
        {"mesh_shape": "x:16", "layout": "batch:x", "param_layout": "embd:x"},
        {"ici_fsdp_parallelism": 16},
    ),
    **{
        f"sequence {split} ({how}), FSDP": (
            {
                "mesh_shape": f"x:{LONG_CHIPS // split},y:{split}",
                "layout": "batch:x,sequence:y",
                "param_layout": "embd:x+y",
                "context_parallel": how,
            },
            {
                "ici_fsdp_parallelism": LONG_CHIPS // split,
                "ici_context_parallelism": split,
                "context_parallel_strategy": how,
                # MaxText's ring runs on the tokamax splash kernel only
                **({"use_tokamax_splash": True} if how == "ring" else {}),
            },
        )
        for split in (4, 8)
        for how in ("all_gather", "ring")
    },
}
MAXTEXT_LONG = {  # the same shapes in MaxText's keys
    "compile_topology": "v5e-16",
    "ici_data_parallelism": 1,
    "max_target_length": LONG_CTX,
    "trainable_position_size": LONG_CTX,
    "per_device_batch_size": 1,
    "allow_split_physical_axes": True,  # fsdp 2 x context 8 on a 4x4 slice
    "attention": "flash",  # splash; MaxText's ring requires it
}


def long_config(layout: str, all_global: bool, kernel: str = "auto"):
    cfg = load_config(str(REPO / PRESETS["1.3B"])).replace(
        attention_kernel=kernel,
        n_ctx=LONG_CTX,
        train_batch_size=LONG_CHIPS,
        precision="bfloat16",
        recompute_grad=True,
        **LONG_LAYOUTS[layout][0],
    )
    if all_global:
        cfg = cfg.replace(attention_types=[[["global"], cfg.n_layer]])
    return cfg


def long_context(side: str | None, all_global: bool, kernel: str) -> None:
    """The table of --long_context: ours (and MaxText's) compiled memory and FLOPs per chip;
    `kernel`: our `attention_kernel` (`xla`: a split sequence's blocks as XLA einsums)."""
    devices = aot.topology_devices(LONG_SLICE)
    hbm = aot.hbm_bytes(devices) / GIB
    layers = "every layer global" if all_global else "global and local layers (window 256)"
    print(
        f"1.3B at n_ctx {LONG_CTX} on {LONG_SLICE} (HBM {hbm:.2f} GiB per chip), batch "
        f"{LONG_CHIPS} (one sequence per chip), bfloat16, full remat, AdamW, {layers}, "
        f"attention_kernel {kernel}"
    )
    header = ["layout", "planner", "ours: args + temp", "ours: FLOPs", "ours: compile"]
    if side:
        header += ["MaxText: args + temp", "MaxText: FLOPs", "MaxText: compile"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for name, (_, maxtext_keys) in LONG_LAYOUTS.items():
        cfg = long_config(name, all_global, kernel)
        row = [name, f"{plan(cfg).train_total / GIB:.2f} GiB", *cells(compiled(cfg, devices))]
        if side:
            try:
                other = maxtext_compile(
                    side, "1.3B", "fsdp", False, overrides={**MAXTEXT_LONG, **maxtext_keys}
                )
            except RuntimeError as err:
                other = failed("MaxText", "1.3B", name, err)
            row += cells(other)
        print("| " + " | ".join(row) + " |", flush=True)
    print(f"ours: jax {version('jax')}, libtpu {version('libtpu')}")


def longest(sizes: list[str], start: int = LONGEST_FROM) -> None:
    """The table of --longest: per preset, the longest n_ctx of one sequence on the slice,
    doubling from `start`."""
    devices = aot.topology_devices(LONG_SLICE)
    hbm = aot.hbm_bytes(devices) / GIB
    print(
        f"{LONG_SLICE} (HBM {hbm:.2f} GiB per chip): one sequence split over {LONG_CHIPS} chips "
        "(ring, FSDP over the same chips), batch 1, bfloat16, full remat, AdamW; compiled "
        "under the scheduler's lowest memory limit"
    )
    print("| preset | longest n_ctx that fits | planner | ours: args + temp | compile | next |")
    print("|---|---|---|---|---|---|")
    for size in sizes:
        best, n_ctx, beyond = None, start, "-"
        while n_ctx <= 2**20:
            cfg = load_config(str(REPO / LONGEST_PRESETS[size])).replace(
                n_ctx=n_ctx,
                train_batch_size=1,
                precision="bfloat16",
                recompute_grad=True,
                mesh_shape=f"x:{LONG_CHIPS}",
                layout="sequence:x",
                param_layout="embd:x",
                context_parallel="ring",
            )
            result = compiled(cfg, devices, least_memory=True)
            print(f"{size} at {n_ctx}: {', '.join(cells(result))}", file=sys.stderr, flush=True)
            # the compiler refuses only temporaries past HBM; arguments come on top
            if "error" in result or (result["arguments"] + result["temporaries"]) / GIB > hbm:
                beyond = f"{n_ctx:,}: {result.get('error') or cells(result)[0]}"
                break
            best = (n_ctx, plan(cfg).train_total / GIB, result)
            n_ctx *= 2
        if best is None:
            print(f"| {size} | below {start:,} | - | - | - | {beyond} |", flush=True)
            continue
        fits, planned, result = best
        memory, _, seconds = cells(result)
        print(
            f"| {size} | {fits:,} | {planned:.2f} GiB | {memory} | {seconds} | {beyond} |",
            flush=True,
        )
    print(f"ours: jax {version('jax')}, libtpu {version('libtpu')}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sizes", nargs="+", choices=sorted(LONGEST_PRESETS), default=sorted(PRESETS)
    )
    parser.add_argument("--maxtext_python", help="the side venv's python (bench/maxtext_side.py)")
    parser.add_argument("--all_global", action="store_true", help="every layer global attention")
    parser.add_argument(
        "--unrolled", action="store_true", help="also compile ours with the layers unrolled"
    )
    parser.add_argument("--one", nargs=2, metavar=("SIZE", "LAYOUT"), help=argparse.SUPPRESS)
    parser.add_argument(
        "--families",
        action="store_true",
        help="compile the Llama and Qwen presets (FSDP, v5e:2x2 and v5e:4x4) instead",
    )
    parser.add_argument(
        "--long_context",
        action="store_true",
        help=f"compile 1.3B at n_ctx {LONG_CTX} on {LONG_SLICE}, with and without a sequence split",
    )
    parser.add_argument(
        "--attention_kernel",
        choices=["auto", "xla"],
        default="auto",
        help="with --long_context: ours with this attention_kernel (auto: splash blocks on TPU)",
    )
    parser.add_argument(
        "--longest",
        action="store_true",
        help=f"the longest n_ctx of one sequence over {LONG_SLICE} per preset (ring, FSDP)",
    )
    parser.add_argument(
        "--longest_from", type=int, default=LONGEST_FROM, help="--longest's first n_ctx"
    )
    args = parser.parse_args()
    if args.longest:
        longest(args.sizes, args.longest_from)
        return
    if extra := sorted(set(args.sizes) - set(PRESETS)):
        parser.error(f"--sizes {' '.join(extra)}: only with --longest")
    if args.long_context:
        long_context(args.maxtext_python, args.all_global, args.attention_kernel)
        return
    if args.families:
        families()
        return
    if args.one:  # one compile of ours, for `ours_in`
        print(MARKER + json.dumps(ours(*args.one, args.all_global)), flush=True)
        return
    side = args.maxtext_python
    hbm = aot.hbm_bytes(aot.topology_devices("v5e:2x2")) / GIB
    print(f"TPU v5e:2x2 (HBM {hbm:.2f} GiB per chip), batch 32 x 2048, bfloat16, full remat, AdamW")
    header = ["model", "layout", "planner", "ours: args + temp", "ours: FLOPs", "ours: compile"]
    if args.unrolled:
        header += ["ours unrolled: args + temp", "FLOPs", "compile"]
    if side:
        header += ["ours, MaxText's compiler: args + temp", "FLOPs", "compile"]
        header += ["MaxText: args + temp", "MaxText: FLOPs", "MaxText: compile"]
        header += ["MaxText scanned: args + temp", "FLOPs", "compile"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    compilers = {}
    for size in args.sizes:
        for name, (_, maxtext_layout) in LAYOUTS.items():
            mine = ours(size, name, args.all_global)
            compilers["ours"] = compiler(mine)
            row = [size, name, f"{mine['estimate'] / GIB:.2f} GiB", *cells(mine)]
            if args.unrolled:
                row += cells(ours(size, name, args.all_global, unrolled=True))
            if side:
                mine_there = ours_in(side, size, name, args.all_global)
                row += cells(mine_there)
                other = theirs(side, size, maxtext_layout) if maxtext_layout else None
                row += cells(other)
                scanned = theirs(side, size, maxtext_layout, scan=True) if maxtext_layout else None
                row += cells(scanned)
                for who, r in (("ours, side", mine_there), ("MaxText", other)):
                    if r and "jax" in r:
                        compilers[who] = compiler(r)
            print("| " + " | ".join(row) + " |", flush=True)
    for who, what in compilers.items():
        print(f"{who}: {what}")


if __name__ == "__main__":
    main()

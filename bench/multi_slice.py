"""What crossing slices costs, by the planner's roofline (`gpt_neo.planning.roofline`): for the
GPT-Neo presets on 1, 2, 4 and 8 slices of v5e:4x4, FSDP inside each slice and data parallel
across them, 2 sequences of 2048 tokens per chip (bfloat16, full remat), the bytes each chip
sends per step over ICI and over the DCN, the step's compute time at the bf16 peak, the DCN's
time at its bandwidth per chip (`gpt_neo.hardware`), and that time against the compute's: the
roofline overlaps the two, so the step grows only where it passes 100%, but the last layers'
gradients cross after the backward pass, so a high share is time at risk.

    python bench/multi_slice.py [--presets gpt_neo_125M gpt_neo_1.3B gpt_neo_2.7B]
                                [--slices 1 2 4 8] [--chips_per_slice 16]

An estimate, from the config alone (nothing compiles): `tests/test_multi_slice.py` holds the
DCN bytes to the compiled program's within 10%; docs/multi-slice.md shows the table.
"""

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from gpt_neo import hardware
from gpt_neo.config import load_config
from gpt_neo.planning import roofline

MIB = 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--presets", nargs="+", default=["gpt_neo_125M", "gpt_neo_1.3B", "gpt_neo_2.7B"]
    )
    parser.add_argument("--slices", nargs="+", type=int, default=[1, 2, 4, 8])
    parser.add_argument("--chips_per_slice", type=int, default=16)
    parser.add_argument("--chip", default="TPU v5e", choices=sorted(hardware.CHIPS))
    args = parser.parse_args()
    chip, n = hardware.CHIPS[args.chip], args.chips_per_slice
    print(
        f"{args.chip}: ICI {chip.link_bandwidth / 1e9:.0f} GB/s, DCN "
        f"{chip.dcn_bandwidth / 1e9:.3g} GB/s per chip; {n} chips per slice, 2 sequences each"
    )
    print(
        "| preset | slices | ICI per step | DCN per step | compute | DCN time | "
        "step ESTIMATE | DCN / compute |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for preset in args.presets:
        for slices in args.slices:
            across = {"mesh_shape": f"slice:{slices},x:{n}", "dcn_axes": "slice"}
            if slices == 1:
                across = {"mesh_shape": f"x:{n}", "dcn_axes": None}
            cfg = load_config(f"configs/{preset}.json").replace(
                **across,
                layout="batch:slice+x" if slices > 1 else "batch:x",
                param_layout="embd:x",
                train_batch_size=2 * n * slices,
                precision="bfloat16",
                recompute_grad=True,
            )
            cost = roofline.estimate(cfg, chip)
            print(
                f"| {preset} | {slices} | {cost.ici_bytes / MIB:,.0f} MiB | "
                f"{cost.dcn_bytes / MIB:,.0f} MiB | {roofline.duration(cost.compute)} | "
                f"{roofline.duration(cost.dcn)} | {roofline.duration(cost.seconds)} | "
                f"{cost.dcn / cost.compute:.0%} |"
            )


if __name__ == "__main__":
    main()

"""Running one mode of a model config (train, summary, check-data, sample, eval, export): the
part `gpt-neo VERB` and `python main.py --model ...` share once their flags are parsed.

The platform is chosen before JAX starts (`--tpu`, `--gpu_ids`), so JAX and the commands that
use it are imported only here, inside `run`."""

from __future__ import annotations

import argparse

from gpt_neo.launch import platform

MODES = ("train", "summary", "check-data", "sample", "eval", "export")


def run(mode: str, args: argparse.Namespace) -> int:
    """Run `mode` with `args` (a namespace holding the flags of flags.py's groups that the mode
    uses); returns the exit code. User errors propagate (`cli.exit_code_of` prints them)."""
    tpu, gpu_ids = getattr(args, "tpu", None), getattr(args, "gpu_ids", None)
    platform.select_platform(tpu, gpu_ids)
    if mode == "train":  # before anything starts a JAX backend
        platform.initialize_distributed(
            args.coordinator_address, args.num_processes, args.process_id
        )
    platform.require_platform(tpu, gpu_ids)
    # these import JAX: only now that the platform is chosen
    from gpt_neo import compilation_cache
    from gpt_neo.cli import commands
    from gpt_neo.planning import auto_layout

    cfg = commands.load(args)
    if mode not in ("check-data", "summary"):  # the others compile something worth keeping
        compilation_cache.enable(cfg.model_path, getattr(args, "compilation_cache", None))
    topology = getattr(args, "topology", None)
    # "auto" layouts: training compiles the winner first (then hits the compilation cache);
    # the other modes only rank, and `summary --topology` chooses for the slice instead
    if mode != "check-data" and not (mode == "summary" and topology):
        cfg = auto_layout.choose_layout(cfg, confirm=mode == "train")
    handler = {
        "train": commands.train,
        "summary": commands.summary,
        "check-data": commands.check_dataset,
        "sample": commands.predict,
        "eval": commands.evaluate,
        "export": commands.export,
    }[mode]
    return handler(cfg, args)

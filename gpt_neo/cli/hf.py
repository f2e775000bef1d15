"""`python -m gpt_neo.cli.hf import HF_DIR --model_path DIR [--model run.json]`: a local
Hugging Face GPT-Neo folder -> a step-0 checkpoint that `python main.py` continues training."""

from __future__ import annotations

import argparse
import sys

from gpt_neo.cli import add_overrides_flag, exit_code_of
from gpt_neo.config import load_config, parse_overrides, to_dict
from gpt_neo.interop.hf import import_to_checkpoint


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m gpt_neo.cli.hf",
        description="Turn a local Hugging Face GPT-Neo folder into a checkpoint main.py trains on.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    command = commands.add_parser("import", help="HF folder -> model_path checkpoint + config")
    command.add_argument("hf_dir", help="a local GPTNeoForCausalLM folder (nothing is downloaded)")
    command.add_argument("--model_path", required=True, help="where the checkpoint goes")
    command.add_argument(
        "--model",
        nargs="+",
        metavar="CONFIG",
        help="config file(s) for the run keys (datasets, batch size, optimizer, ...); the "
        "architecture always comes from the HF folder",
    )
    add_overrides_flag(command, "a run key")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    return exit_code_of(_import, parse_args(argv))


def _import(args: argparse.Namespace) -> int:
    if args.model:
        run = to_dict(load_config(args.model, overrides=args.overrides))
    else:
        run = parse_overrides(args.overrides)
    path = import_to_checkpoint(args.hf_dir, args.model_path, run)
    print(
        f"imported {args.hf_dir} as step 0 in {args.model_path}; continue training with\n"
        f"    python main.py --model {path}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`python -m gpt_neo.cli.mesh_tf import CKPT_DIR --model gpt_neo_config.json --model_path DIR`:
a checkpoint of the original GPT-Neo (Mesh-TensorFlow) -> one `main.py` continues training
(`gpt_neo.interop.mesh_tf` does the work)."""

from __future__ import annotations

import argparse
import sys

from gpt_neo.cli import add_overrides_flag, exit_code_of
from gpt_neo.interop.mesh_tf import Imported, import_to_checkpoint


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gpt_neo.cli.mesh_tf",
        description="Turn a checkpoint of the original GPT-Neo (Mesh-TensorFlow) into one "
        "main.py continues training.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    command = commands.add_parser("import", help="GPT-Neo checkpoint -> model_path checkpoint")
    command.add_argument(
        "ckpt_dir", help="GPT-Neo's model_path (its newest model.ckpt-N) or a model.ckpt-N prefix"
    )
    command.add_argument(
        "--model", required=True, metavar="CONFIG", help="the GPT-Neo config it was trained with"
    )
    command.add_argument(
        "--model_path", required=True, metavar="DIR", help="an empty directory for ours"
    )
    add_overrides_flag(command, "a key of our config, last", "--override")
    args = parser.parse_args(argv)
    return exit_code_of(_import, args)


def _import(args: argparse.Namespace) -> int:
    _report(import_to_checkpoint(args.ckpt_dir, args.model, args.model_path, args.overrides))
    return 0


def _report(done: Imported) -> None:
    slots = ", ".join(f"{n} {kind}" for kind, n in done.slots_left.items()) or "none"
    print(
        f"imported {done.checkpoint} (GPT-Neo step {done.step}) as step {done.step} in "
        f"{done.cfg.model_path}.\n"
        f"The optimizer state is fresh: GPT-Neo's optimizer slots ({slots}) are not carried "
        "over, and the data is read from the start."
    )
    if done.cfg.train_steps is not None and done.cfg.train_steps <= done.step:
        print(
            f"train_steps is {done.cfg.train_steps}, so training would stop at once: raise it "
            "(--override train_steps=N) to train on."
        )
    print(f"Continue training with\n    python main.py --model {done.config_path}")


if __name__ == "__main__":
    sys.exit(main())

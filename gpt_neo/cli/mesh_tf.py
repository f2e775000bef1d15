"""`gpt-neo import mesh-tf CKPT_DIR --model gpt_neo_config.json --model_path DIR` (old spelling:
`python -m gpt_neo.cli.mesh_tf import ...`): a checkpoint of the original GPT-Neo
(Mesh-TensorFlow) -> one `gpt-neo train` continues (`gpt_neo.interop.mesh_tf` does the work)."""

from __future__ import annotations

import argparse
import sys

from gpt_neo.cli import exit_code_of, flags

DESCRIPTION = (
    "Turn a checkpoint of the original GPT-Neo (Mesh-TensorFlow) into one gpt-neo train "
    "continues, at the same step. TensorFlow reads it; Mesh-TensorFlow is not needed."
)
EPILOG = """\
example:
  gpt-neo import mesh-tf old_run/ --model old_config.json --model_path runs/continued \\
      --set mesh_shape=x:8 layout=batch:x train_steps=40000
  gpt-neo train --model runs/continued/config.json"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "ckpt_dir", help="GPT-Neo's model_path (its newest model.ckpt-N) or a model.ckpt-N prefix"
    )
    parser.add_argument(
        "--model", required=True, metavar="CONFIG", help="the GPT-Neo config it was trained with"
    )
    parser.add_argument(
        "--model_path", required=True, metavar="DIR", help="an empty directory for ours"
    )
    flags.overrides(parser, "a key of our config, last")


def run(args: argparse.Namespace) -> int:
    from gpt_neo.interop.mesh_tf import import_to_checkpoint  # imports JAX: not for --help

    done = import_to_checkpoint(args.ckpt_dir, args.model, args.model_path, args.overrides)
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
            "(--set train_steps=N) to train on."
        )
    print(f"Continue training with\n    gpt-neo train --model {done.config_path}")
    return 0


def main(argv=None) -> int:
    return exit_code_of(run, flags.import_command(sys.modules[__name__], argv))


if __name__ == "__main__":
    sys.exit(main())

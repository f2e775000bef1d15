"""`gpt-neo data demo` (= `python data/build_demo_corpus.py`): the built-in demo dataset, made
from the Python standard library's sources, which every machine has offline."""

from __future__ import annotations

import argparse
import sys

from gpt_neo.cli import exit_code_of, flags

DESCRIPTION = (
    "Make the demo dataset (the one configs/demo.json trains on) from the Python standard "
    "library's sources: datasets/demo/ and configs/dataset_configs/demo.json, in the working "
    "directory. Re-running reuses what is built."
)
EPILOG = """\
example:
  gpt-neo data demo && gpt-neo train --model demo"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--megabytes", type=float, default=6.0, help="source text to use")
    parser.add_argument("--vocab_size", type=int, default=8192, help="tokens in the vocabulary")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from gpt_neo.data.demo_corpus import build  # TensorFlow and tokenizers: not for --help

    build(args.megabytes, args.vocab_size, quiet=args.quiet)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=DESCRIPTION, epilog=EPILOG, formatter_class=flags.HelpFormatter
    )
    add_arguments(parser)
    return exit_code_of(run, parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

"""The command lines: `main.py` and the `data/` scripts call these, and argparse namespaces
stop here; the library below takes plain arguments. Nothing in the library imports this
package."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from gpt_neo.errors import UserError


def add_overrides_flag(parser: argparse.ArgumentParser, what: str = "a config key") -> None:
    """`--set KEY=VALUE ...`, collected into `args.overrides` (values parsed as JSON)."""
    parser.add_argument(
        "--set",
        dest="overrides",
        action="extend",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help=f"override {what} (value parsed as JSON, else a string); repeatable",
    )


def exit_code_of(run: Callable[..., int], *args) -> int:
    """`run(*args)`'s exit code; a `UserError` becomes one `error: ...` line on stderr and its
    exit code (2). Anything else is a bug and keeps its traceback."""
    try:
        return run(*args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code

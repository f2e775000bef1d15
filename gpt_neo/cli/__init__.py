"""The command lines: `gpt-neo VERB` (verbs.py), GPT-Neo's `main.py` (main.py) and the `data/`
scripts call these, and argparse namespaces stop here; the library below takes plain
arguments. Nothing in the library imports this package."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import NoReturn

from gpt_neo import storage
from gpt_neo.errors import EXIT_STORAGE_FULL, StorageFull, UserError, first_line

# Overrides from the environment, applied after --set: for schedulers and CI, and for the
# docs' tests, which run the documented commands word for word at a tiny size
OVERRIDES_ENV = "GPT_NEO_SET"


def overrides_of(args) -> list[str]:
    """`--set`'s KEY=VALUE overrides, then $GPT_NEO_SET's (announced on stderr: never silent)."""
    extra = os.environ.get(OVERRIDES_ENV, "").split()
    if extra:
        print(f"{OVERRIDES_ENV}: {' '.join(extra)} (after --set)", file=sys.stderr)
    return [*args.overrides, *extra]


def version_line() -> str:
    """What `--version` prints: the installed distribution's version, and Python's."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        ours = version("gpt-neo")
    except PackageNotFoundError:  # a checkout on sys.path, never installed
        ours = "(not installed)"
    return f"gpt-neo {ours} (Python {sys.version.split()[0]})"


def exit_code_of(run: Callable[..., int], *args) -> int:
    """`run(*args)`'s exit code; a `UserError` becomes one `error: ...` line on stderr and its
    exit code (2); a write that ran out of space, one line and exit 4 (EXIT_STORAGE_FULL).
    Anything else is a bug and keeps its traceback."""
    try:
        return run(*args)
    except StorageFull as err:
        _exit_now(f"error: {err}", err.exit_code)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except Exception as err:
        if (problem := storage.space_problem(err)) is None:
            raise
        # a write elsewhere than a checkpoint (metrics, predictions, an export, TFRecords):
        # those are written whole or not at all (storage.write_*_atomic)
        _exit_now(f"error: out of space ({problem}): {first_line(err)}", EXIT_STORAGE_FULL)


def _exit_now(line: str, code: int) -> NoReturn:
    """Print `line` and leave at once: after a failed write, orbax's and TensorFlow's writer
    threads are mid-failure, and the interpreter's teardown would print their tracebacks."""
    print(line, file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)

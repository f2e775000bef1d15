"""Errors a user can fix. The command lines print their message as one `error: ...` line and
exit with `UserError.exit_code` (2); anything else is a bug and keeps its traceback.

    UserError            bad input: the message says what, where, and how to fix it
    ├── ConfigError      a model or dataset config, a flag, a mesh layout
    ├── DataError        data files: missing, unreadable, corrupt, or not what the config says
    ├── PlatformError    the hardware asked for (--tpu, --gpu_ids) is not on this machine
    ├── StorageFull      a write failed for lack of space (exit 4: free space, then rerun)
    └── RunLocked        another live run holds the model_path
"""

from __future__ import annotations

import sys

# Exit codes, one table for every command line and for the pod launcher that reads them.
EXIT_USER_ERROR = 2  # bad input: rerunning the same command cannot help
EXIT_DIVERGED = 3  # non-finite loss or gradient; the last good checkpoint is untouched
EXIT_STORAGE_FULL = 4  # a write ran out of space; what was complete before is intact
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again" — a checkpoint was written; rerun to resume


class UserError(Exception):
    """Bad input. The message is user-facing text: what was wrong, where, and the fix."""

    exit_code = EXIT_USER_ERROR


class ConfigError(UserError, ValueError):
    """A config (model or dataset), a command-line flag or a mesh layout that cannot be used."""


class DataError(UserError):
    """Data files that are missing, unreadable, corrupt or do not fit the model."""


class PlatformError(UserError):
    """The requested accelerator platform is not available on this machine."""


class StorageFull(UserError):
    """A write failed for lack of space (a full disk, a quota, a file-size limit). Nothing
    complete was lost; rerunning after freeing space resumes."""

    exit_code = EXIT_STORAGE_FULL


class RunLocked(UserError):
    """Another live run writes the same model_path."""


def first_line(err: BaseException, limit: int = 300) -> str:
    """The first line of a (third-party) error's message, for quoting in a one-line error."""
    text = str(err).strip()
    return (text.splitlines()[0] if text else type(err).__name__)[:limit]


def warn(message: str) -> None:
    """A `warning: ...` line on stderr, from whichever process saw the problem."""
    print(f"warning: {message}", file=sys.stderr, flush=True)

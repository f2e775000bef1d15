"""`python -m gpt_neo.cli.reference_pages [--check]`: write the docs' two generated pages,
docs/config.md (from the config schema, `gpt_neo.config.reference`) and docs/cli.md (from the
command line's own parsers), or exit 1 naming the pages that are out of date (the suite runs
--check, so neither can go stale)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from gpt_neo.cli import main as main_py
from gpt_neo.cli import verbs
from gpt_neo.config import reference

CLI_OUTPUT = reference.OUTPUT.parent / "cli.md"
HELP_COLUMNS = "100"  # argparse wraps to $COLUMNS: a fixed width, so the page does not depend on it

CLI_HEADER = """\
# Command line

Every verb of `gpt-neo`, and GPT-Neo's `python main.py`, with the flags and defaults of its
`--help` (this page is generated from the parsers by `python -m gpt_neo.cli.reference_pages`;
the test suite fails when it is stale). How the verbs fit together: [Quickstart](quickstart.md)
and [Your own data](own-data.md). Exit codes: [Troubleshooting](troubleshooting.md).
"""


def render_cli() -> str:
    """docs/cli.md: each command's --help, in the order `gpt-neo --help` lists them."""
    previous = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = HELP_COLUMNS
    try:
        sections = [CLI_HEADER]
        parser = verbs.build_parser()
        sections.append(_section("gpt-neo", parser))
        for name, command in _commands(parser, "gpt-neo"):
            sections.append(_section(name, command))
        sections.append(_section("python main.py", main_py.build_parser()))
    finally:
        if previous is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = previous
    return "\n".join(sections)


def _commands(parser: argparse.ArgumentParser, prefix: str):
    """(full name, parser) of every subcommand under `parser`, depth first."""
    for action in parser._actions:  # argparse keeps subparsers only here
        if isinstance(action, argparse._SubParsersAction):
            for name, command in action.choices.items():
                yield f"{prefix} {name}", command
                yield from _commands(command, f"{prefix} {name}")


def _section(name: str, parser: argparse.ArgumentParser) -> str:
    text = parser.format_help().rstrip()
    return f"## `{name}`\n\n```text\n{text}\n```\n"


def pages() -> dict[Path, str]:
    return {reference.OUTPUT: reference.render(), CLI_OUTPUT: render_cli()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Write docs/config.md and docs/cli.md.")
    parser.add_argument("--check", action="store_true", help="exit 1 if a page is out of date")
    parser.add_argument(
        "--docs", type=Path, help="write or check the pages in this folder instead of docs/"
    )
    args = parser.parse_args(argv)
    stale = []
    for path, text in pages().items():
        path = args.docs / path.name if args.docs else path
        if args.check:
            if (path.read_text() if path.is_file() else "") != text:
                stale.append(str(path))
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"wrote {path}")
    if stale:
        print(f"out of date: {', '.join(stale)}; run python -m gpt_neo.cli.reference_pages")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

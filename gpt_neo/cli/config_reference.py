"""`python -m gpt_neo.cli.config_reference [--check]`: write docs/config.md from the config
schema (`gpt_neo.config.reference`), or exit 1 when it is out of date (the suite runs --check).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gpt_neo.config import reference


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Write docs/config.md from gpt_neo/config/.")
    parser.add_argument("--check", action="store_true", help="exit 1 if the file is out of date")
    parser.add_argument("--output", type=Path, default=reference.OUTPUT)
    args = parser.parse_args(argv)
    text = reference.render()
    if args.check:
        current = args.output.read_text() if args.output.is_file() else ""
        if current != text:
            print(f"{args.output} is out of date: run python -m gpt_neo.cli.config_reference")
            return 1
        return 0
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    print(f"wrote {args.output} ({len(reference.key_docs())} keys)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

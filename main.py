"""GPT-Neo's entry point, as in GPT-Neo: `python main.py --model cfg.json [--tpu NAME] [...]`.
Flags and modes: `python main.py --help`, or gpt_neo/cli/main.py."""

import sys

from gpt_neo.cli.main import main

if __name__ == "__main__":
    sys.exit(main())

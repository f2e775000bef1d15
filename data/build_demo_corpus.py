"""Build the demo dataset: `python data/build_demo_corpus.py` (= `gpt-neo data demo`; `make demo`
runs it). The command line is gpt_neo/cli/demo_corpus.py, the work gpt_neo/data/demo_corpus.py."""

import sys

from gpt_neo.cli.demo_corpus import main

if __name__ == "__main__":
    sys.exit(main())

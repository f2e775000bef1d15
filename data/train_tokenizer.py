"""Train a byte-level BPE tokenizer on a folder of text: `python data/train_tokenizer.py --help`.
GPT-Neo's script, kept where its users look; the command line is gpt_neo/cli/tokenizer.py."""

import sys

from gpt_neo.cli.tokenizer import main

if __name__ == "__main__":
    sys.exit(main())

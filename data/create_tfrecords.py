"""Tokenize raw text into GPT-Neo TFRecords: `python data/create_tfrecords.py --help`.
GPT-Neo's script, kept where its users look; the command line is gpt_neo/cli/tfrecords.py."""

import sys

from gpt_neo.cli.tfrecords import main

if __name__ == "__main__":
    sys.exit(main())

"""`gpt-neo data tokenizer` (= `data/train_tokenizer.py`, GPT-Neo's script): train a byte-level
BPE tokenizer on a folder of text.

    gpt-neo data tokenizer --input_dir corpus/ --output_dir tokenizers/ --vocab_size 32768

Writes OUTPUT_DIR/byte-level-bpe.tokenizer.json. Unlike GPT-Neo's script it never deletes
OUTPUT_DIR, reads every file (not a 20% sample), and the tokenizer is lossless (no NFKC, no
prefix space): decode(encode(text)) == text. GPT-Neo's `--base_dir` still names the input.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gpt_neo.cli import exit_code_of, flags
from gpt_neo.data.corpus import SUFFIXES  # light: no TensorFlow, no tokenizers
from gpt_neo.errors import DataError

DESCRIPTION = "Train a lossless byte-level BPE tokenizer on a folder of text."
EPILOG = """\
example:
  gpt-neo data tokenizer --input_dir corpus/ --output_dir tokenizers/ --vocab_size 32768

<|endoftext|> is id 0 and <|padding|> id 1, as GPT-Neo's trainer made them."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--input_dir",
        "--base_dir",
        required=True,
        help="folder of input files, searched recursively (GPT-Neo: --base_dir)",
    )
    parser.add_argument("--output_dir", default="tokenizers", help="where to write the tokenizer")
    parser.add_argument(
        "--file_type",
        default="all",
        help=f"only read files ending in this suffix (e.g. txt, xz, jsonl.zst); all: {', '.join(SUFFIXES)}",
    )
    parser.add_argument("--vocab_size", type=int, required=True, help="tokens in the vocabulary")
    parser.add_argument("--min_frequency", type=int, default=2, help="least count of a merged pair")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=DESCRIPTION, epilog=EPILOG, formatter_class=flags.HelpFormatter
    )
    add_arguments(parser)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    return exit_code_of(run, parse_args(argv))


def run(args: argparse.Namespace) -> int:
    from gpt_neo.data.corpus import CorpusStats, list_input_files, read_documents
    from gpt_neo.data.encoders import TRAINED_TOKENIZER_NAME, train_byte_level_bpe

    files = list_input_files(args.input_dir)
    if args.file_type != "all":
        files = [f for f in files if f.name.endswith("." + args.file_type.lstrip("."))]
        if not files:
            raise DataError(f"no *.{args.file_type} files under {args.input_dir}")
    stats = CorpusStats()
    texts = (text for path in files for text in read_documents(path, stats))
    tokenizer = train_byte_level_bpe(texts, args.vocab_size, min_frequency=args.min_frequency)
    out = Path(args.output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        path = out / TRAINED_TOKENIZER_NAME
        tokenizer.save(str(path))
    except OSError as err:
        raise DataError(
            f"--output_dir {out}: cannot write the tokenizer ({err.strerror})"
        ) from None
    print(
        f"trained a {tokenizer.get_vocab_size()}-token byte-level BPE on {stats.documents} "
        f"documents from {len(files)} files ({stats.utf8_repaired} repaired non-UTF-8); wrote {path}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

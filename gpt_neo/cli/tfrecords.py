"""`gpt-neo data tfrecords` (= `data/create_tfrecords.py`, GPT-Neo's script and flags): tokenize
raw text into GPT-Neo TFRecords. Boolean flags mean what they say: `--ftfy` and
`--wikitext_detokenize` switch the repair on (GPT-Neo's flags of those names switched it off).

    gpt-neo data tfrecords --input_dir corpus/ --name mydata --output_dir datasets/mydata \
        --encoder_path tokenizers/byte-level-bpe.tokenizer.json --eval_fraction 0.05 \
        --write_dataset_config

Reads .txt (one document per file), .jsonl, .jsonl.zst / lm_dataformat archives, .xz and
.tar.gz. `--mode documents` (default) writes one record per document, for the
`documents_random` / `documents_fixed` sampling modes; `--mode chunks` writes records of
exactly chunk_size + 1 tokens, what GPT-Neo's `sequential_input` reads. `--sft` reads
fine-tuning examples from .jsonl files instead (prompt/completion, or chat messages with
`--chat_template`) and writes one record per example with a `loss_mask` beside its tokens
(docs/fine-tuning.md). Re-running the same command resumes; a finished run is reported, not
redone. Exit codes: 0 done, 2 bad input.
"""

from __future__ import annotations

import argparse
import os
import sys

from gpt_neo.cli import exit_code_of, flags
from gpt_neo.errors import ConfigError

DESCRIPTION = "Tokenize raw text into GPT-Neo TFRecords (and, with --write_dataset_config, the dataset config that names them)."
EPILOG = """\
example:
  gpt-neo data tfrecords --input_dir corpus/ --name mydata --output_dir datasets/mydata \\
      --encoder_path tokenizers/byte-level-bpe.tokenizer.json --eval_fraction 0.05 \\
      --write_dataset_config

  gpt-neo data tfrecords --sft --input_dir chats/ --name chats --output_dir datasets/chats \\
      --encoder_path tokenizers/byte-level-bpe.tokenizer.json --chat_template chat.jinja \\
      --write_dataset_config

Re-running the same command resumes; a finished run is reported, not redone.
GPT-Neo's --ftfy and --wikitext-detokenize switched those repairs OFF (they were on unless
given); here they are off unless given, and the flag switches them ON."""


class _StoreGiven(argparse.Action):
    """Stores the value and notes, as `<dest>_given`, that the flag was on the command line
    (so a flag that does not apply can be refused even when given its default)."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        setattr(namespace, f"{self.dest}_given", True)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--input_dir", required=True, help="folder of input files (searched recursively)"
    )
    p.add_argument("--name", default="openwebtext", help="output file name prefix")
    p.add_argument("--output_dir", default="./tfrecords", help="output folder, local or gs://")
    tok = p.add_mutually_exclusive_group(required=True)
    tok.add_argument("--encoder_path", help="tokenizer.json, a tokenizer folder, or 'byte'")
    tok.add_argument(
        "--use_gpt2_tokenizer",
        action="store_true",
        help="GPT-2's tokenizer from the local folder named by $GPT_NEO_GPT2_DIR",
    )
    p.add_argument(
        "--mode",
        choices=("documents", "chunks"),
        default="documents",
        action=_StoreGiven,
        help="one record per document, or records of chunk_size + 1 tokens (refused with --sft)",
    )
    p.set_defaults(mode_given=False)
    p.add_argument(
        "--sft",
        action="store_true",
        help="supervised fine-tuning: read .jsonl records {prompt, completion} or {messages}; "
        "write one record per example with its tokens and a loss_mask (1: counts in the loss)",
    )
    p.add_argument(
        "--chat_template",
        metavar="FILE",
        help="--sft: the Jinja2 chat template (Hugging Face's convention) that renders "
        "'messages' records; the loss counts the assistant messages' tokens",
    )
    p.add_argument(
        "--separator",
        type=int,
        nargs="+",
        help="token id(s) appended after each document (default: the tokenizer's end-of-text)",
    )
    p.add_argument(
        "--minimum_size",
        type=int,
        default=1,
        help="drop documents with fewer tokens than this (counted and reported)",
    )
    p.add_argument("--files_per", type=int, default=100_000, help="records per output file")
    p.add_argument(
        "--chunk_size",
        type=int,
        default=2048,
        help="chunks mode: n_ctx (records hold chunk_size + 1 tokens)",
    )
    p.add_argument(
        "--write_dataset_config",
        nargs="?",
        const="",
        metavar="PATH",
        help="write a dataset config (default PATH: configs/dataset_configs/NAME.json)",
    )
    p.add_argument(
        "--eval_fraction",
        type=float,
        default=0.0,
        metavar="F",
        help="hold out this share of the documents (by a hash of file name and position) as "
        "OUTPUT_DIR/eval/NAME_*.tfrecords; the written dataset config names them as eval_path",
    )
    p.add_argument(
        "--eval_path", default="", help="eval glob to put in the written dataset config instead"
    )
    p.add_argument("--processes", type=int, default=1, help="tokenizer processes (0: one per core)")
    p.add_argument(
        "--ftfy",
        action="store_true",
        help="repair mojibake with ftfy (NFKC) first (GPT-Neo's flag of this name turned it off)",
    )
    p.add_argument(
        "--wikitext_detokenize",
        "--wikitext-detokenize",
        action="store_true",
        help="undo WikiText tokenisation first (GPT-Neo's flag of this name turned it off)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=DESCRIPTION, epilog=EPILOG, formatter_class=flags.HelpFormatter
    )
    add_arguments(p)
    return p.parse_args(argv)


def main(argv=None) -> int:
    return exit_code_of(run, parse_args(argv))


def run(args: argparse.Namespace) -> int:
    from gpt_neo.data.corpus import list_input_files  # TensorFlow and tokenizers: not for --help
    from gpt_neo.data.dataset_config import DatasetConfig, write_dataset_config
    from gpt_neo.data.encoders import load_encoder
    from gpt_neo.data.sft import list_jsonl_files, load_chat_template
    from gpt_neo.data.tfrecords import TFRecordJob, create_tfrecords, eval_glob

    if args.sft:
        if args.mode_given:
            raise ConfigError(
                "--mode does not apply with --sft (sft writes one record per example, mode "
                "'sft'); drop --mode"
            )
        if args.ftfy or args.wikitext_detokenize:
            raise ConfigError(
                "--ftfy and --wikitext_detokenize repair raw text, not --sft examples; drop them "
                "and repair the .jsonl files themselves if they need it"
            )
    elif args.chat_template:
        raise ConfigError("--chat_template renders the 'messages' records of --sft; add --sft")
    mode = "sft" if args.sft else args.mode
    chat_template = load_chat_template(args.chat_template) if args.chat_template else None
    processes = args.processes or os.cpu_count() or 1
    encoder_spec = "gpt2" if args.use_gpt2_tokenizer else args.encoder_path
    if args.chunk_size < 1 or args.files_per < 1 or args.minimum_size < 0:
        raise ConfigError("--chunk_size and --files_per must be positive, --minimum_size >= 0")
    if not 0 <= args.eval_fraction < 1:
        raise ConfigError(f"--eval_fraction must be in [0, 1), e.g. 0.05; got {args.eval_fraction}")
    if args.eval_fraction and args.eval_path:
        raise ConfigError("--eval_fraction writes the eval split itself: drop --eval_path")
    encoder = load_encoder(encoder_spec)
    if args.separator:
        separator = tuple(args.separator)
    elif encoder.eos_id is not None:
        separator = (encoder.eos_id,)
    else:
        raise ConfigError(
            f"tokenizer '{encoder.name}' has no end-of-text token; pass --separator ID"
        )
    if any(not 0 <= s < encoder.vocab_size for s in separator):
        raise ConfigError(
            f"--separator {list(separator)} is outside the tokenizer's {encoder.vocab_size} ids"
        )
    job = TFRecordJob(
        name=args.name,
        output_dir=args.output_dir.rstrip("/"),
        encoder=encoder_spec,
        mode=mode,
        separator=separator,
        minimum_size=args.minimum_size,
        files_per=args.files_per,
        chunk_size=args.chunk_size,
        ftfy=args.ftfy,
        wikitext_detokenize=args.wikitext_detokenize,
        eval_fraction=args.eval_fraction,
        chat_template=chat_template,
    )
    files = list_jsonl_files(args.input_dir) if args.sft else list_input_files(args.input_dir)
    result = create_tfrecords(job, files, processes=processes, show_progress=not args.quiet)
    if args.write_dataset_config is not None:
        dataset = DatasetConfig(
            name=args.name,
            n_vocab=encoder.vocab_size,
            path=f"{job.output_dir}/{args.name}_*.tfrecords",
            eval_path=eval_glob(job) if result.eval_files else args.eval_path,
            tokenizer_path=encoder_spec,
            tokenizer_is_pretrained=args.use_gpt2_tokenizer,
            eos_id=separator[-1],
            padding_id=encoder.padding_id if encoder.padding_id is not None else separator[-1],
            mode=mode,
        )
        written = write_dataset_config(
            dataset, args.write_dataset_config or f"configs/dataset_configs/{args.name}.json"
        )
        print(f"dataset config: {written}")
    s = result.stats
    if result.already_complete:
        print(
            f"{args.name}: already complete in {args.output_dir} ({len(result.files)} files); nothing to do"
        )
    if args.sft:
        print(
            f"{args.name}: {s.documents} examples read, {s.documents_written} written as "
            f"records ({s.tokens:,} tokens, {s.loss_tokens:,} of them counted in the loss) in "
            f"{len(result.files)} files under {args.output_dir}; dropped {s.too_short} shorter "
            f"than --minimum_size {args.minimum_size}"
            + (
                f"; held out for evaluation: {s.eval_documents} examples in "
                f"{len(result.eval_files)} files ({eval_glob(job)})"
                if args.eval_fraction
                else ""
            )
            + (f"; {s.tokens / result.seconds:,.0f} tokens/s" if result.seconds else "")
        )
        return 0
    print(
        f"{args.name}: {s.documents} documents read, {s.documents_written} written as {s.records} "
        f"records ({s.tokens:,} tokens) in {len(result.files)} files under {args.output_dir}; "
        f"dropped {s.empty} empty and {s.too_short} shorter than --minimum_size {args.minimum_size}; "
        f"{s.utf8_repaired} repaired non-UTF-8, {s.bad_lines} bad jsonl lines"
        + (f"; {s.tail_tokens_dropped} tail tokens left over" if args.mode == "chunks" else "")
        + (
            f"; held out for evaluation: {s.eval_documents} documents, {s.eval_records} records "
            f"in {len(result.eval_files)} files ({eval_glob(job)})"
            if args.eval_fraction
            else ""
        )
        + (f"; {s.tokens / result.seconds:,.0f} tokens/s" if result.seconds else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`gpt-neo init --dataset NAME --like PRESET [--data DIR]`: write a model config for your data,
GPT-Neo README's steps 4-5 (copy a config, point it at your dataset, fix n_vocab) as a command.

With `--data DIR`, first make the dataset from a folder of text, by running exactly
`gpt-neo data tokenizer` and `gpt-neo data tfrecords` (the commands are printed), into
`datasets/NAME/` and `configs/dataset_configs/NAME.json`."""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path

from gpt_neo.cli import flags, tfrecords, tokenizer
from gpt_neo.errors import ConfigError

DESCRIPTION = "Write a model config for a dataset, shaped like a preset (and, with --data, make the dataset from a folder of text first)."
EPILOG = """\
examples:
  gpt-neo init --dataset mytext --like demo --data my_text_folder/   # tokenizer, records, configs
  gpt-neo init --dataset pile --like gpt_neo_125M                    # a dataset config you have
  gpt-neo train --model configs/mytext.json

The config is the preset's, with datasets = [[NAME, null, null, null]], n_vocab = the dataset's
tokenizer size, model_path = runs/NAME, and eval_steps > 0 where the dataset has an eval_path."""

EVAL_STEPS = 10  # where the preset evaluates nothing and the dataset has an eval split


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dataset",
        required=True,
        metavar="NAME",
        help="the dataset's name: configs/dataset_configs/NAME.json (made with --data)",
    )
    parser.add_argument(
        "--like",
        default="demo",
        metavar="PRESET",
        help="the preset (demo, gpt_neo_125M, gpt_neo_1.3B, ...) or config file to start from",
    )
    parser.add_argument(
        "--data",
        metavar="DIR",
        help="make the dataset from this folder of text first (.txt, .jsonl, .jsonl.zst, .xz, "
        ".tar.gz; searched recursively)",
    )
    data = parser.add_argument_group("with --data")
    data.add_argument(
        "--encoder_path",
        metavar="TOKENIZER",
        help="use this tokenizer (tokenizer.json, a tokenizer folder, or 'byte') instead of "
        "training one on DIR",
    )
    data.add_argument(
        "--vocab_size",
        type=int,
        metavar="N",
        help="size of the tokenizer trained on DIR (default: the preset's n_vocab)",
    )
    data.add_argument(
        "--eval_fraction",
        type=float,
        default=0.05,
        metavar="F",
        help="share of the documents held out for evaluation",
    )
    parser.add_argument(
        "--output", metavar="FILE", help="where the model config goes (default: configs/NAME.json)"
    )
    parser.add_argument(
        "--model_path", metavar="DIR", help="the run's folder in the config (default: runs/NAME)"
    )
    parser.add_argument("--force", action="store_true", help="overwrite an existing config")
    flags.overrides(parser, "a key of the written config")


def run(args: argparse.Namespace) -> int:
    from gpt_neo.config import (
        find_named_config,
        load_config,
        parse_overrides,
        preset_names,
        read_json_object,
    )
    from gpt_neo.data.dataset_config import load_dataset_config

    name = args.dataset
    if not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise ConfigError(f"--dataset {name!r}: use letters, digits, '-', '_' or '.' (a file name)")
    preset_path = Path(args.like) if args.like.endswith(".json") else None
    preset_path = preset_path or find_named_config(args.like, "configs")
    if preset_path is None or not preset_path.is_file():
        raise ConfigError(
            f"--like {args.like}: no such preset or config file; presets: "
            + ", ".join(preset_names())
        )
    output = Path(args.output or f"configs/{name}.json")
    if output.exists() and not args.force:
        raise ConfigError(f"{output} exists; --force overwrites it, --output FILE writes elsewhere")
    keys = read_json_object(preset_path)
    if args.data:
        _make_dataset(args, name, keys)
    dataset = load_dataset_config(name)
    keys |= {
        "n_vocab": dataset.n_vocab,
        "datasets": [[name, None, None, None]],
        "model_path": args.model_path or f"runs/{name}",
    }
    if dataset.eval_path and not keys.get("eval_steps"):
        keys["eval_steps"] = EVAL_STEPS
    keys |= parse_overrides(args.overrides)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(keys, indent=2) + "\n")
    try:
        load_config(str(output))  # the written file loads, layout checks included
    except ConfigError:
        output.unlink()
        raise
    print(
        f"wrote {output}: {preset_path.stem}'s shape, dataset {name} (n_vocab {dataset.n_vocab}), "
        f"model_path {keys['model_path']}\n"
        f"next:\n    gpt-neo check-data --model {output}\n    gpt-neo summary --model {output}\n"
        f"    gpt-neo train --model {output}"
    )
    return 0


def _make_dataset(args: argparse.Namespace, name: str, preset: dict) -> None:
    """The tokenizer, TFRecords and dataset config of `args.data`, by the data commands."""
    from gpt_neo.data.encoders import TRAINED_TOKENIZER_NAME

    folder = Path("datasets") / name
    encoder = args.encoder_path
    if encoder is None:
        vocab = args.vocab_size or preset.get("n_vocab") or 8192
        argv = ["--input_dir", args.data, "--output_dir", str(folder / "tokenizer")]
        _announce("data tokenizer", argv := [*argv, "--vocab_size", str(vocab)])
        tokenizer.run(tokenizer.parse_args(argv))
        encoder = str(folder / "tokenizer" / TRAINED_TOKENIZER_NAME)
    argv = ["--input_dir", args.data, "--name", name, "--output_dir", str(folder / "tfrecords")]
    argv += ["--encoder_path", encoder, "--eval_fraction", str(args.eval_fraction)]
    argv += ["--write_dataset_config", f"configs/dataset_configs/{name}.json"]
    _announce("data tfrecords", argv)
    tfrecords.run(tfrecords.parse_args(argv))


def _announce(verb: str, argv: list[str]) -> None:
    print(f"$ gpt-neo {verb} {shlex.join(argv)}", flush=True)

"""Dataset configs (`configs/dataset_configs/<id>.json`), GPT-Neo's format.

    {"n_vocab": 50257, "path": "gs://bucket/pile_*.tfrecords", "eval_path": "...",
     "tokenizer_is_pretrained": true, "tokenizer_path": "gpt2", "eos_id": 50256, "padding_id": 50257}

A model config's `datasets` entries name them by id (the file stem) or by path. Only `n_vocab`
is required: a config without `path` names a tokenizer for sampling and evaluation alone. Relative data
paths are relative to the working directory, as in GPT-Neo. `mode` (not a GPT-Neo key) records
how `data/create_tfrecords.py` wrote the records: `documents`, `chunks`, or `sft` (fine-tuning
records with a loss mask; read `packed` unless the model config says otherwise).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from gpt_neo.config import REPO_ROOT, find_named_config, read_json_object
from gpt_neo.data.encoders import Encoder, check_vocab_fits, load_encoder
from gpt_neo.errors import ConfigError, DataError, UserError, warn

KEYS = {
    "n_vocab",
    "path",
    "eval_path",
    "tokenizer_is_pretrained",
    "tokenizer_path",
    "eos_id",
    "padding_id",
    "lambada_tokens_path",
    "mode",
}


@dataclass(frozen=True)
class DatasetConfig:
    name: str
    n_vocab: int
    path: str = ""  # empty: a config that only names a tokenizer (`gpt-neo import hf` writes one)
    eval_path: str = ""
    tokenizer_path: str | None = None
    tokenizer_is_pretrained: bool = False
    eos_id: int = 1  # GPT-Neo's defaults
    padding_id: int = 0
    lambada_tokens_path: str | None = None
    mode: str | None = None
    given: frozenset[str] = field(
        default=frozenset(), compare=False, repr=False
    )  # keys the file set

    def encoder(self) -> Encoder:
        if self.tokenizer_path is None:
            raise ConfigError(f"dataset '{self.name}' names no tokenizer_path")
        return load_encoder(self.tokenizer_path)

    def to_json(self) -> dict:
        unset = (None, "")  # an empty path or eval_path: none (a tokenizer-only config)
        return {
            k: v for k, v in asdict(self).items() if k not in ("name", "given") and v not in unset
        }


def resolve_dataset_config_path(dataset_id: str) -> Path:
    if dataset_id.endswith(".json"):
        path = Path(dataset_id)
        if path.is_file():
            return path
        raise ConfigError(f"dataset config not found: {dataset_id}")
    if path := find_named_config(dataset_id, "configs/dataset_configs"):
        return path
    raise ConfigError(
        f"dataset '{dataset_id}': no configs/dataset_configs/{dataset_id}.json here or in "
        f"{REPO_ROOT}; make it from a folder of text with `gpt-neo init --dataset {dataset_id} "
        "--data DIR` (or `gpt-neo data tfrecords ... --write_dataset_config`), or name a .json "
        "path in 'datasets'"
    )


def load_dataset_config(dataset_id: str) -> DatasetConfig:
    path = resolve_dataset_config_path(dataset_id)
    raw = read_json_object(path)
    if unknown := sorted(set(raw) - KEYS):
        raise ConfigError(f"{path}: unknown key(s) {unknown}; known: {sorted(KEYS)}")
    if "n_vocab" not in raw:
        raise ConfigError(f"{path}: required key 'n_vocab' is missing")
    if raw["n_vocab"] is None:
        raise ConfigError(f"{path}: 'n_vocab' is null; it is required")
    for key, value in raw.items():
        if value is not None and (problem := _type_problem(key, value, raw["n_vocab"])):
            raise ConfigError(f"{path}: '{key}' = {json.dumps(value)} {problem}")
    values = {k: v for k, v in raw.items() if v is not None}
    return DatasetConfig(name=path.stem, given=frozenset(values), **values)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _type_problem(key: str, value, n_vocab) -> str | None:
    """What is wrong with one dataset config value, or None."""
    if key == "n_vocab":
        return None if _is_int(value) and value >= 1 else "must be a positive integer"
    if key in ("eos_id", "padding_id"):
        if not _is_int(value) or value < 0:
            return "must be a token id (an integer >= 0)"
        # GPT-Neo's padding id is often n_vocab itself (a row past the tokenizer); the end of
        # text is appended to documents, so it must be a real token
        if key == "eos_id" and _is_int(n_vocab) and value >= n_vocab:
            return f"must be below n_vocab {n_vocab}"
        return None
    if key == "tokenizer_is_pretrained":
        return None if isinstance(value, bool) else "must be true or false"
    if key == "mode":
        modes = ("documents", "chunks", "sft")
        return None if value in modes else "must be 'documents', 'chunks' or 'sft'"
    if key == "path" and value == "":
        return "must name the TFRecord files (a local or gs:// glob)"
    return None if isinstance(value, str) else "must be a string (a path)"


def write_dataset_config(cfg: DatasetConfig, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cfg.to_json(), indent=2) + "\n")
    return path


def model_dataset(cfg) -> DatasetConfig:
    """The dataset whose tokenizer and eos/padding ids the model uses: the last one listed
    (GPT-Neo took `eos_id` and `padding_id` from the last dataset config)."""
    if not cfg.datasets:
        raise ConfigError(
            "the config lists no 'datasets', so there is no tokenizer to turn text into tokens; "
            "add the dataset the model was trained on"
        )
    return load_dataset_config(cfg.datasets[-1].dataset_id)


def model_tokenizer(cfg) -> tuple[Encoder, int | None]:
    """(encoder, eos id) the model reads and writes text with: the tokenizer of its (last)
    dataset, checked to fit n_vocab; `cfg.eos_id` wins over the dataset's."""
    dataset = model_dataset(cfg)
    encoder = dataset.encoder()
    check_vocab_fits(encoder, cfg.n_vocab, f"dataset '{dataset.name}'")
    return encoder, cfg.eos_id if cfg.eos_id is not None else dataset.eos_id


def tokenizer_identity(encoder: Encoder, spec: str | None) -> dict:
    """What tells one tokenizer from another: its size and a digest of its vocabulary."""
    vocab = getattr(encoder, "tokenizer", None)
    listing = sorted(vocab.get_vocab(with_added_tokens=True).items()) if vocab else encoder.name
    digest = hashlib.sha256(json.dumps(listing).encode()).hexdigest()[:16]
    return {"tokenizer": spec, "vocab_size": encoder.vocab_size, "digest": digest}


def check_run_tokenizer(cfg, started_with: dict | None, *, needed: bool) -> dict | None:
    """The model's tokenizer as it is now, checked against `started_with` (the identity a
    checkpoint recorded): another size is an error (the run's records, its samples and its
    exports would disagree with it). Training itself reads token ids, so a tokenizer that
    cannot be loaded is only an error when `needed` (sampling during training); else it
    returns `started_with` after a warning."""
    try:
        dataset = model_dataset(cfg)
        encoder = dataset.encoder()
        check_vocab_fits(encoder, cfg.n_vocab, f"dataset '{dataset.name}'")
    except UserError as err:
        if needed:
            raise
        if started_with is not None:
            warn(f"the run's tokenizer cannot be loaded now ({err}); --predict and --eval need it")
        return started_with
    now = tokenizer_identity(encoder, dataset.tokenizer_path)
    if started_with is None:
        return now
    if now["vocab_size"] != started_with["vocab_size"]:
        raise DataError(
            f"tokenizer {now['tokenizer']} now has {now['vocab_size']} ids, but this run was "
            f"started with one of {started_with['vocab_size']} ids (its records, samples and "
            "exports are in those ids): put back the tokenizer the run started with, or start a "
            "new run (--new)"
        )
    if now["digest"] != started_with["digest"]:
        warn(
            f"tokenizer {now['tokenizer']} has the same size as the one this run started with "
            "but other tokens; samples and exports will decode with the new one"
        )
    return now

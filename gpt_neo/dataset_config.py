"""Dataset configs (`configs/dataset_configs/<id>.json`), GPT-Neo's format.

    {"n_vocab": 50257, "path": "gs://bucket/pile_*.tfrecords", "eval_path": "...",
     "tokenizer_is_pretrained": true, "tokenizer_path": "gpt2", "eos_id": 50256, "padding_id": 50257}

A model config's `datasets` entries name them by id (the file stem) or by path. Relative data
paths are relative to the working directory, as in GPT-Neo. `mode` (not a GPT-Neo key) records
how `data/create_tfrecords.py` wrote the records: `documents` or `chunks`.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from gpt_neo.config import REPO_ROOT, find_named_config, read_json_object
from gpt_neo.encoders import Encoder, check_vocab_fits, load_encoder
from gpt_neo.errors import ConfigError

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
    path: str
    eval_path: str = ""
    tokenizer_path: str | None = None
    tokenizer_is_pretrained: bool = False
    eos_id: int = 1  # GPT-Neo's defaults
    padding_id: int = 0
    lambada_tokens_path: str | None = None
    mode: str | None = None

    def encoder(self) -> Encoder:
        if self.tokenizer_path is None:
            raise ConfigError(f"dataset '{self.name}' names no tokenizer_path")
        return load_encoder(self.tokenizer_path)

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "name" and v is not None}


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
        f"{REPO_ROOT}; write one (see data/create_tfrecords.py --write_dataset_config) or name "
        "a .json path in 'datasets'"
    )


def load_dataset_config(dataset_id: str) -> DatasetConfig:
    path = resolve_dataset_config_path(dataset_id)
    raw = read_json_object(path)
    if unknown := sorted(set(raw) - KEYS):
        raise ConfigError(f"{path}: unknown key(s) {unknown}; known: {sorted(KEYS)}")
    for key in ("n_vocab", "path"):
        if key not in raw:
            raise ConfigError(f"{path}: required key '{key}' is missing")
    if not isinstance(raw["n_vocab"], int) or raw["n_vocab"] < 1:
        raise ConfigError(f"{path}: 'n_vocab' must be a positive integer")
    if raw.get("mode") not in (None, "documents", "chunks"):
        raise ConfigError(f"{path}: 'mode' must be 'documents' or 'chunks'")
    return DatasetConfig(name=path.stem, **{k: v for k, v in raw.items() if v is not None})


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

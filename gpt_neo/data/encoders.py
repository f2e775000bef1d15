"""Tokenizers: GPT-2 byte-level BPE (vocab.json + merges.txt), any Hugging Face
`tokenizer.json`, and a lossless byte-level tokenizer. Nothing is ever downloaded.

`load_encoder(spec)` takes:
- `"gpt2"`: GPT-2's tokenizer from a local directory holding `vocab.json` + `merges.txt` (or
  `tokenizer.json`), named by the `GPT_NEO_GPT2_DIR` environment variable;
- `"byte"`: bytes 0..255 are ids 0..255, `<|endoftext|>` is 256, `<|padding|>` is 257;
- a path to a `tokenizer.json`, or to a directory holding one or `vocab.json` + `merges.txt`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from gpt_neo.errors import ConfigError, DataError

GPT2_DIR_ENV = "GPT_NEO_GPT2_DIR"
EOS_TOKENS = ("<|endoftext|>", "</s>", "<eos>")
PAD_TOKENS = ("<|padding|>", "<pad>", "[PAD]")


class Encoder(Protocol):
    """What the rest of the library needs from a tokenizer."""

    name: str
    vocab_size: int  # ids are in [0, vocab_size)
    eos_id: int | None
    padding_id: int | None

    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: list[str]) -> list[list[int]]: ...

    def decode(self, ids) -> str: ...


@dataclass
class ByteEncoder:
    """UTF-8 bytes as tokens: lossless for any text, no training needed."""

    name: str = "byte"
    vocab_size: int = 258
    eos_id: int | None = 256
    padding_id: int | None = 257

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8", errors="surrogateescape"))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids) -> str:
        data = bytes(int(i) for i in np.asarray(ids).ravel() if int(i) < 256)
        return data.decode("utf-8", errors="replace")


class HFEncoder:
    """A Hugging Face `tokenizers.Tokenizer`. Special tokens that occur literally in text are
    encoded as text (so a document containing "<|endoftext|>" does not end early), and decoding
    keeps every token, so encode -> decode is lossless for byte-level BPE tokenizers."""

    def __init__(self, tokenizer, name: str):
        self.tokenizer = tokenizer
        self.tokenizer.encode_special_tokens = True
        self.name = name
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        vocab = tokenizer.get_vocab(with_added_tokens=True)
        self.eos_id = next((vocab[t] for t in EOS_TOKENS if t in vocab), None)
        self.padding_id = next((vocab[t] for t in PAD_TOKENS if t in vocab), None)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self.tokenizer.decode(
            [int(i) for i in np.asarray(ids).ravel()], skip_special_tokens=False
        )


def _from_vocab_merges(folder: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    bpe = models.BPE.from_file(str(folder / "vocab.json"), str(folder / "merges.txt"))
    tokenizer = Tokenizer(bpe)
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _from_folder(folder: Path, name: str) -> Encoder:
    if (folder / "tokenizer.json").is_file():
        return load_encoder(folder / "tokenizer.json")
    if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        try:
            return HFEncoder(_from_vocab_merges(folder), name)
        except Exception as err:  # tokenizers raises bare Exceptions for unreadable files
            raise DataError(f"{folder}: vocab.json/merges.txt do not parse: {err}") from None
    raise DataError(
        f"{folder}: no tokenizer.json, and no vocab.json + merges.txt; put the tokenizer files there"
    )


def load_encoder(spec: str | os.PathLike) -> Encoder:
    """A tokenizer from a name or path (see the module docstring). Raises `DataError` (or `ConfigError` for
    an unset GPT2 directory)."""
    from tokenizers import Tokenizer

    text = str(spec)
    if text == "byte":
        return ByteEncoder()
    if text == "gpt2":
        folder = os.environ.get(GPT2_DIR_ENV)
        if not folder:
            raise ConfigError(
                "tokenizer 'gpt2' is read from local files, never downloaded: set "
                f"{GPT2_DIR_ENV} to a directory holding GPT-2's vocab.json and merges.txt (or "
                "its tokenizer.json), e.g. a copy of a Hugging Face gpt2 model folder"
            )
        return _from_folder(Path(folder), "gpt2")
    path = Path(text)
    if path.is_dir():
        return _from_folder(path, path.name)
    if not path.is_file():
        raise DataError(f"tokenizer file not found: {text}")
    try:
        return HFEncoder(Tokenizer.from_file(str(path)), path.name)
    except Exception as err:  # tokenizers raises bare Exceptions for malformed JSON
        raise DataError(
            f"{path}: not a Hugging Face tokenizer.json ({str(err).splitlines()[0]}); "
            "give a tokenizer.json written by `tokenizers` or data/train_tokenizer.py"
        ) from None


def check_vocab_fits(encoder: Encoder, n_vocab: int, where: str) -> None:
    """The model's embedding must have a row for every id the tokenizer produces."""
    if encoder.vocab_size > n_vocab:
        raise ConfigError(
            f"{where}: tokenizer '{encoder.name}' has {encoder.vocab_size} tokens but the model's "
            f"n_vocab is {n_vocab}; raise n_vocab to at least {encoder.vocab_size} (GPT-Neo pads "
            "to a multiple of 64 or 128, e.g. 50304 for GPT-2's 50257)"
        )


TRAINED_TOKENIZER_NAME = "byte-level-bpe.tokenizer.json"
SPECIAL_TOKENS = ("<|endoftext|>", "<|padding|>")  # ids 0 and 1, as GPT-Neo's trainer


def train_byte_level_bpe(texts, vocab_size: int, *, min_frequency: int = 2):
    """Train a GPT-2 style byte-level BPE on an iterator of documents.

    Lossless by construction: no normalizer, every byte in the initial alphabet, no prefix space
    added on encode or left on decode. (GPT-Neo's trainer applied NFKC and a prefix space,
    so decoded text differed from the source.) `<|endoftext|>` is id 0, `<|padding|>` id 1.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ConfigError(f"--vocab_size {vocab_size} is below the 258 a byte-level BPE needs")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer

"""Tokenizers: lossless round trips, GPT-2 style files, local-only resolution, size checks."""

import json

import pytest
from tokenizers import Tokenizer

from gpt_neo.data.dataset_config import load_dataset_config
from gpt_neo.data.encoders import GPT2_DIR_ENV, ByteEncoder, check_vocab_fits, load_encoder
from gpt_neo.errors import ConfigError, DataError
from tests.support.helpers import SAMPLE_TEXTS, train_tokenizer_file


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    return train_tokenizer_file(tmp_path_factory.mktemp("tok"))


@pytest.mark.parametrize("text", SAMPLE_TEXTS)
def test_trained_byte_level_bpe_is_lossless(tokenizer_path, text):
    encoder = load_encoder(tokenizer_path)
    ids = encoder.encode(text)
    assert encoder.decode(ids) == text
    assert len(ids) < len(text.encode())  # it really merges, not just bytes


def test_literal_special_token_text_is_not_a_special_token(tokenizer_path):
    encoder = load_encoder(tokenizer_path)
    assert encoder.eos_id == 0 and encoder.padding_id == 1  # GPT-Neo's trainer's ids
    assert encoder.eos_id not in encoder.encode("x <|endoftext|> y")


def test_encode_batch_equals_encode(tokenizer_path):
    encoder = load_encoder(tokenizer_path)
    assert encoder.encode_batch(SAMPLE_TEXTS) == [encoder.encode(t) for t in SAMPLE_TEXTS]


def test_vocab_and_merges_files_load_like_gpt2(tokenizer_path, tmp_path):
    trained = Tokenizer.from_file(str(tokenizer_path))
    trained.model.save(str(tmp_path))  # writes GPT-2 style vocab.json + merges.txt
    trained.encode_special_tokens = True  # as our encoders: "<|endoftext|>" in text is text
    assert (tmp_path / "vocab.json").exists() and (tmp_path / "merges.txt").exists()
    encoder = load_encoder(tmp_path)
    for text in SAMPLE_TEXTS:
        assert encoder.encode(text) == trained.encode(text).ids
        assert encoder.decode(encoder.encode(text)) == text


def test_gpt2_resolves_to_a_local_folder_or_explains(tokenizer_path, tmp_path, monkeypatch):
    monkeypatch.delenv(GPT2_DIR_ENV, raising=False)
    with pytest.raises(ConfigError, match=GPT2_DIR_ENV):
        load_encoder("gpt2")
    Tokenizer.from_file(str(tokenizer_path)).model.save(str(tmp_path))
    monkeypatch.setenv(GPT2_DIR_ENV, str(tmp_path))
    assert load_encoder("gpt2").decode(load_encoder("gpt2").encode("hello")) == "hello"


def test_byte_encoder_round_trips_any_text():
    encoder = ByteEncoder()
    for text in SAMPLE_TEXTS:
        ids = encoder.encode(text)
        assert ids == list(text.encode()) and encoder.decode(ids) == text
    assert encoder.eos_id == 256 and encoder.vocab_size == 258


def test_a_tokenizer_file_that_does_not_parse(tmp_path):
    bad = tmp_path / "tokenizer.json"
    bad.write_text('{"version": "1.0", "model": ')
    with pytest.raises(DataError, match=r"not a Hugging Face tokenizer\.json"):
        load_encoder(bad)
    with pytest.raises(DataError, match="tokenizer file not found"):
        load_encoder(tmp_path / "missing.json")


def test_tokenizer_larger_than_n_vocab_is_refused(tokenizer_path):
    encoder = load_encoder(tokenizer_path)
    check_vocab_fits(encoder, encoder.vocab_size, "model")
    with pytest.raises(ConfigError, match=f"raise n_vocab to at least {encoder.vocab_size} "):
        check_vocab_fits(encoder, encoder.vocab_size - 1, "model")


def test_dataset_configs_resolve_by_path_and_by_id(tmp_path, monkeypatch, tokenizer_path):
    folder = tmp_path / "configs" / "dataset_configs"
    folder.mkdir(parents=True)
    raw = {
        "n_vocab": 400,
        "path": "x_*.tfrecords",
        "tokenizer_path": str(tokenizer_path),
        "eos_id": 0,
        "padding_id": 1,
    }
    (folder / "mine.json").write_text(json.dumps(raw))
    monkeypatch.chdir(tmp_path)
    by_id = load_dataset_config("mine")
    assert by_id.name == "mine" and by_id.n_vocab == 400
    assert load_dataset_config(str(folder / "mine.json")) == by_id
    assert by_id.encoder().decode(by_id.encoder().encode("abc")) == "abc"
    (folder / "typo.json").write_text(json.dumps({**raw, "n_vocb": 3}))
    with pytest.raises(ConfigError, match="unknown key"):
        load_dataset_config("typo")
    with pytest.raises(ConfigError, match=r"no configs/dataset_configs/absent\.json"):
        load_dataset_config("absent")


def test_gpt_neo_shipped_dataset_configs_parse():
    from tests.support.helpers import GPT_NEO_CONFIGS

    for path in sorted((GPT_NEO_CONFIGS / "dataset_configs").glob("*.json")):
        cfg = load_dataset_config(str(path))
        assert cfg.n_vocab in (32768, 50257)

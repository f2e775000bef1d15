"""A Hugging Face model folder on disk: its config.json, its weights and its tokenizer files,
read and written without PyTorch or `transformers`.

Weights are safetensors, read and written by `safetensors.numpy`: one `model.safetensors`, or
the shards a `model.safetensors.index.json` names. float32, bfloat16 and float16 tensors are
read and widened to float32 (exactly: every bfloat16 and float16 value is a float32 value);
NumPy has no bfloat16 of its own, so `ml_dtypes` (a JAX dependency) registers it, after which
safetensors reads and writes BF16 as it does F32. Export writes float32 or bfloat16 (rounded to
nearest even, as `torch.Tensor.bfloat16` does). Legacy `pytorch_model.bin` folders need torch,
loaded with `weights_only=True`, which refuses pickled code.

A folder is written under temporary names and renamed at the end, so a crash never leaves a
model half written; `gs://` destinations are written locally, then copied.

Tokenizers travel as their files (`TOKENIZER_FILES`): tokenizer.json (which `load_encoder`
reads), tokenizer_config.json with its `chat_template`, chat_template.jinja (transformers 5
saves the template there), special_tokens_map.json, generation_config.json (eos ids and
sampling defaults that transformers' `generate` reads). Copied as they are, both ways, so
`AutoTokenizer.from_pretrained` of an exported folder is the tokenizer that was imported.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import ml_dtypes  # registers bfloat16 with NumPy, so safetensors.numpy reads and writes BF16
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from gpt_neo import storage
from gpt_neo.data.encoders import HFEncoder, load_encoder
from gpt_neo.errors import ConfigError, DataError, first_line

# The dtypes an export writes, and the NumPy type of each.
EXPORT_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}
# The stored dtypes an import widens to float32 (anything else is quantized or not a weight).
READABLE_DTYPES = frozenset({"float32", "bfloat16", "float16"})

# The files of a Hugging Face tokenizer (and its chat and generation settings) kept with an
# imported model and written back on export. `load_encoder` reads tokenizer.json (or
# vocab.json + merges.txt); the others are for transformers' AutoTokenizer and generate.
TOKENIZER_FILES = (
    "tokenizer.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "generation_config.json",
)


def read_config(folder: Path) -> dict:
    if not (folder / "config.json").is_file():
        raise ConfigError(f"{folder}: no config.json; not a Hugging Face model folder")
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"{folder}/config.json: not readable JSON ({first_line(err)})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{folder}/config.json: not a JSON object")
    return config


def read_weights(folder: Path) -> dict[str, np.ndarray]:
    """Every tensor of the folder, float32, by its stored name."""
    if (folder / "model.safetensors").is_file():
        return dict(_read_safetensors(folder / "model.safetensors"))
    if (index := folder / "model.safetensors.index.json").is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError) as err:
            raise DataError(f"{index}: not a safetensors index ({first_line(err)})") from None
        return {k: v for shard in shards for k, v in _read_safetensors(folder / shard)}
    if (folder / "pytorch_model.bin").is_file():
        try:
            import torch
        except ImportError:
            raise ConfigError(
                f"{folder}/pytorch_model.bin needs PyTorch to read (pip install torch), or "
                "convert the folder to safetensors"
            ) from None
        state = torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
        return {k: v.float().numpy() for k, v in state.items()}
    raise DataError(
        f"{folder}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin"
    )


def _read_safetensors(path: Path) -> Iterator[tuple[str, np.ndarray]]:
    if not path.is_file():
        raise DataError(f"{path}: missing (the folder's index names it); the folder is incomplete")
    try:
        with safe_open(str(path), framework="numpy") as handle:
            for name in handle.keys():  # noqa: SIM118 (a safe_open handle is not iterable)
                tensor = handle.get_tensor(name)
                if tensor.dtype.name not in READABLE_DTYPES:
                    raise DataError(
                        f"{path}: weight {name} is {tensor.dtype.name}; only float32, bfloat16 "
                        "and float16 weights are read (a quantized model cannot be imported)"
                    )
                yield name, tensor.astype(np.float32)
    except DataError:
        raise
    except Exception as err:  # safetensors raises its own error types for corrupt files
        raise DataError(f"{path}: not a readable safetensors file ({first_line(err)})") from None


def write_model_folder(
    out_dir: str | os.PathLike,
    tensors: dict[str, np.ndarray],
    config: dict,
    *,
    dtype: str = "float32",
    force: bool = False,
    tokenizer: str | None = None,
) -> Path | str:
    """config.json + model.safetensors (`dtype`) [+ the tokenizer of `tokenizer`, a
    `load_encoder` spec] in `out_dir`, local or `gs://`. Refuses an existing non-empty
    `out_dir` unless `force`."""
    if dtype not in EXPORT_DTYPES:
        raise ConfigError(f"export dtype {dtype!r}: choose one of {', '.join(EXPORT_DTYPES)}")
    if storage.is_remote(str(out_dir)):  # written locally, then copied: safetensors wants a file
        if storage.listdir(str(out_dir)) and not force:
            raise FileExistsError(f"{out_dir} exists and is not empty; choose another or force")
        with tempfile.TemporaryDirectory() as local:
            write_model_folder(local, tensors, config, dtype=dtype, tokenizer=tokenizer)
            storage.copy_tree(local, str(out_dir))
        return str(out_dir)
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not force:
        raise FileExistsError(f"{out} exists and is not empty; choose another directory or force")
    out.mkdir(parents=True, exist_ok=True)
    stored = {
        name: np.ascontiguousarray(np.asarray(a, np.float32).astype(EXPORT_DTYPES[dtype]))
        for name, a in tensors.items()
    }
    # Write under temporary names, then rename: a crash never leaves a half-written model.
    tmp_weights, tmp_config = out / ".model.safetensors.tmp", out / ".config.json.tmp"
    save_file(stored, str(tmp_weights), metadata={"format": "pt"})
    tmp_config.write_text(json.dumps(config, indent=2) + "\n")
    os.replace(tmp_weights, out / "model.safetensors")
    os.replace(tmp_config, out / "config.json")
    if tokenizer is not None:
        export_tokenizer(tokenizer, out)
    return out


def export_tokenizer(spec: str, out: Path) -> None:
    """The tokenizer of `spec` into `out`: a folder's tokenizer files as they are (its
    chat template and generation settings too); a lone tokenizer.json with a minimal
    tokenizer_config.json naming its eos token."""
    source = Path(spec)
    if source.is_dir() and (source / "tokenizer_config.json").is_file():
        copy_tokenizer_files(source, out)
        return
    encoder = load_encoder(spec)
    if not isinstance(encoder, HFEncoder):
        print(f"tokenizer {spec!r} is not a Hugging Face tokenizer; exported without one")
        return
    encoder.tokenizer.save(str(out / "tokenizer.json"))
    vocab = encoder.tokenizer.get_vocab(with_added_tokens=True)
    eos = {v: k for k, v in vocab.items()}.get(encoder.eos_id)
    settings = {"tokenizer_class": "PreTrainedTokenizerFast"}
    if eos is not None:
        settings |= {"eos_token": eos, "bos_token": eos, "unk_token": eos}
    (out / "tokenizer_config.json").write_text(json.dumps(settings, indent=2) + "\n")


def copy_tokenizer_files(source: Path, destination: Path) -> list[str]:
    """Copy the `TOKENIZER_FILES` that `source` holds; returns their names."""
    destination.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, destination / name)
            copied.append(name)
    return copied


def tokenizer_in(folder: Path) -> bool:
    """Whether `folder` holds a tokenizer `load_encoder` reads (a broken one is not kept)."""
    try:
        load_encoder(folder)
    except DataError:
        return False
    return True


def read_json(path: Path) -> dict:
    """A JSON object file, or {} when it is absent or not an object."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def tokenizer_eos_id(folder: Path) -> int | None:
    """The id of tokenizer_config.json's `eos_token` in the folder's tokenizer (None when
    either is missing)."""
    eos = read_json(folder / "tokenizer_config.json").get("eos_token")
    if isinstance(eos, dict):  # an AddedToken's fields
        eos = eos.get("content")
    if not isinstance(eos, str) or not tokenizer_in(folder):
        return None
    encoder = load_encoder(folder)
    return encoder.tokenizer.token_to_id(eos) if isinstance(encoder, HFEncoder) else None


def generation_token_ids(spec: str | None) -> dict:
    """bos/pad ids of the generation_config.json beside a tokenizer folder `spec` (for the
    config.json an export writes)."""
    if spec is None or not Path(spec).is_dir():
        return {}
    settings = read_json(Path(spec) / "generation_config.json")
    return {
        key: settings[key]
        for key in ("bos_token_id", "pad_token_id")
        if isinstance(settings.get(key), int)
    }

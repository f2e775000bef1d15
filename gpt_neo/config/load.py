"""Config files -> the merged key/value mapping a `Config` is checked from: GPT-Neo's `--model`
names (`configs/<name>.json`, here or installed), several files merged in order, `--set`
overrides last, and JSON errors that name the spot.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from gpt_neo.config.check import Config, expand_attention_types, from_dict
from gpt_neo.config.rules import repeating_pattern
from gpt_neo.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[2]  # gpt_neo/config/load.py -> the checkout


def load_config(
    path_or_paths: str | os.PathLike | Sequence[str | os.PathLike],
    overrides: Mapping[str, object] | Sequence[str] | None = None,
) -> Config:
    """Read one or more GPT-Neo JSON configs, merge them in order (later wins), apply overrides.

    `overrides` is a mapping or a list of `"key=value"` strings (value parsed as JSON, else kept
    as a string); it applies last. Overriding `n_layer` alone keeps the file's repeating
    attention pattern (12 x [global, local] becomes 2 x [global, local] for n_layer=4). A bare
    name such as `gpt_neo_125M` is looked up as `configs/<name>.json`, like GPT-Neo's `--model`.
    Raises `ConfigError`. The layout is not checked against the model here
    (`gpt_neo.mesh.check_layout`; `gpt_neo.load_config` runs both).
    """
    paths = _as_list(path_or_paths)
    merged = merged_keys(paths)
    changes = parse_overrides(overrides)
    merged.update(changes)
    if "n_layer" in changes and "attention_types" not in changes and "attention_types" in merged:
        # n_layer=4 on a file with [[["global","local"],12]]: keep the pattern, repeat it less
        kinds = expand_attention_types(merged["attention_types"], source_of(paths))
        pattern = repeating_pattern(kinds)
        n_layer = changes["n_layer"]
        if isinstance(n_layer, int) and n_layer > 0 and n_layer % len(pattern) == 0:
            merged["attention_types"] = [[list(pattern), n_layer // len(pattern)]]
    return from_dict(merged, source=source_of(paths))


def merged_keys(path_or_paths) -> dict:
    """The keys of one or more JSON config files merged in order (later wins), unchecked: a
    file of run keys alone (datasets, batch size, ...) is one too."""
    paths = _as_list(path_or_paths)
    if not paths:
        raise ConfigError("no config file given: pass at least one JSON config")
    merged: dict = {}
    for path in paths:
        merged.update(read_json_object(resolve_config_path(path)))
    return merged


def _as_list(path_or_paths) -> list:
    return [path_or_paths] if isinstance(path_or_paths, str | os.PathLike) else list(path_or_paths)


def source_of(path_or_paths) -> str:
    """How error messages name the config file(s): `a.json + b.json`."""
    return " + ".join(str(resolve_config_path(p)) for p in _as_list(path_or_paths))


def find_named_config(name: str, folder: str) -> Path | None:
    """`<folder>/<name>.json` (folder: `configs` or `configs/dataset_configs`) under the
    working directory, else under this checkout, else among the configs installed with the
    package (`gpt_neo.presets`: `configs/` as a wheel carries it)."""
    for base in (Path.cwd() / folder, REPO_ROOT / folder, _presets() / folder.partition("/")[2]):
        if (path := base / f"{name}.json").is_file():
            return path
    return None


def preset_names() -> list[str]:
    """The configs installed with the package (or in this checkout's configs/), by name."""
    return sorted(path.stem for path in _presets().glob("*.json"))


def _presets() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("gpt_neo.presets")  # a data folder: no module to import
    if spec is None or not spec.submodule_search_locations:  # a checkout, not installed
        return REPO_ROOT / "configs"
    return Path(next(iter(spec.submodule_search_locations)))


def resolve_config_path(path: str | os.PathLike) -> Path:
    candidate = Path(path)
    if candidate.is_file():
        return candidate
    if candidate.suffix != ".json" and (named := find_named_config(str(candidate), "configs")):
        return named
    raise ConfigError(
        f"config file not found: {path}. Pass a path to a .json file or the name of a file "
        "in configs/ (for example --model gpt_neo_125M)."
    )


def read_json_object(path: Path) -> dict:
    """A JSON object from a UTF-8 file; any problem is a `ConfigError` naming the spot."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"{path}: byte {err.start} is not UTF-8; save the config as UTF-8 JSON"
        ) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(
            f"{path}: line {err.lineno}, column {err.colno}: malformed JSON ({err.msg}). "
            "Fix the JSON syntax there (a trailing comma or a missing quote is typical)."
        ) from None
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: a config must be a JSON object {{...}}, not {type(data).__name__}"
        )
    return data


def parse_overrides(overrides: Mapping[str, object] | Sequence[str] | None) -> dict:
    if overrides is None:
        return {}
    if isinstance(overrides, Mapping):
        return dict(overrides)
    parsed = {}
    for item in overrides:
        key, sep, raw = str(item).partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. n_layer=4)")
        try:
            parsed[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            parsed[key.strip()] = raw
    return parsed

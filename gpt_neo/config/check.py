"""The typed checker: a merged key/value mapping (GPT-Neo's JSON) -> one frozen `Config`, and
back. Every key goes through one path: canonical names (GPT-Neo's aliases; refused and unknown
keys are errors, with the closest known key suggested), its declared type (`values`: `true` is
not an integer, `"12"` is not one, a `Literal` key takes one of its strings), the keys parsed
apart (attention_types, datasets, moe_layers, moe_params), then the checks across keys
(`rules`).

GPT-Neo read its JSON into a `defaultdict(lambda: None)`, so a typo silently became `None` and
`"rotary_emb": false` switched rotary embeddings *on*; here everything downstream trusts the
checked `Config`. Whether a `layout` fits the model's tensors is `gpt_neo.mesh.check_layout`'s
to say (`gpt_neo.load_config` runs both).
"""

from __future__ import annotations

import difflib
import json
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from gpt_neo.config import rules, values
from gpt_neo.config.moe import moe_params_to_dict, parse_moe_layers, parse_moe_params
from gpt_neo.config.rope import parse_rope_scaling, rope_scaling_to_dict
from gpt_neo.config.schema import (
    ALIASES,
    DERIVED,
    FIELDS,
    KNOWN_KEYS,
    NOT_NEEDED,
    NULL_MEANS_OFF,
    REFUSED,
    REQUIRED,
    SINGLE_VALUE,
    Architecture,
    Data,
    DatasetEntry,
    Evaluation,
    Optimization,
    Run,
)
from gpt_neo.errors import ConfigError

# Parsed by their own functions rather than by their type.
PARSED_APART = ("attention_types", "datasets", "moe_layers", "moe_params", "rope_scaling")


@dataclass(frozen=True, kw_only=True)
class Config(Evaluation, Data, Run, Optimization, Architecture):
    """A checked GPT-Neo model config: every group's keys as attributes (`cfg.n_embd`,
    `cfg.lr`, `cfg.model_path`). The bases are listed in reverse so that the fields keep the
    groups' order (Architecture first), the order of docs/config.md and of `to_dict`."""

    def replace(self, **changes) -> Config:
        """A copy with `changes` applied and checked again."""
        return from_dict({**to_dict(self), **changes}, source="Config.replace")


_HINTS = typing.get_type_hints(Config)


def default_of(key: str):
    """A key's default as `to_dict` writes it (for configs saved before the key existed)."""
    default = FIELDS[key].default
    return list(default) if isinstance(default, tuple) else default


def to_dict(cfg: Config) -> dict:
    """The config as plain JSON-able values (attention_types flat, datasets as 4-lists)."""
    out = {}
    for name in FIELDS:
        value = getattr(cfg, name)
        if name == "datasets":
            value = [[d.dataset_id, d.stitch, d.sampling_mode, d.weight] for d in value]
        elif name == "moe_params" and value is not None:
            value = moe_params_to_dict(value)
        elif name == "rope_scaling" and value is not None:
            value = rope_scaling_to_dict(value)
        elif name in DERIVED and value == DERIVED[name](cfg):
            value = 0  # derived: follows the keys it comes from (`schema.DERIVED`)
        elif isinstance(value, tuple):
            value = list(value)
        out[name] = value
    return out


def from_dict(raw: Mapping[str, object], *, source: str = "<dict>") -> Config:
    """Validate a merged key -> value mapping into a `Config`. Raises `ConfigError`."""
    given = _canonical_keys(dict(raw), source)
    given = {k: v for k, v in given.items() if not (v is None and k in NULL_MEANS_OFF)}
    for key in REQUIRED:
        if given.get(key) is None:
            raise ConfigError(f"{source}: required key '{key}' is missing")
    kwargs: dict[str, Any] = {
        key: _coerce(key, value, _HINTS[key], source) for key, value in given.items()
    }
    if "attention_types" in given:
        kwargs["attention_types"] = expand_attention_types(given["attention_types"], source)
    else:
        kwargs["attention_types"] = ("global",) * kwargs["n_layer"]
    if "datasets" in given:
        kwargs["datasets"] = _parse_datasets(given["datasets"], source)
    if "moe_layers" in given:
        kwargs["moe_layers"] = parse_moe_layers(given["moe_layers"], kwargs["n_layer"], source)
    if given.get("moe_params") is not None:
        kwargs["moe_params"] = parse_moe_params(given["moe_params"], source)
    if given.get("rope_scaling") is not None:
        kwargs["rope_scaling"] = parse_rope_scaling(given["rope_scaling"], source)
    if kwargs.get("lr_decay") is None and "lr_decay" in kwargs:
        kwargs["lr_decay"] = "constant"
    kwargs = {k: v for k, v in kwargs.items() if v is not None or _allows_none(k)}
    cfg = Config(**kwargs)
    rules.validate(cfg, source)
    return cfg


def _canonical_keys(given: dict, source: str) -> dict:
    out = {}
    for key, value in given.items():
        if key in REFUSED or key in NOT_NEEDED:
            if _is_switched_off(value):
                continue
            if key in NOT_NEEDED:
                raise ConfigError(
                    f"{source}: key '{key}' = {json.dumps(value)} is not needed: "
                    f"{NOT_NEEDED[key]}. Remove the key."
                )
            raise ConfigError(
                f"{source}: key '{key}' = {json.dumps(value)} is refused: {REFUSED[key]}. "
                "Remove the key (or set it to false/null)."
            )
        if key in SINGLE_VALUE:
            allowed, why = SINGLE_VALUE[key]
            if value != allowed:
                raise ConfigError(
                    f"{source}: key '{key}' = {json.dumps(value)}; only {json.dumps(allowed)} "
                    f"exists ({why}). Remove the key or set it to {json.dumps(allowed)}."
                )
            continue
        if key not in KNOWN_KEYS:
            close = difflib.get_close_matches(key, sorted(KNOWN_KEYS), n=1, cutoff=0.6)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"{source}: unknown key '{key}'.{hint}")
        canonical = ALIASES.get(key, key)
        if canonical in out and out[canonical] != value:
            raise ConfigError(
                f"{source}: '{key}' and '{canonical}' both given with different values "
                f"({json.dumps(value)} vs {json.dumps(out[canonical])}); keep one."
            )
        out[canonical] = value
    return out


def _allows_none(key: str) -> bool:
    return values.unwrap_optional(_HINTS[key])[1]


def _is_switched_off(value) -> bool:
    return value is None or value is False or value == 0 or value in ([], {}, "")


def _coerce(key: str, value, tp, source: str):
    """`value` as the type `key` declares; a `ConfigError` naming the key when it is not."""
    if key in PARSED_APART:
        return None
    tp, nullable = values.unwrap_optional(tp)
    if value is None and nullable:
        return None
    ok, value = values.convert(value, tp)
    if not ok:
        raise ConfigError(
            f"{source}: key '{key}' must be {values.type_name(tp)}, got {json.dumps(value)} "
            f"({type(value).__name__})"
        )
    if (choices := values.allowed(tp)) is not None:
        rules.one_of(source, key, str(value), choices)
    return value


def expand_attention_types(spec, source: str = "<config>") -> tuple[str, ...]:
    """GPT-Neo's `[[["global","local"],12]]` -> ("global","local",...); a flat list passes through."""
    bad = ConfigError(
        f'{source}: \'attention_types\' must be a list like [[["global", "local"], 12]] '
        f'or a flat list like ["global", "local", ...], got {json.dumps(spec)}'
    )
    if not isinstance(spec, list) or not spec:
        raise bad
    if all(isinstance(t, str) for t in spec):
        return tuple(spec)
    layers: list[str] = []
    for item in spec:
        if not (isinstance(item, list) and len(item) == 2):
            raise bad
        kinds, repeat = item
        if isinstance(kinds, str):
            kinds = [kinds]
        if not (isinstance(kinds, list) and all(isinstance(k, str) for k in kinds)):
            raise bad
        if not (isinstance(repeat, int) and not isinstance(repeat, bool) and repeat >= 0):
            raise bad
        layers.extend(kinds * repeat)
    return tuple(layers)


def _parse_datasets(spec, source: str) -> tuple[DatasetEntry, ...]:
    if not isinstance(spec, list):
        raise ConfigError(f"{source}: 'datasets' must be a list, got {json.dumps(spec)}")
    entries = []
    for item in spec:
        if isinstance(item, str):
            entries.append(DatasetEntry(item))
            continue
        if not (isinstance(item, list) and 1 <= len(item) <= 4 and isinstance(item[0], str)):
            raise ConfigError(
                f"{source}: each 'datasets' entry must be a dataset id or "
                f"[dataset_id, stitch, sampling_mode, weight], got {json.dumps(item)}"
            )
        dataset_id, stitch, mode, weight = [*item, None, None, None][:4]
        if stitch is not None and not (isinstance(stitch, int) and stitch > 0):
            raise ConfigError(
                f"{source}: dataset '{dataset_id}': stitch must be a positive integer or null"
            )
        if mode is not None and not isinstance(mode, str):
            raise ConfigError(
                f"{source}: dataset '{dataset_id}': sampling_mode must be a string or null"
            )
        if weight is not None and not (isinstance(weight, int | float) and weight > 0):
            raise ConfigError(
                f"{source}: dataset '{dataset_id}': weight must be a positive number or null"
            )
        entries.append(
            DatasetEntry(dataset_id, stitch, mode, None if weight is None else float(weight))
        )
    return tuple(entries)

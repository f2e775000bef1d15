"""`rope_scaling` -> a typed, frozen `RopeScaling`, with Hugging Face's names and defaults.

Three ways to stretch rotary past the context a model was trained at, as transformers computes
them (`gpt_neo.models.positions.inverse_frequencies` does the math):
- `linear`: every frequency divided by `factor` (positions interpolated);
- `llama3`: Llama 3.1's blend: wavelengths longer than original / low_freq_factor are divided
  by `factor`, shorter than original / high_freq_factor kept, those between interpolated;
- `yarn`: YaRN's per-dimension ramp between interpolation and extrapolation (`beta_fast`,
  `beta_slow`), and cos/sin multiplied by an attention factor (0.1 ln(factor) + 1 unless given).
Other transformers types (`dynamic`, `longrope`, ...) are refused by name.
"""

from __future__ import annotations

import json
import typing
from dataclasses import dataclass
from typing import Literal

from gpt_neo.config import values
from gpt_neo.errors import ConfigError

RopeType = Literal["linear", "llama3", "yarn"]
ROPE_TYPES = typing.get_args(RopeType)
# The keys each type reads (besides rope_type and factor); any other is refused.
TYPE_KEYS = {
    "linear": (),
    "llama3": ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "yarn": (
        "original_max_position_embeddings",
        "beta_fast",
        "beta_slow",
        "mscale",
        "mscale_all_dim",
        "attention_factor",
        "truncate",
    ),
}


@dataclass(frozen=True, kw_only=True)
class RopeScaling:
    """One `rope_scaling` entry; the fields a type does not read keep their defaults."""

    rope_type: RopeType
    factor: float
    original_max_position_embeddings: int | None = None
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True


_HINTS = typing.get_type_hints(RopeScaling)


def parse_rope_scaling(raw, source: str) -> RopeScaling | None:
    """The JSON object of `rope_scaling` -> `RopeScaling` (None for transformers' `default`
    type, which is plain rotary). Raises `ConfigError` naming the key at fault."""
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{source}: rope_scaling must be an object like "
            f'{{"rope_type": "linear", "factor": 4}}, got {json.dumps(raw)}'
        )
    given = dict(raw)
    kind = given.pop("rope_type", given.pop("type", None))
    if kind == "default":
        return None
    if kind not in ROPE_TYPES:
        raise ConfigError(
            f"{source}: rope_scaling type {json.dumps(kind)} is not supported; supported: "
            f"{', '.join(ROPE_TYPES)} (as transformers computes them)"
        )
    if "rope_theta" in given:
        raise ConfigError(
            f"{source}: rope_scaling holds rope_theta; that is rotary_emb_base here. Move it."
        )
    if "factor" not in given:
        raise ConfigError(f"{source}: rope_scaling of type '{kind}' needs 'factor'")
    fields: dict = {}
    for key, value in given.items():
        if key != "factor" and key not in TYPE_KEYS[kind]:
            allowed = ", ".join(("factor", *TYPE_KEYS[kind]))
            raise ConfigError(
                f"{source}: rope_scaling key '{key}' is not read by type '{kind}' (it reads "
                f"{allowed}); remove it."
            )
        tp, nullable = values.unwrap_optional(_HINTS[key])
        if value is None and nullable:
            continue
        ok, converted = values.convert(value, tp)
        if not ok:
            raise ConfigError(
                f"{source}: rope_scaling '{key}' must be {values.type_name(tp)}, got "
                f"{json.dumps(value)}"
            )
        fields[key] = converted
    scaling = RopeScaling(rope_type=kind, **fields)
    if scaling.factor < 1.0:
        raise ConfigError(
            f"{source}: rope_scaling factor must be >= 1 (it stretches the context), got "
            f"{scaling.factor}"
        )
    needs_original = kind in ("llama3", "yarn")
    if needs_original and scaling.original_max_position_embeddings is None:
        raise ConfigError(
            f"{source}: rope_scaling of type '{kind}' needs original_max_position_embeddings "
            "(the context the model was trained at)"
        )
    if kind == "llama3" and not 0 < scaling.low_freq_factor < scaling.high_freq_factor:
        raise ConfigError(
            f"{source}: rope_scaling needs 0 < low_freq_factor < high_freq_factor, got "
            f"{scaling.low_freq_factor} and {scaling.high_freq_factor}"
        )
    return scaling


def rope_scaling_to_dict(scaling: RopeScaling) -> dict:
    """Every key its type reads (defaults too: transformers requires some of them), as
    Hugging Face writes them and `parse_rope_scaling` reads them."""
    out: dict = {"rope_type": scaling.rope_type, "factor": scaling.factor}
    for key in TYPE_KEYS[scaling.rope_type]:
        if (value := getattr(scaling, key)) is not None:
            out[key] = value
    return out

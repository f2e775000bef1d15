"""GPT-Neo's `moe_params` -> a typed, frozen `MoeParams`, checked key by key.

GPT-Neo copied `moe_params` into Mesh-TensorFlow 0.1.18's `HParams` on top of
`set_default_moe_hparams`, so every key below keeps its 0.1.18 name, default and meaning
(`gpt_neo.models.moe` computes it). Where 0.1.18 had no default and crashed without the key
(`moe_dropout_rate` in training, the `moe_rand_1_*` keys), the default is the value its later
releases and the Switch Transformer paper use. Keys of other Mesh-TensorFlow releases are
refused with the reason, because the same name means a different router there (0.1.19 renamed
0.1.18's `rand_1` to `switch` and its `switch` to `ntlb`).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import typing
from dataclasses import dataclass
from typing import Literal

from gpt_neo.config import values
from gpt_neo.errors import ConfigError

# `top_2` and `rand_1` are Mesh-TensorFlow 0.1.18's routers; `dropless_top_k` is ours.
Gating = Literal["top_2", "rand_1", "dropless_top_k"]
SecondPolicy = Literal["all", "none", "threshold", "random"]
Rand1Policy = Literal["argmax", "input_jitter", "input_dropout", "sample"]
# Mesh-TensorFlow functions `moe_activation` may name (resolved with getattr(mtf, name) in
# GPT-Neo, so not GPT-Neo's own activation registry): `gelu` is the tanh approximation.
MoeActivation = Literal["relu", "gelu", "sigmoid", "tanh", "selu", "elu", "softplus", "abs"]
MOE_ACTIVATIONS = typing.get_args(MoeActivation)

REFUSED_GATINGS = {
    "switch": "in Mesh-TensorFlow 0.1.18, which GPT-Neo pins, 'switch' is the no-token-left-"
    "behind router nobody trained with; in later releases it means 0.1.18's 'rand_1'. Use "
    "'rand_1' for Switch-Transformer top-1 routing, or 'top_2'",
    "ntlb": "a Mesh-TensorFlow 0.1.19+ router that GPT-Neo could not run; use 'top_2' or 'rand_1'",
    "switch_max": "a Mesh-TensorFlow 0.1.19+ router (not causal); use 'top_2' or 'rand_1'",
    "expert_selection": "expert-choice routing (0.1.19+) is not causal, so it cannot train a "
    "language model; use 'top_2', 'rand_1' or 'dropless_top_k'",
    "top_n": "a Mesh-TensorFlow 0.1.21 router; use 'dropless_top_k' with moe_top_k",
}
REFUSED_KEYS = {
    "moe_switch_top_k": "it configures 0.1.18's 'switch' router, which is not supported",
    "moe_ntlb_top_k": "it configures the 0.1.19+ 'ntlb' router, which is not supported",
    "moe_z_loss": "this is the 0.1.21 name; the router z-loss here is 'moe_router_z_loss'",
    "moe_word_embed_mode": "a Mesh-TensorFlow 0.1.21 option GPT-Neo could not run",
    "moe_capacity_factor_second_level": "only transformer_moe_layer_v2 reads it, and GPT-Neo "
    "calls transformer_moe_layer_v1, so it never had an effect",
    "moe_use_experts_attention": "it turns the MoE layer into experts attention, which made "
    "GPT-Neo crash (the layer returns a list there)",
}
REFUSED_KEYS |= {
    f"moe_switch_{suffix}": f"this is the 0.1.19+ name of 'moe_rand_1_{suffix}' (GPT-Neo pins 0.1.18)"
    for suffix in ("policy_train", "policy_eval", "jitter", "dropout", "temperature")
}


@dataclass(frozen=True)
class MoeParams:
    """GPT-Neo's `moe_params`, by Mesh-TensorFlow 0.1.18's names and defaults."""

    moe_num_experts: int = 16
    """Experts per MoE layer."""
    moe_gating: Gating = "top_2"
    """Router: `top_2` (GShard top-2 with capacity, 0.1.18's default), `rand_1` (Switch
    Transformer top-1 with capacity), or `dropless_top_k` (every token to its `moe_top_k`
    experts, no capacity, renormalised gates; not a GPT-Neo value)."""
    moe_hidden_size: int = 4096
    """Hidden size of each expert's feed-forward (0.1.18's default: 4096 whatever n_embd is)."""
    moe_group_size: int = 1024
    """Tokens are routed in groups of about this many consecutive tokens; each group fills
    its own expert capacity."""
    moe_capacity_factor_train: float = 1.25
    """Expert capacity per group in training: int(group size * factor / experts) tokens."""
    moe_capacity_factor_eval: float = 2.0
    """The same for evaluation and scoring (decoding never drops: see README)."""
    moe_min_expert_capacity: int = 1
    """Capacity floor (GPT-Neo sets 1; Mesh-TensorFlow's own default is 4)."""
    moe_loss_coef: float = 1e-2
    """Weight of the load-balancing loss in the objective."""
    moe_use_second_place_loss: bool = False
    """`top_2`: add the load-balancing loss of the second choices (weight 0.5)."""
    moe_second_policy_train: SecondPolicy = "random"
    """`top_2`: which second choices are used in training: `all`, `none`, `threshold` (gate
    above the threshold) or `random` (with probability gate / threshold)."""
    moe_second_policy_eval: SecondPolicy = "random"
    """The same outside training."""
    moe_second_threshold_train: float = 0.2
    """Threshold of the `threshold` and `random` second policies in training."""
    moe_second_threshold_eval: float = 0.2
    """The same outside training."""
    moe_dropout_rate: float = 0.0
    """Dropout on each expert's hidden layer, training only (GPT-Neo crashed without it)."""
    moe_rand_1_policy_train: Rand1Policy = "input_jitter"
    """`rand_1` in training: `argmax`, `input_jitter` (router input times U[1-j, 1+j]),
    `input_dropout` (dropout on the router input) or `sample` (expert drawn from the router)."""
    moe_rand_1_policy_eval: Rand1Policy = "argmax"
    """The same outside training."""
    moe_rand_1_jitter: float = 1e-2
    """`rand_1`'s `input_jitter` amount j."""
    moe_rand_1_dropout: float = 0.1
    """`rand_1`'s `input_dropout` rate."""
    moe_rand_1_temperature: float = 1.0
    """`rand_1`'s `sample` temperature."""
    moe_top_k: int = 2
    """`dropless_top_k`: experts per token. Not a GPT-Neo key."""
    moe_router_z_loss: float = 0.0
    """Weight of the router z-loss, mean(logsumexp(router logits)^2) (ST-MoE), added to the
    objective in training; any gating. Not a GPT-Neo key."""

    @property
    def experts_per_token(self) -> int:
        """Experts a token's output is computed by (at most; capacity may drop some)."""
        return {"top_2": 2, "rand_1": 1}.get(self.moe_gating, self.moe_top_k)


_FIELDS = {f.name: f for f in dataclasses.fields(MoeParams)}
_HINTS = typing.get_type_hints(MoeParams)


def parse_moe_params(raw, source: str) -> MoeParams:
    """A `moe_params` JSON object -> `MoeParams`. Raises `ConfigError` naming the key."""
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{source}: 'moe_params' must be a JSON object like {{\"moe_num_experts\": 8}}, "
            f"got {json.dumps(raw)}"
        )
    values = {}
    for key, value in raw.items():
        if key in REFUSED_KEYS:
            raise ConfigError(
                f"{source}: moe_params key '{key}' is not supported: {REFUSED_KEYS[key]}."
            )
        if key not in _FIELDS:
            close = difflib.get_close_matches(key, sorted(_FIELDS), n=1, cutoff=0.6)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"{source}: unknown moe_params key '{key}'.{hint}")
        if value is None:
            raise ConfigError(
                f"{source}: moe_params '{key}' is null; give it a value or remove it "
                f"(default {json.dumps(_FIELDS[key].default)})"
            )
        values[key] = _coerce(key, value, _HINTS[key], source)
    params = MoeParams(**values)
    _validate(params, source)
    return params


def _coerce(key: str, value, tp, source: str):
    """`value` as the type `key` declares (the coercion model config keys go through)."""
    if key == "moe_gating" and value in REFUSED_GATINGS:
        raise ConfigError(
            f"{source}: moe_gating '{value}' is not supported: {REFUSED_GATINGS[value]}."
        )
    ok, value = values.convert(value, tp)
    if not ok:
        raise ConfigError(
            f"{source}: moe_params '{key}' must be {values.type_name(tp)}, got {json.dumps(value)}"
        )
    if (choices := values.allowed(tp)) is not None and value not in choices:
        raise ConfigError(
            f"{source}: unknown moe_params {key} '{value}'.{values.closest(str(value), choices)} "
            f"Choose one of: {', '.join(choices)}."
        )
    return value


def _validate(p: MoeParams, source: str) -> None:
    for key in ("moe_num_experts", "moe_hidden_size", "moe_group_size", "moe_min_expert_capacity"):
        if getattr(p, key) < 1:
            raise ConfigError(
                f"{source}: moe_params '{key}' must be at least 1, got {getattr(p, key)}"
            )
    for key in ("moe_capacity_factor_train", "moe_capacity_factor_eval", "moe_rand_1_temperature"):
        if getattr(p, key) <= 0:
            raise ConfigError(
                f"{source}: moe_params '{key}' must be above 0, got {getattr(p, key)} "
                "(a capacity factor of 1.0 gives each expert an equal share of a group's tokens)"
            )
    for key in ("moe_loss_coef", "moe_router_z_loss", "moe_second_threshold_train",
                "moe_second_threshold_eval", "moe_rand_1_jitter"):  # fmt: skip
        if getattr(p, key) < 0:
            raise ConfigError(
                f"{source}: moe_params '{key}' must be at least 0, got {getattr(p, key)}"
            )
    for key in ("moe_dropout_rate", "moe_rand_1_dropout"):
        if not 0.0 <= getattr(p, key) < 1.0:
            raise ConfigError(
                f"{source}: moe_params '{key}' must be in [0, 1), got {getattr(p, key)}"
            )
    if not 1 <= p.moe_top_k <= p.moe_num_experts:
        raise ConfigError(
            f"{source}: moe_params 'moe_top_k' must be between 1 and moe_num_experts "
            f"({p.moe_num_experts}), got {p.moe_top_k}"
        )


def moe_params_to_dict(p: MoeParams) -> dict:
    """The keys that differ from the defaults (what a config file would hold)."""
    return {k: getattr(p, k) for k, f in _FIELDS.items() if getattr(p, k) != f.default}


def parse_moe_layers(raw, n_layer: int, source: str) -> tuple[int, ...]:
    """GPT-Neo's `moe_layers`: 0-based indices of the layers whose MLP is an MoE."""
    if raw is None:
        return ()
    if raw is False or not isinstance(raw, list):
        raise ConfigError(
            f"{source}: 'moe_layers' must be a list of 0-based layer indices like [1, 3], got "
            f"{json.dumps(raw)} (GPT-Neo crashed on it). Use [] or remove the key for no MoE."
        )
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in raw):
        raise ConfigError(f"{source}: 'moe_layers' must hold integers, got {json.dumps(raw)}")
    bad = [i for i in raw if not 0 <= i < n_layer]
    if bad:
        raise ConfigError(
            f"{source}: moe_layers {json.dumps(raw)}: layer {bad[0]} does not exist; indices are "
            f"0-based, 0 to {n_layer - 1} for n_layer {n_layer} (GPT-Neo's README example "
            "[2,4,...,12] names a 13th layer)"
        )
    repeated = sorted({i for i in raw if raw.count(i) > 1})
    if repeated:
        raise ConfigError(f"{source}: moe_layers {json.dumps(raw)} names layer {repeated[0]} twice")
    return tuple(sorted(raw))

"""The checks that span keys, run on every `Config` as it is made: sizes that must divide, keys
that need or exclude others, ids inside the vocabulary, "auto" layouts. Each failure is one
`ConfigError` naming the keys and the fix.
"""

from __future__ import annotations

import typing

from gpt_neo.config.schema import ATTENTION_TYPES, FIELDS, OPTIMIZERS
from gpt_neo.config.values import closest
from gpt_neo.errors import ConfigError

if typing.TYPE_CHECKING:  # for annotations only: `check` runs these checks on its Config
    from gpt_neo.config.check import Config

AUTO = "auto"
LAYOUT_KEYS = ("mesh_shape", "layout", "param_layout")  # each names what the next one uses


def one_of(source: str, key: str, value: str, allowed) -> None:
    """A `ConfigError` when `value` (of `key`) is not one of `allowed`."""
    if value not in allowed:
        raise ConfigError(
            f"{source}: unknown {key} '{value}'.{closest(value, allowed)} Choose one of: "
            f"{', '.join(allowed)}."
        )


def auto_keys(cfg: Config) -> tuple[str, ...]:
    """The keys `gpt_neo.planning.auto_layout` chooses: the layout keys set to "auto" and the unset
    ones after them, and `tokens_per_mb_per_replica` when it is unset too."""
    chosen: list[str] = []
    for key in LAYOUT_KEYS:
        value = getattr(cfg, key)
        if value == AUTO or (chosen and value is None):
            chosen.append(key)
    if chosen and cfg.tokens_per_mb_per_replica is None:
        chosen.append("tokens_per_mb_per_replica")
    return tuple(chosen)


def _validate_auto(cfg: Config, source: str) -> None:
    """A value after an "auto" one would name mesh axes or rules the search has not chosen."""
    auto = None
    for key in LAYOUT_KEYS:
        value = getattr(cfg, key)
        if value == AUTO:
            auto = auto or key
        elif auto and value is not None:
            raise ConfigError(
                f"{source}: {auto} is \"auto\" but {key} is '{value}', which depends on what "
                f'the search chooses. Set {key} to "auto" too (or remove it), or set {auto} '
                "yourself."
            )


def validate(cfg: Config, source: str) -> None:
    """Every check across keys; the first failure is raised."""
    _validate_auto(cfg, source)
    if cfg.dcn_axes and cfg.mesh_shape in (None, AUTO):
        raise ConfigError(
            f"{source}: dcn_axes '{cfg.dcn_axes}' names mesh axes, and mesh_shape is "
            f"{'unset' if cfg.mesh_shape is None else AUTO!r}; set mesh_shape with those axes "
            '(e.g. "slice:2,x:4" with dcn_axes "slice").'
        )
    for key in ("n_embd", "n_head", "n_layer", "n_ctx", "n_vocab", "local_attention_radius"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"{source}: '{key}' must be at least 1, got {getattr(cfg, key)}")
    if cfg.head_dim == 0:  # not given, and n_embd / n_head is not a whole number
        raise ConfigError(
            f"{source}: n_embd ({cfg.n_embd}) must be divisible by n_head ({cfg.n_head}); "
            f"head dim would be {cfg.n_embd / cfg.n_head:g}. Pick n_head from the divisors of "
            "n_embd, or set head_dim."
        )
    for key in ("head_dim", "n_kv_head", "intermediate_size"):
        if getattr(cfg, key) < 0:
            raise ConfigError(
                f"{source}: '{key}' must be at least 1 (or 0 for its default), got "
                f"{getattr(cfg, key)}"
            )
    if cfg.n_head % cfg.n_kv_head:
        divisors = [d for d in range(1, cfg.n_head + 1) if cfg.n_head % d == 0]
        raise ConfigError(
            f"{source}: n_kv_head ({cfg.n_kv_head}) must divide n_head ({cfg.n_head}): each key/"
            f"value head serves an equal group of query heads. Pick one of {divisors}."
        )
    if cfg.norm_eps <= 0:
        raise ConfigError(f"{source}: norm_eps must be > 0, got {cfg.norm_eps}")
    if len(cfg.attention_types) != cfg.n_layer:
        raise ConfigError(
            f"{source}: attention_types expands to {len(cfg.attention_types)} layers but "
            f"n_layer is {cfg.n_layer}; make the repeat counts add up to n_layer."
        )
    for kind in sorted(set(cfg.attention_types)):  # a list's items: not coerced one by one
        one_of(source, "attention type", kind, ATTENTION_TYPES)
    one_of(source, "opt_name", cfg.opt_name.lower(), OPTIMIZERS)  # any case: not a Literal
    if cfg.moe_layers and cfg.moe_params is None:
        raise ConfigError(
            f"{source}: moe_layers {list(cfg.moe_layers)} needs 'moe_params' (GPT-Neo crashed "
            'without it): give at least the expert count, e.g. "moe_params": '
            '{"moe_num_experts": 8, "moe_hidden_size": 1024}, or {} for Mesh-TensorFlow\'s '
            "defaults (16 experts of 4096 hidden units)."
        )
    if cfg.moe_params is not None and not cfg.moe_layers:
        raise ConfigError(
            f"{source}: 'moe_params' is set but 'moe_layers' lists no layer, so it would have no "
            "effect. Name the MoE layers in moe_layers (0-based), or remove moe_params."
        )
    _validate_positions(cfg, source)
    _validate_block_options(cfg, source)
    _validate_scan(cfg, source)
    _validate_mlm(cfg, source)
    for key in ("embed_dropout", "attn_dropout", "res_dropout"):
        if not 0.0 <= getattr(cfg, key) < 1.0:
            raise ConfigError(f"{source}: '{key}' must be in [0, 1), got {getattr(cfg, key)}")
    for key in (
        "train_batch_size",
        "train_steps",
        "iterations",
        "eval_batch_size",
        "keep_checkpoints",
        "vocab_pad_multiple",
        "input_threads",
        "input_prefetch",
    ):
        value = getattr(cfg, key)
        if value is not None and value < 1:
            raise ConfigError(f"{source}: '{key}' must be at least 1, got {value}")
    for key in ("padding_id", "eos_id"):
        value = getattr(cfg, key)
        if value is not None and not 0 <= value < cfg.n_vocab:
            raise ConfigError(
                f"{source}: '{key}' {value} is outside the vocabulary [0, {cfg.n_vocab})"
            )
    if cfg.padding_id is not None and cfg.padding_id == cfg.eos_id:
        raise ConfigError(
            f"{source}: padding_id and eos_id are both {cfg.padding_id}; the loss leaves padding "
            "out, so every end-of-text target would be skipped. Use a token the data never holds "
            "for padding_id, or remove it."
        )


def require_causal(cfg: Config, what: str) -> None:
    """A ConfigError when `what` (generating, scoring continuations) needs a causal LM."""
    if cfg.mlm_training:
        raise ConfigError(
            f"{what} needs a causal language model, and this one is a masked LM (mlm_training: "
            "it sees both sides of every position). --eval reports its masked-token loss and "
            "accuracy on eval_path (eval_steps)."
        )


def rotary_dims(cfg: Config) -> int:
    """How many of each head's dimensions rotary rotates (0 without rotary)."""
    return int(cfg.head_dim * cfg.rotary_pct) if cfg.rotary_emb else 0


def _validate_positions(cfg: Config, source: str) -> None:
    if not cfg.rotary_emb and (cfg.rotary_pct != 1.0 or cfg.rotary_emb_base != 10000.0):
        raise ConfigError(
            f"{source}: rotary_pct/rotary_emb_base are set but rotary_emb is not true; set "
            '"rotary_emb": true or remove them.'
        )
    if cfg.rotary_emb:
        if not 0.0 < cfg.rotary_pct <= 1.0:
            raise ConfigError(
                f"{source}: rotary_pct must be in (0, 1] (the fraction of each head's "
                f"dimensions that rotary rotates), got {cfg.rotary_pct}"
            )
        dims = rotary_dims(cfg)
        if dims == 0 or dims % 2:
            raise ConfigError(
                f"{source}: rotary rotates dimensions in pairs, but rotary_pct {cfg.rotary_pct} "
                f"of head dim {cfg.head_dim} gives {dims}; pick rotary_pct so that "
                f"head_dim * rotary_pct is an even number >= 2 (e.g. {2 / cfg.head_dim:g} steps)"
            )
        if cfg.rotary_emb_base <= 1.0:
            raise ConfigError(f"{source}: rotary_emb_base must be > 1, got {cfg.rotary_emb_base}")
        if cfg.axial_pos_emb is not None:
            raise ConfigError(
                f"{source}: rotary_emb and axial_pos_emb are both set; rotary replaces the "
                "position embedding (GPT-Neo silently dropped the axial one). Keep one."
            )
    if cfg.rope_scaling is not None and not cfg.rotary_emb:
        raise ConfigError(
            f"{source}: rope_scaling scales rotary, but rotary_emb is not true; set "
            '"rotary_emb": true or remove rope_scaling.'
        )
    if cfg.axial_pos_emb is not None:
        shape = cfg.axial_pos_emb
        if len(shape) != 2 or min(shape) < 1 or shape[0] * shape[1] < cfg.n_ctx:
            raise ConfigError(
                f"{source}: axial_pos_emb must be [d1, d2] with d1 * d2 >= n_ctx ({cfg.n_ctx}) "
                f"so that every position has a row, got {list(shape)}"
            )


def _validate_block_options(cfg: Config, source: str) -> None:
    if cfg.gpt_neo_untied_head and not cfg.no_weight_tie:
        raise ConfigError(
            f"{source}: gpt_neo_untied_head describes an untied head; set no_weight_tie too, "
            "or remove it."
        )
    if cfg.gpt_neo_none_layers and "none" not in cfg.attention_types:
        raise ConfigError(
            f"{source}: gpt_neo_none_layers is set but attention_types has no 'none' layer; "
            "remove it."
        )
    if cfg.activation_function == "swiglu" and not cfg.mlp_glu:
        raise ConfigError(
            f"{source}: activation_function 'swiglu' is the gate of a gated MLP; set "
            '"mlp_glu": true (or use "silu" for an ungated MLP).'
        )
    if cfg.norm == "rmsnorm" and cfg.scalenorm:
        raise ConfigError(
            f"{source}: norm 'rmsnorm' and scalenorm both choose the blocks' norm; keep one."
        )
    if cfg.qk_norm and cfg.num_mem_kv:
        raise ConfigError(
            f"{source}: qk_norm with num_mem_kv: GPT-Neo's memory keys are learned as they are "
            "and would meet normalised queries on another scale. Use one of them."
        )
    if cfg.rezero and cfg.scalenorm:
        raise ConfigError(
            f"{source}: rezero and scalenorm are both set; rezero has no norm before its "
            "branches (GPT-Neo ignored scalenorm then). Keep one."
        )
    if cfg.num_mem_kv < 0:
        raise ConfigError(f"{source}: num_mem_kv must be >= 0, got {cfg.num_mem_kv}")
    if cfg.num_mem_kv and "global" not in cfg.attention_types:
        raise ConfigError(
            f"{source}: num_mem_kv adds memory slots to global layers, and attention_types has "
            "none; add a global layer or remove num_mem_kv."
        )
    if cfg.share_parameters and cfg.moe_layers:
        raise ConfigError(
            f"{source}: share_parameters with moe_layers is not supported (a shared block "
            "would have to hold both the MLP and the experts). Use one of them."
        )


def repeating_pattern(items: tuple) -> tuple:
    """The shortest run that `items` repeats: ("global","local")*12 -> ("global","local")."""
    n = len(items)
    for period in range(1, n + 1):
        if n % period == 0 and items == items[:period] * (n // period):
            return items[:period]
    return items


def layer_period(cfg: Config) -> int | None:
    """The length of the shortest run of layers (attention kind, MoE or not) that repeats to
    make up all `n_layer`, when it repeats at least twice; None when no such run exists."""
    layers = tuple((kind, i in cfg.moe_layers) for i, kind in enumerate(cfg.attention_types))
    period = len(repeating_pattern(layers))
    return period if period < len(layers) else None


def scan_period(cfg: Config) -> int | None:
    """The pattern length the model scans over (`scan_layers`), or None: a Python loop."""
    if cfg.scan_layers is False or cfg.share_parameters:
        return None
    return layer_period(cfg)


def _validate_scan(cfg: Config, source: str) -> None:
    if not cfg.scan_layers:
        return
    if cfg.share_parameters:
        why = "share_parameters runs one block for every layer, which has nothing to stack"
    elif layer_period(cfg) is not None:
        return
    elif cfg.n_layer == 1:
        why = "a single layer does not repeat"
    elif len(pattern := repeating_pattern(cfg.attention_types)) < cfg.n_layer:
        why = (
            f"moe_layers {list(cfg.moe_layers)} do not repeat with the attention pattern "
            f"{list(pattern)}"
        )
    else:
        why = f"attention_types {list(cfg.attention_types)} do not repeat a pattern"
    raise ConfigError(
        f"{source}: scan_layers is true but {why}. Set scan_layers to false (or remove it) to "
        "run the layers in a loop."
    )


MLM_KEYS = (
    "mlm_mask_id",
    "mlm_cls_token_id",
    "mlm_mask_prob",
    "mlm_same_token_prob",
    "mlm_random_token_prob",
    "mlm_mask_ignore_ids",
)


def _validate_mlm(cfg: Config, source: str) -> None:
    if not cfg.mlm_training:
        if changed := [k for k in MLM_KEYS if getattr(cfg, k) != FIELDS[k].default]:
            raise ConfigError(
                f"{source}: {', '.join(changed)} set but mlm_training is not true; set "
                '"mlm_training": true or remove them.'
            )
        return
    if cfg.mlm_mask_id is None:
        raise ConfigError(
            f"{source}: mlm_training needs mlm_mask_id, the token that replaces masked "
            "positions (e.g. a [MASK] token of the tokenizer)"
        )
    ids = {"mlm_mask_id": cfg.mlm_mask_id, "mlm_cls_token_id": cfg.mlm_cls_token_id}
    ids |= {f"mlm_mask_ignore_ids[{i}]": t for i, t in enumerate(cfg.mlm_mask_ignore_ids)}
    for key, value in ids.items():
        if value is not None and not 0 <= value < cfg.n_vocab:
            raise ConfigError(
                f"{source}: {key} {value} is outside the vocabulary [0, {cfg.n_vocab})"
            )
    if not 0.0 < cfg.mlm_mask_prob <= 1.0:
        raise ConfigError(f"{source}: mlm_mask_prob must be in (0, 1], got {cfg.mlm_mask_prob}")
    same, random = cfg.mlm_same_token_prob, cfg.mlm_random_token_prob
    if min(same, random) < 0.0 or same + random > 1.0:
        raise ConfigError(
            f"{source}: mlm_same_token_prob ({same}) and mlm_random_token_prob ({random}) are "
            "fractions of the selected positions: each >= 0 and together <= 1 (the rest get "
            "mlm_mask_id)"
        )
    if cfg.predict_steps:
        raise ConfigError(
            f"{source}: predict_steps with mlm_training: a masked language model does not "
            "generate text left to right. Set predict_steps to 0."
        )

"""Hugging Face `LlamaForCausalLM`, `MistralForCausalLM`, `Qwen2ForCausalLM` and
`Qwen3ForCausalLM` <-> (Config, params), checked against transformers 5.25.

The four share one block: RMSNorm -> attention with rotary (grouped-query when
num_key_value_heads < num_attention_heads) -> RMSNorm -> SwiGLU MLP, no biases, scores scaled
by 1/sqrt(head_dim). They differ in Qwen2's query/key/value biases, Qwen3's per-head query/key
RMSNorm, and which layers have a sliding window. Config keys:

    HF config.json                      ours
    hidden_size, num_hidden_layers      n_embd, n_layer
    num_attention_heads                 n_head
    num_key_value_heads (null: heads)   n_kv_head
    head_dim (null: hidden / heads)     head_dim
    intermediate_size                   intermediate_size
    vocab_size, max_position_embeddings n_vocab, n_ctx
    rms_norm_eps                        norm: rmsnorm, norm_eps
    hidden_act silu (or swish)          mlp_glu: true, activation_function: silu
    rope_parameters.rope_theta          rotary_emb: true, rotary_emb_base
      (or top-level rope_theta)
    rope_parameters (or rope_scaling)   rope_scaling (linear, llama3, yarn)
    tie_word_embeddings                 no_weight_tie (its negation)
    sliding window (below)              attention_types local, local_attention_radius
    attention_dropout                   attn_dropout
    eos_token_id                        eos_id (of a list: the tokenizer's eos token, else
                                        the first)
    always                              bias: false, scale_attn_weights: true, rotary_pct 1;
                                        qkv_bias: Qwen2; qk_norm: Qwen3

Rope settings are read as transformers 5.25 reads them: `rope_scaling` when set (older
folders), else `rope_parameters`; rope_theta from inside that dict, else the top-level
`rope_theta`, else 10000; llama3 and yarn without original_max_position_embeddings take the
top-level one, else max_position_embeddings; keys a rope type does not read are ignored, as
transformers ignores them. Export writes `rope_parameters` (what transformers 5 writes) and the
top-level `rope_theta` and `rope_scaling` that transformers 4 reads.

Sliding window. transformers 5.25's mask (`masking_utils.sliding_window_overlay`) lets query i
see key j when j > i - sliding_window (and j <= i): 0 <= i - j < sliding_window, the window of
our `local` layers with local_attention_radius = sliding_window, one for one. Mistral slides in
every layer when `sliding_window` is set (null: none; its `layer_types` are ignored, as
MistralModel ignores them). Qwen2/Qwen3 slide in the layers `layer_types` calls
"sliding_attention" and only with `use_sliding_window`; without `layer_types`, the layers from
index `max_window_layers` on, as transformers derives them. Export: Qwen3 when qk_norm, Qwen2
when qkv_bias (both write `layer_types`, and `max_window_layers` as the number of leading full
layers, which older readers use), Mistral when every layer is local, else Llama (so a Mistral
folder without a sliding window, the same model as a Llama, exports as LlamaForCausalLM).

Weights ([out, in] Linear weights transposed, heads split out):

    model.embed_tokens.weight                    wte [vocab, embd] (ours may be padded)
    model.layers.{i}.input_layernorm.weight      blocks[i].ln_1.scale
    model.layers.{i}.self_attn.q_proj.weight     blocks[i].attn.q [embd, heads, head_dim]
      k_proj, v_proj                               .k, .v [embd, kv_heads, head_dim]
      o_proj                                       .o [heads, head_dim, embd]
      q_proj/k_proj/v_proj.bias (Qwen2)            .q_bias [heads, head_dim], .k_bias, .v_bias
      q_norm/k_norm.weight (Qwen3)                 .q_norm.scale, .k_norm.scale [head_dim]
    model.layers.{i}.post_attention_layernorm    blocks[i].ln_2.scale
    model.layers.{i}.mlp.gate_proj / up_proj     blocks[i].mlp.gate_kernel / fc_kernel [embd, mlp]
      down_proj                                    .proj_kernel [mlp, embd]
    model.norm.weight                            ln_f.scale
    lm_head.weight                               head.kernel (untied only; a tied folder's
                                                 copy is ignored, as transformers ties it)

Rotary layout. Hugging Face's q/k rows are in rotate-half order: within a head, dimension i
pairs with i + head_dim/2 (`rotate_half`), which is ours (`gpt_neo.models.positions.rotate`),
so q and k map with no permutation. Meta's original consolidated checkpoints (and GPT-J) pair
interleaved dimensions (2i, 2i+1); transformers' conversion script permutes their rows, which is
`interleaved_to_half_split` here (and `half_split_to_interleaved` back): not used on the HF
path, kept for such checkpoints and to make the identity explicit.

Import refuses, with one line naming the field: another architecture, hidden_act other than
silu, a rope type other than default/linear/llama3/yarn (dynamic, longrope, ...), rope settings
per layer type, partial_rotary_factor below 1, Llama's attention_bias or mlp_bias and Qwen3's
attention_bias (biases this family's blocks do not have), a `quantization_config` (quantized
weights), Qwen `layer_types` other than full/sliding or sliding layers with no window. Weights:
a missing tensor, one of another shape than config.json gives, or one no layer has (a config
that does not describe its weights) are refused, naming the tensor.

Ignored, because they change nothing a forward pass computes: initializer_range (initialisation
only), use_cache, torch_dtype/dtype (the stored dtype is read), bos_token_id, pad_token_id,
pretraining_tp (transformers 5.25's Llama does not read it; in 4.x, > 1 only split the same
matmuls into slices), Mistral's attention_bias/layer_types and Qwen2's attention_bias (their
classes do not read them), max_window_layers when layer_types is given, transformers_version,
architectures, id2label/label2id, output_* and return_dict, rotary_emb.inv_freq buffers
(recomputed from rope settings).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from gpt_neo.config import Config
from gpt_neo.config.rope import ROPE_TYPES, TYPE_KEYS, parse_rope_scaling, rope_scaling_to_dict
from gpt_neo.errors import ConfigError
from gpt_neo.interop.hf.mapping import (
    GPT_NEO_ONLY,
    LINEAR,
    SAME,
    Tensor,
    eos_in_vocab,
    vocab_rows,
)


@dataclass(frozen=True)
class Family:
    architecture: str  # the transformers class
    defaults: dict  # transformers 5.25's class defaults of the keys read here


_COMMON = {
    "hidden_act": "silu",
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "attention_dropout": 0.0,
    "hidden_size": 4096,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
}
_QWEN = {
    **_COMMON,
    "vocab_size": 151936,
    "intermediate_size": 22016,
    "num_key_value_heads": 32,
    "max_position_embeddings": 32768,
    "use_sliding_window": False,
    "sliding_window": 4096,
    "max_window_layers": 28,
    "eos_token_id": None,
}
FAMILIES = {
    "llama": Family(
        "LlamaForCausalLM",
        {
            **_COMMON,
            "vocab_size": 32000,
            "intermediate_size": 11008,
            "num_key_value_heads": None,
            "max_position_embeddings": 2048,
            "eos_token_id": 2,
        },
    ),
    "mistral": Family(
        "MistralForCausalLM",
        {
            **_COMMON,
            "vocab_size": 32000,
            "intermediate_size": 14336,
            "num_key_value_heads": 8,
            "max_position_embeddings": 4096 * 32,
            "sliding_window": 4096,
            "eos_token_id": 2,
        },
    ),
    "qwen2": Family("Qwen2ForCausalLM", _QWEN),
    "qwen3": Family("Qwen3ForCausalLM", {**_QWEN, "head_dim": 128}),
}
SILU = ("silu", "swish")  # transformers' names of Llama's gate activation
DEFAULT_ROPE_THETA = 10000.0  # transformers' default_theta
FULL, SLIDING = "full_attention", "sliding_attention"


# --------------------------------------------------------------------------------------------
# Rotary layouts


def interleaved_to_half_split(w: np.ndarray, n_heads: int) -> np.ndarray:
    """The rows of a q or k projection [n_heads * head_dim, ...] whose rotary pairs are
    interleaved (dimensions 2i and 2i+1 of a head turn together: Meta's consolidated Llama
    checkpoints, GPT-J) -> rotate-half order (i and i + head_dim/2: Hugging Face's Llama,
    ours). transformers' convert_llama_weights_to_hf `permute`. A bias permutes the same."""
    rows = w.shape[0]
    half = rows // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def half_split_to_interleaved(w: np.ndarray, n_heads: int) -> np.ndarray:
    """The inverse of `interleaved_to_half_split`."""
    rows = w.shape[0]
    half = rows // n_heads // 2
    return w.reshape(n_heads, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# --------------------------------------------------------------------------------------------
# Weights


def weight_map(cfg: Config) -> Iterator[Tensor]:
    """Every tensor of the Llama-family model of this config."""
    d, h, kvh, hd, m, v = (
        cfg.n_embd,
        cfg.n_head,
        cfg.n_kv_head,
        cfg.head_dim,
        cfg.d_mlp,
        cfg.n_vocab,
    )

    def heads(n):  # [n*hd, d] <-> [d, n, hd]
        return lambda a: a.reshape(d, n * hd).T, lambda a: a.T.reshape(d, n, hd)

    def bias(n):  # [n*hd] <-> [n, hd]
        return lambda a: a.reshape(n * hd), lambda a: a.reshape(n, hd)

    yield Tensor("model.embed_tokens.weight", ("wte",), (v, d), *vocab_rows(cfg))
    for i in range(cfg.n_layer):
        pre, attn, mlp = f"model.layers.{i}", ("blocks", i, "attn"), ("blocks", i, "mlp")
        yield Tensor(f"{pre}.input_layernorm.weight", ("blocks", i, "ln_1", "scale"), (d,), *SAME)
        for proj, n in (("q", h), ("k", kvh), ("v", kvh)):
            name = f"{pre}.self_attn.{proj}_proj"
            yield Tensor(f"{name}.weight", (*attn, proj), (n * hd, d), *heads(n))
            if cfg.qkv_bias:
                yield Tensor(f"{name}.bias", (*attn, f"{proj}_bias"), (n * hd,), *bias(n))
        yield Tensor(
            f"{pre}.self_attn.o_proj.weight",
            (*attn, "o"),
            (d, h * hd),
            lambda a: a.reshape(h * hd, d).T,
            lambda a: a.T.reshape(h, hd, d),
        )
        if cfg.qk_norm:
            for norm in ("q_norm", "k_norm"):
                yield Tensor(f"{pre}.self_attn.{norm}.weight", (*attn, norm, "scale"), (hd,), *SAME)
        yield Tensor(
            f"{pre}.post_attention_layernorm.weight", ("blocks", i, "ln_2", "scale"), (d,), *SAME
        )
        yield Tensor(f"{pre}.mlp.gate_proj.weight", (*mlp, "gate_kernel"), (m, d), *LINEAR)
        yield Tensor(f"{pre}.mlp.up_proj.weight", (*mlp, "fc_kernel"), (m, d), *LINEAR)
        yield Tensor(f"{pre}.mlp.down_proj.weight", (*mlp, "proj_kernel"), (d, m), *LINEAR)
    yield Tensor("model.norm.weight", ("ln_f", "scale"), (d,), *SAME)
    if cfg.no_weight_tie:
        yield Tensor("lm_head.weight", ("head", "kernel"), (v, d), *vocab_rows(cfg))


def stored_names(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A base model's folder (`LlamaModel`: embed_tokens.weight, ...) under the causal LM's
    names (model.embed_tokens.weight, ...)."""
    if "model.embed_tokens.weight" in weights or "embed_tokens.weight" not in weights:
        return weights
    return {k if k.startswith("lm_head.") else f"model.{k}": a for k, a in weights.items()}


def ignorable(cfg: Config, name: str) -> bool:
    """Stored tensors transformers does not load: rotary's inverse frequencies (a buffer
    older versions saved) and a tied model's copy of the head."""
    return name.endswith("rotary_emb.inv_freq") or (
        name == "lm_head.weight" and not cfg.no_weight_tie
    )


# --------------------------------------------------------------------------------------------
# Import


def derive(hf: dict, source: str, tokenizer_eos: int | None = None) -> dict:
    """The architecture (and attention dropout, eos) a Llama-family config.json gives, as
    config keys. Raises `ConfigError` naming the field it cannot take."""
    model_type = hf["model_type"]
    defaults = FAMILIES[model_type].defaults

    def get(key):
        return hf[key] if key in hf else defaults.get(key)

    if hf.get("quantization_config"):
        raise ConfigError(
            f"{source}: quantization_config is set: the weights are quantized; import the "
            "unquantized (float32, bfloat16 or float16) model"
        )
    act = get("hidden_act")
    if act not in SILU:
        raise ConfigError(
            f"{source}: hidden_act {act!r} is not supported; {model_type} imports with silu "
            "(SwiGLU) only"
        )
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key) and (model_type, key) in (
            ("llama", "attention_bias"),
            ("llama", "mlp_bias"),
            ("qwen3", "attention_bias"),
        ):
            raise ConfigError(
                f"{source}: {key} is true; {model_type} imports without "
                f"{'attention' if key == 'attention_bias' else 'MLP'} biases only"
            )
    d, heads, n_layer = get("hidden_size"), get("num_attention_heads"), get("num_hidden_layers")
    n_ctx, n_vocab = get("max_position_embeddings"), get("vocab_size")
    kinds, window = _layer_kinds(hf, model_type, n_layer, get, source)
    theta, scaling = _rope(hf, n_ctx, source)
    derived = {
        "n_embd": d,
        "n_head": heads,
        "n_kv_head": get("num_key_value_heads") or heads,
        "head_dim": get("head_dim") or (d // heads if heads else 0),
        "n_layer": n_layer,
        "n_ctx": n_ctx,
        "n_vocab": n_vocab,
        "intermediate_size": get("intermediate_size"),
        "norm": "rmsnorm",
        "norm_eps": get("rms_norm_eps"),
        "bias": False,
        "qkv_bias": model_type == "qwen2",
        "qk_norm": model_type == "qwen3",
        "scale_attn_weights": True,
        "mlp_glu": True,
        "activation_function": "silu",
        "rotary_emb": True,
        "rotary_emb_base": theta,
        "rope_scaling": scaling,
        "attention_types": kinds,
        "no_weight_tie": not get("tie_word_embeddings"),
        "attn_dropout": get("attention_dropout") or 0.0,
        "embed_dropout": 0.0,
        "res_dropout": 0.0,
        "eos_id": eos_in_vocab(get("eos_token_id"), n_vocab or 0, tokenizer_eos),
    }
    if window is not None:
        derived["local_attention_radius"] = window
    return derived


def _layer_kinds(hf: dict, model_type: str, n_layer, get, source: str):
    """(our attention_types, the window of the local ones or None)."""
    if not isinstance(n_layer, int) or n_layer < 1:
        raise ConfigError(f"{source}: num_hidden_layers must be at least 1, got {n_layer!r}")
    if model_type == "llama":
        return ["global"] * n_layer, None
    if model_type == "mistral":
        window = get("sliding_window")
        return ["local" if window is not None else "global"] * n_layer, window
    window = get("sliding_window") if get("use_sliding_window") else None
    layer_types = hf.get("layer_types")
    if layer_types is None:
        first = get("max_window_layers")
        layer_types = [
            SLIDING if window is not None and i >= first else FULL for i in range(n_layer)
        ]
    if (
        not isinstance(layer_types, list)
        or len(layer_types) != n_layer
        or not set(layer_types) <= {FULL, SLIDING}
    ):
        raise ConfigError(
            f"{source}: layer_types must list {n_layer} of '{FULL}' and '{SLIDING}', got "
            f"{layer_types!r}"
        )
    if SLIDING in layer_types and window is None:
        raise ConfigError(
            f"{source}: layer_types has '{SLIDING}' layers but use_sliding_window is false or "
            "sliding_window null, so they have no window (transformers cannot build their mask)"
        )
    return ["local" if kind == SLIDING else "global" for kind in layer_types], window


def _rope(hf: dict, n_ctx, source: str) -> tuple[float, dict | None]:
    """(rope_theta, our rope_scaling as a dict or None), read as transformers 5.25 reads them."""
    params = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    field = "rope_scaling" if hf.get("rope_scaling") else "rope_parameters"
    where = f"{source} ({field})"
    if not isinstance(params, dict):
        raise ConfigError(f"{where}: must be an object, got {params!r}")
    if {FULL, SLIDING} & set(params):
        raise ConfigError(
            f"{where}: rope settings per layer type are not supported; one set for all layers"
        )
    theta = params.get("rope_theta") or hf.get("rope_theta") or DEFAULT_ROPE_THETA
    partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor"))
    if partial is not None and partial != 1.0:
        raise ConfigError(
            f"{where}: partial_rotary_factor {partial} is not supported; this family rotates "
            "whole heads (transformers' apply_rotary_pos_emb needs 1.0)"
        )
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ROPE_TYPES:
        parse_rope_scaling({"rope_type": kind}, where)  # refuses all but "default" by name
        return float(theta), None  # default: plain rotary
    scaling = {
        k: v for k, v in params.items() if (k == "factor" or k in TYPE_KEYS[kind]) and v is not None
    }
    if kind in ("llama3", "yarn"):
        if "original_max_position_embeddings" in hf:  # transformers lets the top-level one win
            scaling["original_max_position_embeddings"] = hf["original_max_position_embeddings"]
        scaling.setdefault("original_max_position_embeddings", n_ctx)
    if kind == "yarn" and "factor" not in scaling and isinstance(n_ctx, int):
        scaling["factor"] = n_ctx / scaling["original_max_position_embeddings"]
    parsed = parse_rope_scaling({"rope_type": kind, **scaling}, where)
    return float(theta), None if parsed is None else rope_scaling_to_dict(parsed)


# --------------------------------------------------------------------------------------------
# Export

# GPT-Neo's own options, which no Llama-family class has.
NOT_EXPORTABLE = GPT_NEO_ONLY


def model_type(cfg: Config) -> str:
    """The family a config exports as: Qwen3 for qk_norm, Qwen2 for qkv_bias, Mistral when
    every layer is local, else Llama."""
    if cfg.qk_norm:
        return "qwen3"
    if cfg.qkv_bias:
        return "qwen2"
    if "local" in cfg.attention_types:
        return "mistral"
    return "llama"


def incompatibilities(cfg: Config) -> list[str]:
    """Config keys the family of `model_type` cannot express (empty when exportable)."""
    problems = [
        f"{key} ({why}: no Llama-family class has it)"
        for key, why in NOT_EXPORTABLE.items()
        if getattr(cfg, key)
    ]
    if cfg.bias:
        problems.append(
            "bias true (Llama-family projections and norms have no biases; qkv_bias gives "
            "Qwen2's query/key/value biases)"
        )
    if not cfg.rotary_emb:
        problems.append("rotary_emb false (Llama-family positions are rotary)")
    elif cfg.rotary_pct != 1.0:
        problems.append(f"rotary_pct {cfg.rotary_pct} (Llama-family rotary turns whole heads)")
    if not cfg.mlp_glu:
        problems.append("mlp_glu false (a Llama-family MLP is gated: SwiGLU)")
    if cfg.activation_function not in ("silu", "swiglu"):
        problems.append(
            f"activation_function '{cfg.activation_function}' (Llama-family MLPs gate with silu)"
        )
    if not cfg.scale_attn_weights:
        problems.append(
            "scale_attn_weights false (Llama-family attention scales scores by 1/sqrt(head_dim))"
        )
    if cfg.qk_norm and cfg.qkv_bias:
        problems.append(
            "qk_norm with qkv_bias (Qwen3 has query/key norms and no biases, Qwen2 biases and "
            "no norms)"
        )
    if cfg.moe_layers:
        problems.append(
            f"moe_layers {list(cfg.moe_layers)} (mixture-of-experts layers: Llama, Mistral, "
            "Qwen2 and Qwen3 have dense MLPs)"
        )
    kinds = set(cfg.attention_types)
    if unsupported := sorted(kinds - {"global", "local"}):
        problems.append(f"attention_types contains {unsupported} (HF supports global and local)")
    elif kinds == {"global", "local"} and not (cfg.qk_norm or cfg.qkv_bias):
        problems.append(
            "attention_types mixes global and local layers (Mistral slides in every layer; "
            "Qwen2 and Qwen3, which mix them, have qkv_bias or qk_norm)"
        )
    return problems


def hf_config(cfg: Config, dtype: str = "float32", token_ids: dict | None = None) -> dict:
    """config.json of the family of `model_type(cfg)`; `token_ids` may give bos/pad ids."""
    kind = model_type(cfg)
    local = "local" in cfg.attention_types
    window = cfg.local_attention_radius if local else None
    scaling = rope_scaling_to_dict(cfg.rope_scaling) if cfg.rope_scaling else None
    ids = {"bos_token_id": None, "pad_token_id": None} | (token_ids or {})
    config = {
        "architectures": [FAMILIES[kind].architecture],
        "model_type": kind,
        "vocab_size": cfg.n_vocab,
        "hidden_size": cfg.n_embd,
        "intermediate_size": cfg.d_mlp,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_kv_head,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.n_ctx,
        "rms_norm_eps": cfg.norm_eps,
        "rope_parameters": {
            "rope_type": "default",
            **(scaling or {}),
            "rope_theta": cfg.rotary_emb_base,
        },
        "rope_theta": cfg.rotary_emb_base,  # transformers 4's spelling of the two
        "rope_scaling": scaling,
        "tie_word_embeddings": not cfg.no_weight_tie,
        "attention_dropout": cfg.attn_dropout,
        "initializer_range": 0.02,
        "use_cache": True,
        **ids,
        "eos_token_id": cfg.eos_id if cfg.eos_id is not None and cfg.eos_id < cfg.n_vocab else None,
        "dtype": dtype,
        "torch_dtype": dtype,  # transformers 4's spelling
    }
    if kind == "llama":
        config |= {"attention_bias": False, "mlp_bias": False, "pretraining_tp": 1}
    elif kind == "mistral":
        config["sliding_window"] = window
    else:
        leading = next((i for i, k in enumerate(cfg.attention_types) if k == "local"), cfg.n_layer)
        config |= {
            "use_sliding_window": local,
            "sliding_window": window,
            "max_window_layers": leading,
            "layer_types": [SLIDING if k == "local" else FULL for k in cfg.attention_types],
        }
        if kind == "qwen3":
            config["attention_bias"] = False
    return config

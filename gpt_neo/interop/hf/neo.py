"""Hugging Face `GPTNeoForCausalLM` <-> (Config, params); rotary GPT-Neo models export as
`GPTNeoXForCausalLM`. Weight correspondence (HF stores Linear weights as [out, in]):

    transformer.wte.weight                     wte                 [vocab, embd]
    transformer.wpe.weight                     wpe                 [n_ctx, embd]
    transformer.h.{i}.ln_1/ln_2.{weight,bias}  blocks[i].ln_1/ln_2.{scale,bias}
    transformer.h.{i}.attn.attention.q_proj    blocks[i].attn.q    transpose, split heads
      (k_proj, v_proj likewise; out_proj -> o transposed, out_proj.bias -> o_bias)
    transformer.h.{i}.mlp.c_fc / c_proj        blocks[i].mlp.fc_* / proj_*  (transpose)
    transformer.ln_f.{weight,bias}             ln_f.{scale,bias}
    lm_head.weight                             tied to wte (not stored), or head.kernel
                                               (no_weight_tie: tie_word_embeddings false)

config.json's `intermediate_size` (null: 4 * hidden_size) and `layer_norm_epsilon` carry over
as `intermediate_size` and `norm_eps`.

A rotary model (global layers only) is a GPT-NeoX with a sequential residual: its per-head
fused `query_key_value` rows are [q_h; k_h; v_h] (q scaled by sqrt(head_dim) to cancel
NeoX's 1/sqrt(head_dim) when our attention is unscaled, as GPT-Neo's is), with a zero bias.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from gpt_neo.config import Config, repeating_pattern
from gpt_neo.errors import ConfigError
from gpt_neo.interop.hf.mapping import (
    GPT_NEO_ONLY,
    LINEAR,
    SAME,
    Tensor,
    eos_in_vocab,
    vocab_rows,
)

# Our activation names -> HF's ACT2FN names for the same function.
HF_ACTIVATIONS = {
    "gelu": "gelu_new",
    "relu": "relu",
    "silu": "silu",
    "sigmoid": "sigmoid",
    "tanh": "tanh",
    "mish": "mish",
    "id": "linear",
}
FROM_HF_ACTIVATIONS = {hf: ours for ours, hf in HF_ACTIVATIONS.items()} | {"swish": "silu"}


def weight_map(cfg: Config) -> Iterator[Tensor]:
    """Every tensor of a `GPTNeoForCausalLM` with this config."""
    d, h, hd, m, v = cfg.n_embd, cfg.n_head, cfg.head_dim, cfg.d_mlp, cfg.n_vocab
    yield Tensor("transformer.wte.weight", ("wte",), (v, d), *vocab_rows(cfg))
    yield Tensor("transformer.wpe.weight", ("wpe",), (cfg.n_ctx, d), *SAME)
    for i in range(cfg.n_layer):
        pre = f"transformer.h.{i}"
        for norm in ("ln_1", "ln_2"):
            yield Tensor(f"{pre}.{norm}.weight", ("blocks", i, norm, "scale"), (d,), *SAME)
            yield Tensor(f"{pre}.{norm}.bias", ("blocks", i, norm, "bias"), (d,), *SAME)
        for proj in ("q", "k", "v"):
            yield Tensor(
                f"{pre}.attn.attention.{proj}_proj.weight",
                ("blocks", i, "attn", proj),
                (h * hd, d),
                lambda a: a.reshape(d, h * hd).T,
                lambda a: a.T.reshape(d, h, hd),
            )
        yield Tensor(
            f"{pre}.attn.attention.out_proj.weight",
            ("blocks", i, "attn", "o"),
            (d, h * hd),
            lambda a: a.reshape(h * hd, d).T,
            lambda a: a.T.reshape(h, hd, d),
        )
        attn = ("blocks", i, "attn")
        yield Tensor(f"{pre}.attn.attention.out_proj.bias", (*attn, "o_bias"), (d,), *SAME)
        mlp = ("blocks", i, "mlp")
        yield Tensor(f"{pre}.mlp.c_fc.weight", (*mlp, "fc_kernel"), (m, d), *LINEAR)
        yield Tensor(f"{pre}.mlp.c_fc.bias", (*mlp, "fc_bias"), (m,), *SAME)
        yield Tensor(f"{pre}.mlp.c_proj.weight", (*mlp, "proj_kernel"), (d, m), *LINEAR)
        yield Tensor(f"{pre}.mlp.c_proj.bias", (*mlp, "proj_bias"), (d,), *SAME)
    yield Tensor("transformer.ln_f.weight", ("ln_f", "scale"), (d,), *SAME)
    yield Tensor("transformer.ln_f.bias", ("ln_f", "bias"), (d,), *SAME)
    if cfg.no_weight_tie:
        yield Tensor("lm_head.weight", ("head", "kernel"), (v, d), *vocab_rows(cfg))


def neox_state_dict(cfg: Config, p: dict) -> dict[str, np.ndarray]:
    """A rotary model's float32 parameters `p` under GPT-NeoX's names and layouts (export only)."""
    d, h, hd = cfg.n_embd, cfg.n_head, cfg.head_dim
    to_vocab = vocab_rows(cfg)[0]
    q_scale = 1.0 if cfg.scale_attn_weights else hd**0.5  # NeoX divides scores by sqrt(hd)

    def per_head(w):  # [embd, heads, kv] -> [heads, kv, embd]: NeoX's fused rows, head-major
        return w.reshape(d, h, hd).transpose(1, 2, 0)

    out = {"gpt_neox.embed_in.weight": to_vocab(p["wte"])}
    for i, b in enumerate(p["blocks"]):
        pre, attn = f"gpt_neox.layers.{i}", b["attn"]
        qkv = [per_head(attn["q"]) * q_scale, per_head(attn["k"]), per_head(attn["v"])]
        out |= {
            f"{pre}.input_layernorm.weight": b["ln_1"]["scale"],
            f"{pre}.input_layernorm.bias": b["ln_1"]["bias"],
            f"{pre}.post_attention_layernorm.weight": b["ln_2"]["scale"],
            f"{pre}.post_attention_layernorm.bias": b["ln_2"]["bias"],
            f"{pre}.attention.query_key_value.weight": np.concatenate(qkv, 1).reshape(3 * d, d),
            f"{pre}.attention.query_key_value.bias": np.zeros(3 * d, np.float32),
            f"{pre}.attention.dense.weight": attn["o"].reshape(h * hd, d).T,
            f"{pre}.attention.dense.bias": attn["o_bias"],
            f"{pre}.mlp.dense_h_to_4h.weight": b["mlp"]["fc_kernel"].T,
            f"{pre}.mlp.dense_h_to_4h.bias": b["mlp"]["fc_bias"],
            f"{pre}.mlp.dense_4h_to_h.weight": b["mlp"]["proj_kernel"].T,
            f"{pre}.mlp.dense_4h_to_h.bias": b["mlp"]["proj_bias"],
        }
    out["gpt_neox.final_layer_norm.weight"] = p["ln_f"]["scale"]
    out["gpt_neox.final_layer_norm.bias"] = p["ln_f"]["bias"]
    out["embed_out.weight"] = to_vocab(p["head"]["kernel"] if cfg.no_weight_tie else p["wte"])
    return out


# --------------------------------------------------------------------------------------------
# Export


# Keys neither GPT-Neo nor GPT-NeoX can express, with why.
NOT_EXPORTABLE = {
    **GPT_NEO_ONLY,
    "mlp_glu": "a gated MLP",
    "qkv_bias": "query/key/value biases",
    "qk_norm": "query/key norms",
    "rope_scaling": "scaled rotary",
}


def incompatibilities(cfg: Config) -> list[str]:
    """Config keys that GPT-Neo (GPT-NeoX for rotary) cannot express (empty when exportable)."""
    problems = [
        f"{key} ({why} has no GPT-Neo equivalent)"
        for key, why in NOT_EXPORTABLE.items()
        if getattr(cfg, key)
    ]
    if not cfg.bias:
        problems.append("bias false (GPT-Neo's projections and LayerNorms have biases)")
    if cfg.n_kv_head != cfg.n_head:
        problems.append(
            f"n_kv_head {cfg.n_kv_head} (grouped-query attention; GPT-Neo has one key/value "
            "head per query head)"
        )
    if cfg.head_dim * cfg.n_head != cfg.n_embd:
        problems.append(f"head_dim {cfg.head_dim} (GPT-Neo's is n_embd / n_head)")
    if cfg.scale_attn_weights and not cfg.rotary_emb:
        problems.append("scale_attn_weights (GPT-Neo's attention is unscaled)")
    if cfg.rotary_emb and set(cfg.attention_types) != {"global"}:
        problems.append(
            "rotary_emb with local/linear/none layers (a rotary model exports as GPT-NeoX, "
            "which has global attention only)"
        )
    if cfg.moe_layers:
        problems.append(
            f"moe_layers {list(cfg.moe_layers)}: transformers has no GPT-Neo class with "
            "mixture-of-experts layers, so no folder would load its experts (keep training and "
            "sampling it here)"
        )
    if unsupported := sorted(set(cfg.attention_types) - {"global", "local"}):
        problems.append(f"attention_types contains {unsupported} (HF supports global and local)")
    if cfg.activation_function not in HF_ACTIVATIONS:
        problems.append(
            f"activation_function '{cfg.activation_function}' "
            f"(HF-expressible: {', '.join(sorted(HF_ACTIVATIONS))})"
        )
    return problems


def compress_attention_types(kinds: tuple[str, ...]) -> list:
    """("global","local")*12 -> [[["global","local"],12]], the shortest repeating form."""
    pattern = repeating_pattern(kinds)
    return [[list(pattern), len(kinds) // len(pattern)]]


def hf_config(cfg: Config, dtype: str = "float32") -> dict:
    eos = cfg.eos_id if cfg.eos_id is not None else 50256  # GPT-2's <|endoftext|>
    if eos >= cfg.n_vocab:
        eos = None
    if cfg.rotary_emb:
        return _neox_config(cfg, eos, dtype)
    return {
        "architectures": ["GPTNeoForCausalLM"],
        "model_type": "gpt_neo",
        "vocab_size": cfg.n_vocab,
        "max_position_embeddings": cfg.n_ctx,
        "hidden_size": cfg.n_embd,
        "num_layers": cfg.n_layer,
        "num_heads": cfg.n_head,
        "attention_types": compress_attention_types(cfg.attention_types),
        "intermediate_size": cfg.d_mlp,
        "window_size": cfg.local_attention_radius,
        "activation_function": HF_ACTIVATIONS[cfg.activation_function],
        "resid_dropout": cfg.res_dropout,
        "embed_dropout": cfg.embed_dropout,
        "attention_dropout": cfg.attn_dropout,
        "layer_norm_epsilon": cfg.norm_eps,
        "initializer_range": 0.02,
        "use_cache": True,
        "bos_token_id": eos,
        "eos_token_id": eos,
        "tie_word_embeddings": not cfg.no_weight_tie,
        "torch_dtype": dtype,
    }


def _neox_config(cfg: Config, eos: int | None, dtype: str) -> dict:
    return {
        "architectures": ["GPTNeoXForCausalLM"],
        "model_type": "gpt_neox",
        "vocab_size": cfg.n_vocab,
        "max_position_embeddings": cfg.n_ctx,
        "hidden_size": cfg.n_embd,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "intermediate_size": cfg.d_mlp,
        "hidden_act": HF_ACTIVATIONS[cfg.activation_function],
        "rotary_pct": cfg.rotary_pct,
        "partial_rotary_factor": cfg.rotary_pct,
        "rotary_emb_base": cfg.rotary_emb_base,
        "rope_theta": cfg.rotary_emb_base,
        "use_parallel_residual": False,  # GPT-Neo's blocks are sequential
        "attention_bias": True,
        "layer_norm_eps": cfg.norm_eps,
        "hidden_dropout": cfg.res_dropout,
        "attention_dropout": cfg.attn_dropout,
        "initializer_range": 0.02,
        "use_cache": True,
        "bos_token_id": eos,
        "eos_token_id": eos,
        "tie_word_embeddings": not cfg.no_weight_tie,
        "torch_dtype": dtype,
    }


# --------------------------------------------------------------------------------------------
# Import


def derive(hf: dict, source: str) -> dict:
    """The architecture (and dropouts, eos) a GPT-Neo config.json gives, as config keys."""
    d = hf.get("hidden_size", 2048)
    act = hf.get("activation_function", "gelu_new")
    if act not in FROM_HF_ACTIVATIONS:
        raise ConfigError(f"{source}: activation_function {act!r} has no GPT-Neo equivalent")
    n_vocab = hf.get("vocab_size", 50257)
    return {
        "n_embd": d,
        "n_head": hf.get("num_heads", 16),
        "n_layer": hf.get("num_layers", 24),
        "n_ctx": hf.get("max_position_embeddings", 2048),
        "n_vocab": n_vocab,
        "intermediate_size": hf.get("intermediate_size") or 4 * d,
        "norm_eps": hf.get("layer_norm_epsilon", 1e-5),
        "attention_types": hf.get("attention_types", [[["global", "local"], 12]]),
        "local_attention_radius": hf.get("window_size", 256),
        "activation_function": FROM_HF_ACTIVATIONS[act],
        "embed_dropout": hf.get("embed_dropout", 0.0),
        "attn_dropout": hf.get("attention_dropout", 0.0),
        "res_dropout": hf.get("resid_dropout", 0.0),
        "no_weight_tie": not hf.get("tie_word_embeddings", True),
        "eos_id": eos_in_vocab(hf.get("eos_token_id"), n_vocab),
    }

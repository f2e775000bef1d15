"""What every architecture's mapping shares: one row per tensor (`Tensor`), the config that an
import derives with the run keys laid on top (`derived_config`), and eos ids.

A `Tensor` row says where a Hugging Face tensor lives in our parameter tree, the shape the
folder's config.json gives it (a stored tensor of another shape is refused, naming both) and
the two layout changes (HF stores `nn.Linear` weights as [out, in]; ours are [in, out], with
the heads split out of the projections).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from gpt_neo.config import SHAPE_KEYS, Config, default_of, from_dict
from gpt_neo.errors import warn
from gpt_neo.mesh import check_layout, padded_vocab

Transform = Callable[[np.ndarray], np.ndarray]


class Tensor(NamedTuple):
    """One Hugging Face tensor and its place in our tree."""

    name: str  # HF's name, e.g. model.layers.0.self_attn.q_proj.weight
    path: tuple  # ours, e.g. ("blocks", 0, "attn", "q")
    shape: tuple[int, ...]  # HF's shape, from the config
    to_hf: Transform
    from_hf: Transform


SAME = (lambda a: a, lambda a: a)
LINEAR = (lambda a: a.T, lambda a: a.T)


def vocab_rows(cfg: Config) -> tuple[Transform, Transform]:
    """HF holds exactly n_vocab rows; ours may be padded (`gpt_neo.mesh.padded_vocab`)."""
    rows = padded_vocab(cfg) - cfg.n_vocab
    return lambda a: a[: cfg.n_vocab], lambda a: np.pad(a, ((0, rows), (0, 0)))


def get(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def put(tree, path, value):
    for key in path[:-1]:
        tree = tree.setdefault(key, {}) if isinstance(key, str) else tree[key]
    tree[path[-1]] = value


# What a Hugging Face folder decides: every key that fixes the parameters' shapes, and those
# that change what the same parameters compute. A run config may not change them on import
# (they are ignored, with a warning naming them); everything else is a run key.
ARCHITECTURE_KEYS = tuple(
    dict.fromkeys(
        (
            *SHAPE_KEYS,
            "local_attention_radius",
            "norm_eps",
            "scale_attn_weights",
            "rotary_emb_base",
            "rotary_pct",
            "rope_scaling",
            "gpt_neo_none_layers",
        )
    )
)


def derived_config(derived: dict, source: str, overrides: dict | None) -> Config:
    """The config of `derived` (the architecture read from a folder) with the run keys of
    `overrides`; an architecture key there that differs from the folder's is ignored, with a
    warning naming it. A rotary model's n_ctx is a run key: it has no position table, so the
    folder's max_position_embeddings (131072 for Llama 3.1) is only the default length."""
    fixed = [k for k in ARCHITECTURE_KEYS if not (k == "n_ctx" and derived.get("rotary_emb"))]
    architecture = {k: derived.get(k, default_of(k)) for k in fixed}
    run_keys = dict(overrides or {})
    ignored = [k for k in fixed if k in run_keys and run_keys.pop(k) != architecture[k]]
    if ignored:
        warn(f"{source}: the architecture comes from the folder; ignoring {', '.join(ignored)}")
    cfg = from_dict({**derived, **run_keys}, source=source)
    check_layout(cfg, source)
    return cfg


def eos_in_vocab(eos, n_vocab: int, preferred: int | None = None) -> int | None:
    """config.json's `eos_token_id` (an id, a list of ids, or null) as our one `eos_id`: of a
    list, `preferred` (the tokenizer's eos token) when the list holds it, else the first. An id
    outside the vocabulary (GPT-2's default 50256 in a small model) is none."""
    if isinstance(eos, list):
        ids = [e for e in eos if isinstance(e, int) and 0 <= e < n_vocab]
        return preferred if preferred in ids else (ids[0] if ids else None)
    return eos if isinstance(eos, int) and 0 <= eos < n_vocab else None


# GPT-Neo's own options, which no transformers class we export to has, with what each is.
GPT_NEO_ONLY = {
    "axial_pos_emb": "axial position embeddings",
    "scalenorm": "GPT-Neo's scalar-gain norm",
    "rezero": "ReZero branch gates",
    "macaron": "macaron MLPs",
    "share_parameters": "parameters shared across layers",
    "num_mem_kv": "memory key/values",
    "gpt_neo_untied_head": "a head without ln_f and with a bias",
    "gpt_neo_none_layers": "GPT-Neo's residual-doubling none layers",
    "mlm_training": "a bidirectional masked LM (the exported classes are causal LMs)",
}

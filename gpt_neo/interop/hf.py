"""Hugging Face `GPTNeoForCausalLM` folders <-> (Config, params); rotary models export as
`GPTNeoXForCausalLM`.

Reads and writes safetensors directly, so neither direction needs PyTorch or `transformers`;
only legacy `pytorch_model.bin` folders need torch (loaded with `weights_only=True`, which
refuses pickled code). Weight correspondence (HF stores Linear weights as [out, in]):

    transformer.wte.weight                     wte                 [vocab, embd]
    transformer.wpe.weight                     wpe                 [n_ctx, embd]
    transformer.h.{i}.ln_1/ln_2.{weight,bias}  blocks[i].ln_1/ln_2.{scale,bias}
    transformer.h.{i}.attn.attention.q_proj    blocks[i].attn.q    transpose, split heads
      (k_proj, v_proj likewise; out_proj -> o transposed, out_proj.bias -> o_bias)
    transformer.h.{i}.mlp.c_fc / c_proj        blocks[i].mlp.fc_* / proj_*  (transpose)
    transformer.ln_f.{weight,bias}             ln_f.{scale,bias}
    lm_head.weight                             tied to wte (not stored), or head.kernel
                                               (no_weight_tie: tie_word_embeddings false)

A rotary model (global layers only) is a GPT-NeoX with a sequential residual: its per-head
fused `query_key_value` rows are [q_h; k_h; v_h] (q scaled by sqrt(head_dim) to cancel
NeoX's 1/sqrt(head_dim): GPT-Neo's attention is unscaled), with a zero bias.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import jax
import numpy as np
from safetensors.numpy import load_file, save_file

from gpt_neo import storage
from gpt_neo.config import SHAPE_KEYS, Config, from_dict, repeating_pattern
from gpt_neo.data.dataset_config import DatasetConfig, write_dataset_config
from gpt_neo.data.encoders import HFEncoder, load_encoder
from gpt_neo.errors import ConfigError, DataError, warn
from gpt_neo.mesh import check_layout, padded_vocab
from gpt_neo.models.gpt import param_shardings
from gpt_neo.models.stack import per_layer, stacked
from gpt_neo.training.checkpoint.imported import save_imported_model

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

Transform = Callable[[np.ndarray], np.ndarray]


def _weight_map(cfg: Config) -> Iterator[tuple[str, tuple, Transform, Transform]]:
    """(HF GPT-Neo name, our param path, ours->HF, HF->ours) for every tensor."""
    d, h, hd = cfg.n_embd, cfg.n_head, cfg.head_dim
    same = (lambda a: a, lambda a: a)
    linear = (lambda a: a.T, lambda a: a.T)
    yield "transformer.wte.weight", ("wte",), *_vocab_rows(cfg)
    yield "transformer.wpe.weight", ("wpe",), *same
    for i in range(cfg.n_layer):
        pre = f"transformer.h.{i}"
        for norm in ("ln_1", "ln_2"):
            yield f"{pre}.{norm}.weight", ("blocks", i, norm, "scale"), *same
            yield f"{pre}.{norm}.bias", ("blocks", i, norm, "bias"), *same
        for proj in ("q", "k", "v"):
            yield (
                f"{pre}.attn.attention.{proj}_proj.weight",
                ("blocks", i, "attn", proj),
                lambda a: a.reshape(d, h * hd).T,
                lambda a: a.T.reshape(d, h, hd),
            )
        yield (
            f"{pre}.attn.attention.out_proj.weight",
            ("blocks", i, "attn", "o"),
            lambda a: a.reshape(h * hd, d).T,
            lambda a: a.T.reshape(h, hd, d),
        )
        yield f"{pre}.attn.attention.out_proj.bias", ("blocks", i, "attn", "o_bias"), *same
        yield f"{pre}.mlp.c_fc.weight", ("blocks", i, "mlp", "fc_kernel"), *linear
        yield f"{pre}.mlp.c_fc.bias", ("blocks", i, "mlp", "fc_bias"), *same
        yield f"{pre}.mlp.c_proj.weight", ("blocks", i, "mlp", "proj_kernel"), *linear
        yield f"{pre}.mlp.c_proj.bias", ("blocks", i, "mlp", "proj_bias"), *same
    yield "transformer.ln_f.weight", ("ln_f", "scale"), *same
    yield "transformer.ln_f.bias", ("ln_f", "bias"), *same
    if cfg.no_weight_tie:
        yield "lm_head.weight", ("head", "kernel"), *_vocab_rows(cfg)


def _vocab_rows(cfg: Config) -> tuple[Transform, Transform]:
    """HF holds exactly n_vocab rows; ours may be padded."""
    rows = padded_vocab(cfg) - cfg.n_vocab
    return lambda a: a[: cfg.n_vocab], lambda a: np.pad(a, ((0, rows), (0, 0)))


def _neox_state_dict(cfg: Config, p: dict) -> dict[str, np.ndarray]:
    """A rotary model's float32 parameters `p` under GPT-NeoX's names and layouts (export only)."""
    d, h, hd = cfg.n_embd, cfg.n_head, cfg.head_dim
    vocab_rows = _vocab_rows(cfg)[0]

    def per_head(w):  # [embd, heads, kv] -> [heads, kv, embd]: NeoX's fused rows, head-major
        return w.reshape(d, h, hd).transpose(1, 2, 0)

    out = {"gpt_neox.embed_in.weight": vocab_rows(p["wte"])}
    for i, b in enumerate(p["blocks"]):
        pre, attn = f"gpt_neox.layers.{i}", b["attn"]
        qkv = [per_head(attn["q"]) * hd**0.5, per_head(attn["k"]), per_head(attn["v"])]
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
    out["embed_out.weight"] = vocab_rows(p["head"]["kernel"] if cfg.no_weight_tie else p["wte"])
    return out


def _get(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def _set(tree, path, value):
    for key in path[:-1]:
        tree = tree.setdefault(key, {}) if isinstance(key, str) else tree[key]
    tree[path[-1]] = value


# --------------------------------------------------------------------------------------------
# Export


# Keys no transformers architecture we export to can express, with why.
NOT_EXPORTABLE = {
    "axial_pos_emb": "axial position embeddings",
    "mlp_glu": "a gated MLP",
    "scalenorm": "GPT-Neo's scalar-gain norm",
    "rezero": "ReZero branch gates",
    "macaron": "macaron MLPs",
    "share_parameters": "parameters shared across layers",
    "num_mem_kv": "memory key/values",
    "gpt_neo_untied_head": "a head without ln_f and with a bias",
    "gpt_neo_none_layers": "GPT-Neo's residual-doubling none layers",
    "mlm_training": "a bidirectional masked LM (the exported classes are causal LMs)",
}


def hf_architecture(cfg: Config) -> str:
    """The transformers model type a config exports as: GPT-NeoX for rotary, else GPT-Neo."""
    return "gpt_neox" if cfg.rotary_emb else "gpt_neo"


def hf_incompatibilities(cfg: Config) -> list[str]:
    """Config keys the export architecture (`hf_architecture`) cannot express (empty when
    exportable)."""
    problems = [
        f"{key} ({why} has no transformers equivalent)"
        for key, why in NOT_EXPORTABLE.items()
        if getattr(cfg, key)
    ]
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


def hf_config(cfg: Config) -> dict:
    eos = cfg.eos_id if cfg.eos_id is not None else 50256  # GPT-2's <|endoftext|>
    if eos >= cfg.n_vocab:
        eos = None
    if cfg.rotary_emb:
        return _neox_config(cfg, eos)
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
        "layer_norm_epsilon": 1e-5,
        "initializer_range": 0.02,
        "use_cache": True,
        "bos_token_id": eos,
        "eos_token_id": eos,
        "tie_word_embeddings": not cfg.no_weight_tie,
        "torch_dtype": "float32",
    }


def _neox_config(cfg: Config, eos: int | None) -> dict:
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
        "layer_norm_eps": 1e-5,
        "hidden_dropout": cfg.res_dropout,
        "attention_dropout": cfg.attn_dropout,
        "initializer_range": 0.02,
        "use_cache": True,
        "bos_token_id": eos,
        "eos_token_id": eos,
        "tie_word_embeddings": not cfg.no_weight_tie,
        "torch_dtype": "float32",
    }


def hf_state_dict(cfg: Config, params: dict) -> dict[str, np.ndarray]:
    """Our parameter tree (or anything shaped like it: gradients too) as float32 arrays under
    Hugging Face GPT-Neo's names and layouts (GPT-NeoX's for a rotary model)."""
    host = jax.tree.map(lambda a: np.asarray(a, np.float32), per_layer(cfg, jax.device_get(params)))
    if cfg.rotary_emb:
        tensors = _neox_state_dict(cfg, host)
    else:
        tensors = {name: to_hf(_get(host, path)) for name, path, to_hf, _ in _weight_map(cfg)}
    return {name: np.ascontiguousarray(a, np.float32) for name, a in tensors.items()}


def export_hf(
    cfg: Config,
    params: dict,
    out_dir: str | os.PathLike,
    *,
    force: bool = False,
    tokenizer: str | None = None,
) -> Path | str:
    """Write a `GPTNeoForCausalLM` folder, local or `gs://` (config.json + model.safetensors, float32), and with
    `tokenizer` (a `load_encoder` spec) its tokenizer.json + tokenizer_config.json, so that
    `AutoTokenizer.from_pretrained(out_dir)` works too.

    A rotary model is written as a `GPTNeoXForCausalLM` folder instead. Refuses an existing
    non-empty `out_dir` unless `force`. Raises `ConfigError` for configs transformers cannot
    express (linear/none layers, other activations, the keys of NOT_EXPORTABLE).
    """
    if problems := hf_incompatibilities(cfg):
        name = {"gpt_neo": "GPT-Neo", "gpt_neox": "GPT-NeoX"}[hf_architecture(cfg)]
        raise ConfigError(
            f"Hugging Face {name} cannot express this config: " + "; ".join(problems) + "."
        )
    if storage.is_remote(str(out_dir)):  # written locally, then copied: safetensors wants a file
        if storage.listdir(str(out_dir)) and not force:
            raise FileExistsError(f"{out_dir} exists and is not empty; choose another or force")
        with tempfile.TemporaryDirectory() as local:
            export_hf(cfg, params, local, tokenizer=tokenizer)
            storage.copy_tree(local, str(out_dir))
        return str(out_dir)
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not force:
        raise FileExistsError(f"{out} exists and is not empty; choose another directory or force")
    out.mkdir(parents=True, exist_ok=True)
    tensors = hf_state_dict(cfg, params)
    # Write under temporary names, then rename: a crash never leaves a half-written model.
    tmp_weights, tmp_config = out / ".model.safetensors.tmp", out / ".config.json.tmp"
    save_file(tensors, str(tmp_weights), metadata={"format": "pt"})
    tmp_config.write_text(json.dumps(hf_config(cfg), indent=2) + "\n")
    os.replace(tmp_weights, out / "model.safetensors")
    os.replace(tmp_config, out / "config.json")
    if tokenizer is not None:
        _export_tokenizer(tokenizer, out)
    return out


def _export_tokenizer(spec: str, out: Path) -> None:
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


# --------------------------------------------------------------------------------------------
# Import


# What a Hugging Face GPT-Neo folder decides: keys a run's config cannot change on import
ARCHITECTURE_KEYS = (
    "n_embd",
    "n_head",
    "n_layer",
    "n_ctx",
    "n_vocab",
    "attention_types",
    "local_attention_radius",
    "activation_function",
    "no_weight_tie",
)


def _config_from_hf(hf: dict, source: str, overrides: dict | None) -> Config:
    if hf.get("model_type") != "gpt_neo":
        raise ConfigError(
            f"{source}: model_type is {hf.get('model_type')!r}, not 'gpt_neo'; only Hugging Face "
            "GPT-Neo (GPTNeoForCausalLM) folders can be imported."
        )
    d = hf.get("hidden_size", 2048)
    if hf.get("intermediate_size") not in (None, 4 * d):
        raise ConfigError(
            f"{source}: intermediate_size {hf['intermediate_size']} != 4*hidden_size; unsupported"
        )
    if abs(hf.get("layer_norm_epsilon", 1e-5) - 1e-5) > 1e-12:
        raise ConfigError(
            f"{source}: layer_norm_epsilon {hf['layer_norm_epsilon']} != 1e-5; unsupported"
        )
    act = hf.get("activation_function", "gelu_new")
    if act not in FROM_HF_ACTIVATIONS:
        raise ConfigError(f"{source}: activation_function {act!r} has no GPT-Neo equivalent")
    n_vocab, eos = hf.get("vocab_size", 50257), hf.get("eos_token_id")
    derived = {
        "n_embd": d,
        "n_head": hf.get("num_heads", 16),
        "n_layer": hf.get("num_layers", 24),
        "n_ctx": hf.get("max_position_embeddings", 2048),
        "n_vocab": n_vocab,
        "attention_types": hf.get("attention_types", [[["global", "local"], 12]]),
        "local_attention_radius": hf.get("window_size", 256),
        "activation_function": FROM_HF_ACTIVATIONS[act],
        "embed_dropout": hf.get("embed_dropout", 0.0),
        "attn_dropout": hf.get("attention_dropout", 0.0),
        "res_dropout": hf.get("resid_dropout", 0.0),
        "no_weight_tie": not hf.get("tie_word_embeddings", True),
        # HF's default eos (GPT-2's 50256) may lie outside a small model's vocabulary
        "eos_id": eos if isinstance(eos, int) and 0 <= eos < n_vocab else None,
    }
    run_keys = dict(overrides or {})
    ignored = [k for k in ARCHITECTURE_KEYS if k in run_keys and run_keys.pop(k) != derived[k]]
    if ignored:
        warn(f"{source}: the architecture comes from the folder; ignoring {', '.join(ignored)}")
    cfg = from_dict({**derived, **run_keys}, source=source)
    check_layout(cfg, source)
    return cfg


def _read_weights(folder: Path) -> dict[str, np.ndarray]:
    if (folder / "model.safetensors").is_file():
        return load_file(folder / "model.safetensors")
    if (index := folder / "model.safetensors.index.json").is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return {k: v for shard in shards for k, v in load_file(folder / shard).items()}
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


def import_hf(hf_dir: str | os.PathLike, *, overrides: dict | None = None, mesh=None):
    """Read a `GPTNeoForCausalLM` folder -> (Config, float32 params).

    `overrides` sets run keys (mesh_shape, layout, model_path, ...) on the derived config;
    with `mesh`, parameters are placed sharded per the layout.
    """
    folder = Path(hf_dir)
    if not (folder / "config.json").is_file():
        raise ConfigError(f"{folder}: no config.json; not a Hugging Face model folder")
    cfg = _config_from_hf(json.loads((folder / "config.json").read_text()), str(folder), overrides)
    weights = {k.removeprefix("model."): v for k, v in _read_weights(folder).items()}
    params: dict = {"blocks": [{} for _ in range(cfg.n_layer)]}
    for name, path, _, from_hf in _weight_map(cfg):
        if name not in weights:
            raise DataError(f"{folder}: weight {name} is missing; the folder is incomplete")
        _set(params, path, np.asarray(from_hf(np.asarray(weights[name], np.float32)), np.float32))
    params = stacked(cfg, params)
    if mesh is not None:
        return cfg, jax.device_put(params, param_shardings(cfg, mesh))
    return cfg, jax.tree.map(jax.numpy.asarray, params)


# --------------------------------------------------------------------------------------------
# Import into a checkpoint that training continues

# The keys an imported model takes from the HF folder; a run config may not change them.
KEYS_FROM_HF_FOLDER = (*SHAPE_KEYS, "local_attention_radius")


@dataclass(frozen=True)
class Imported:
    """What `import_to_checkpoint` wrote."""

    config: str  # model_path/config.json, which `gpt-neo train --model` continues from
    tokenizer: str | None  # the folder's tokenizer, kept under model_path (None: not kept)


# The files of a Hugging Face tokenizer that `load_encoder` reads from a folder, and their
# settings files, kept with an imported model
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json")


def import_to_checkpoint(hf_dir, model_path: str, run_config: dict | None = None) -> Imported:
    """A local HF GPT-Neo folder -> `model_path/config.json` (the HF architecture with the run
    keys of `run_config`: datasets, batch size, optimizer...) and a step-0 checkpoint under
    `model_path` that `gpt-neo train --model model_path/config.json` continues from.

    Without `datasets` in `run_config`, the folder's tokenizer is copied to
    `model_path/tokenizer/` and named by a dataset config of its own
    (`model_path/dataset_configs/<folder name>.json`, no records), so sampling and evaluation read and write
    text at once. With `datasets`, their tokenizer is the model's, as for any run."""
    folder = Path(hf_dir)
    run = {k: v for k, v in (run_config or {}).items() if k not in KEYS_FROM_HF_FOLDER}
    keep = not run.get("datasets") and not storage.is_remote(model_path) and _tokenizer_in(folder)
    dataset_config = Path(model_path) / "dataset_configs" / f"{folder.resolve().name or 'hf'}.json"
    if keep:
        run["datasets"] = [[str(dataset_config), None, None, None]]
    cfg, params = import_hf(folder, overrides={**run, "model_path": model_path})
    config = save_imported_model(cfg, params)  # refuses a model_path holding checkpoints
    if not keep:
        return Imported(config, None)
    kept = Path(model_path) / "tokenizer"
    kept.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (folder / name).is_file():
            shutil.copyfile(folder / name, kept / name)
    dataset = DatasetConfig(
        name=dataset_config.stem,
        n_vocab=cfg.n_vocab,
        tokenizer_path=str(kept),
        tokenizer_is_pretrained=True,
        eos_id=next(e for e in (cfg.eos_id, load_encoder(kept).eos_id, 0) if e is not None),
    )
    write_dataset_config(dataset, dataset_config)
    return Imported(config, str(kept))


def _tokenizer_in(folder: Path) -> bool:
    """Whether `folder` holds a tokenizer `load_encoder` reads (a broken one is not kept)."""
    try:
        load_encoder(folder)
    except DataError:
        return False
    return True

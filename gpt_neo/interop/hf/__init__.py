"""Hugging Face causal-LM folders <-> (Config, params), both ways, no download and no PyTorch:

    GPTNeoForCausalLM                      import, export (GPTNeoXForCausalLM for rotary)
    LlamaForCausalLM, MistralForCausalLM,  import, export (a config with norm rmsnorm exports
    Qwen2ForCausalLM, Qwen3ForCausalLM     as the one of them that expresses it)

    folder    config.json, safetensors (float32/bfloat16/float16 in, float32/bfloat16 out),
              tokenizer files; atomic writes, gs:// destinations
    mapping   what every architecture shares: a row per tensor, derived config + run keys
    neo       GPT-Neo / GPT-NeoX: weight names, config.json both ways, what they cannot express
    llama     Llama / Mistral / Qwen2 / Qwen3 likewise, and the rotary row layouts

An import reads the whole folder and refuses what it cannot take (one line naming the field or
the tensor) before anything is written; `import_to_checkpoint` then writes a step-0 checkpoint
and keeps the folder's tokenizer files. An export refuses a config no exported class can
express, naming its keys.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import jax
import numpy as np

from gpt_neo import storage
from gpt_neo.config import Config
from gpt_neo.data.dataset_config import DatasetConfig, write_dataset_config
from gpt_neo.data.encoders import load_encoder
from gpt_neo.errors import ConfigError, DataError
from gpt_neo.interop.hf import llama, neo
from gpt_neo.interop.hf.folder import (
    EXPORT_DTYPES,
    TOKENIZER_FILES,
    copy_tokenizer_files,
    generation_token_ids,
    read_config,
    read_weights,
    tokenizer_eos_id,
    tokenizer_in,
    write_model_folder,
)
from gpt_neo.interop.hf.mapping import ARCHITECTURE_KEYS, Tensor, derived_config, get, put
from gpt_neo.interop.hf.neo import HF_ACTIVATIONS, NOT_EXPORTABLE, compress_attention_types
from gpt_neo.models.gpt import param_shardings
from gpt_neo.models.stack import per_layer, stacked
from gpt_neo.training.checkpoint.imported import save_imported_model

__all__ = [
    "ARCHITECTURE_KEYS",
    "EXPORT_DTYPES",
    "HF_ACTIVATIONS",
    "IMPORTABLE",
    "NOT_EXPORTABLE",
    "TOKENIZER_FILES",
    "Imported",
    "compress_attention_types",
    "export_hf",
    "hf_architecture",
    "hf_config",
    "hf_incompatibilities",
    "hf_state_dict",
    "import_hf",
    "import_to_checkpoint",
]

# model_type -> the transformers class an import reads
IMPORTABLE = {
    "gpt_neo": "GPTNeoForCausalLM",
    **{kind: family.architecture for kind, family in llama.FAMILIES.items()},
}
_NAMES = {
    "gpt_neo": "GPT-Neo",
    "gpt_neox": "GPT-NeoX",
    "llama": "Llama",
    "mistral": "Mistral",
    "qwen2": "Qwen2",
    "qwen3": "Qwen3",
}


def _is_llama_family(cfg: Config) -> bool:
    """RMSNorm configs export as Llama/Mistral/Qwen2/Qwen3; the rest as GPT-Neo/GPT-NeoX."""
    return cfg.norm == "rmsnorm"


def _weight_map(cfg: Config):
    return llama.weight_map(cfg) if _is_llama_family(cfg) else neo.weight_map(cfg)


# --------------------------------------------------------------------------------------------
# Export


def hf_architecture(cfg: Config) -> str:
    """The transformers model type a config exports as: llama, mistral, qwen2 or qwen3 for
    norm rmsnorm (`llama.model_type`), else gpt_neox for rotary and gpt_neo."""
    if _is_llama_family(cfg):
        return llama.model_type(cfg)
    return "gpt_neox" if cfg.rotary_emb else "gpt_neo"


def hf_incompatibilities(cfg: Config) -> list[str]:
    """Config keys the export architecture (`hf_architecture`) cannot express (empty when
    exportable)."""
    if _is_llama_family(cfg):
        return llama.incompatibilities(cfg)
    return neo.incompatibilities(cfg)


def hf_config(cfg: Config, dtype: str = "float32", token_ids: dict | None = None) -> dict:
    """The config.json of the export architecture; `token_ids` may give bos/pad ids."""
    if _is_llama_family(cfg):
        return llama.hf_config(cfg, dtype, token_ids)
    return neo.hf_config(cfg, dtype)


def hf_state_dict(cfg: Config, params: dict) -> dict[str, np.ndarray]:
    """Our parameter tree (or anything shaped like it: gradients too) as float32 arrays under
    the export architecture's names and layouts."""
    host = jax.tree.map(lambda a: np.asarray(a, np.float32), per_layer(cfg, jax.device_get(params)))
    if cfg.rotary_emb and not _is_llama_family(cfg):
        tensors = neo.neox_state_dict(cfg, host)
    else:
        tensors = {t.name: t.to_hf(get(host, t.path)) for t in _weight_map(cfg)}
    return {name: np.ascontiguousarray(a, np.float32) for name, a in tensors.items()}


def export_hf(
    cfg: Config,
    params: dict,
    out_dir: str | os.PathLike,
    *,
    force: bool = False,
    tokenizer: str | None = None,
    dtype: str = "float32",
) -> Path | str:
    """Write a transformers folder, local or `gs://`: config.json + model.safetensors
    (`dtype`: float32 or bfloat16), and with `tokenizer` (a `load_encoder` spec; a folder's
    tokenizer files, chat template and generation settings are copied) the tokenizer, so that
    `AutoTokenizer.from_pretrained(out_dir)` works too.

    The class is `hf_architecture(cfg)`'s: GPTNeoForCausalLM, GPTNeoXForCausalLM (rotary),
    or for norm rmsnorm Qwen3ForCausalLM (qk_norm), Qwen2ForCausalLM (qkv_bias),
    MistralForCausalLM (local layers), LlamaForCausalLM. Refuses an existing non-empty
    `out_dir` unless `force`. Raises `ConfigError` naming the keys the class cannot express.
    """
    if problems := hf_incompatibilities(cfg):
        name = _NAMES[hf_architecture(cfg)]
        hint = ""
        if not _is_llama_family(cfg) and _looks_llama(cfg):
            hint = (
                " (a config exports as Llama, Mistral, Qwen2 or Qwen3 with norm rmsnorm, bias "
                "false, rotary, mlp_glu with silu and scale_attn_weights)"
            )
        raise ConfigError(
            f"Hugging Face {name} cannot express this config: " + "; ".join(problems) + hint + "."
        )
    if dtype not in EXPORT_DTYPES:
        raise ConfigError(f"export dtype {dtype!r}: choose one of {', '.join(EXPORT_DTYPES)}")
    config = hf_config(cfg, dtype, generation_token_ids(tokenizer))
    tensors = hf_state_dict(cfg, params)
    return write_model_folder(
        out_dir, tensors, config, dtype=dtype, force=force, tokenizer=tokenizer
    )


def _looks_llama(cfg: Config) -> bool:
    return (
        cfg.mlp_glu
        or not cfg.bias
        or cfg.qkv_bias
        or cfg.qk_norm
        or cfg.n_kv_head != cfg.n_head
        or cfg.head_dim * cfg.n_head != cfg.n_embd
    )


# --------------------------------------------------------------------------------------------
# Import


def import_hf(hf_dir: str | os.PathLike, *, overrides: dict | None = None, mesh=None):
    """Read a local Hugging Face folder (`IMPORTABLE`: GPT-Neo, Llama, Mistral, Qwen2, Qwen3)
    -> (Config, float32 params).

    `overrides` sets run keys (mesh_shape, layout, model_path, ...) on the derived config
    (architecture keys there are ignored, with a warning); with `mesh`, parameters are placed
    sharded per the layout. Raises `ConfigError` (config.json) or `DataError` (weights) naming
    the field or tensor it cannot take.
    """
    folder = Path(hf_dir)
    hf = read_config(folder)
    source = str(folder)
    model_type = hf.get("model_type")
    if model_type not in IMPORTABLE:
        supported = ", ".join(f"{cls} ({kind})" for kind, cls in IMPORTABLE.items())
        raise ConfigError(
            f"{source}: model_type is {model_type!r}; the folders that import are {supported}"
        )
    if model_type == "gpt_neo":
        derived = neo.derive(hf, source)
    else:
        derived = llama.derive(hf, source, tokenizer_eos_id(folder))
    cfg = derived_config(derived, source, overrides)
    weights = read_weights(folder)
    if model_type == "gpt_neo":
        weights = {k.removeprefix("model."): v for k, v in weights.items()}
        unused = None
    else:
        weights = llama.stored_names(weights)
        unused = lambda name: not llama.ignorable(cfg, name)  # noqa: E731
    params = _params(cfg, list(_weight_map(cfg)), weights, folder, unused)
    params = stacked(cfg, params)
    if mesh is not None:
        return cfg, jax.device_put(params, param_shardings(cfg, mesh))
    return cfg, jax.tree.map(jax.numpy.asarray, params)


def _params(cfg: Config, tensors: list[Tensor], weights: dict, folder: Path, unused) -> dict:
    """Our per-layer tree from `weights`; each tensor must be there with its config shape.
    With `unused` (name -> whether a leftover tensor is an error), tensors no row maps are
    refused too."""
    params: dict = {"blocks": [{} for _ in range(cfg.n_layer)]}
    for t in tensors:
        if t.name not in weights:
            raise DataError(f"{folder}: weight {t.name} is missing; the folder is incomplete")
        w = weights[t.name]
        if tuple(w.shape) != t.shape:
            raise DataError(
                f"{folder}: weight {t.name} has shape {list(w.shape)}, but config.json makes it "
                f"{list(t.shape)}"
            )
        put(params, t.path, np.asarray(t.from_hf(w), np.float32))
    if unused is not None:
        mapped = {t.name for t in tensors}
        if extra := sorted(n for n in weights if n not in mapped and unused(n)):
            more = f" (and {len(extra) - 3} more)" if len(extra) > 3 else ""
            raise DataError(
                f"{folder}: weight {', '.join(extra[:3])}{more} has no place in the model "
                "config.json describes (biases or norms it does not declare?)"
            )
    return params


# --------------------------------------------------------------------------------------------
# Import into a checkpoint that training continues


@dataclass(frozen=True)
class Imported:
    """What `import_to_checkpoint` wrote."""

    config: str  # model_path/config.json, which `gpt-neo train --model` continues from
    tokenizer: str | None  # the folder's tokenizer, kept under model_path (None: not kept)


def import_to_checkpoint(hf_dir, model_path: str, run_config: dict | None = None) -> Imported:
    """A local HF folder (`IMPORTABLE`) -> `model_path/config.json` (the HF architecture with
    the run keys of `run_config`: datasets, batch size, optimizer...) and a step-0 checkpoint
    under `model_path` that `gpt-neo train --model model_path/config.json` continues from.
    Nothing is written when the folder cannot be imported.

    Without `datasets` in `run_config`, the folder's tokenizer files (`TOKENIZER_FILES`: the
    chat template and generation settings too) are copied to `model_path/tokenizer/` and named
    by a dataset config of their own (`model_path/dataset_configs/<folder name>.json`, no
    records), so sampling and evaluation read and write text at once, and an export writes
    them back. With `datasets`, their tokenizer is the model's, as for any run."""
    folder = Path(hf_dir)
    run = dict(run_config or {})  # architecture keys among them: ignored with a warning
    keep = not run.get("datasets") and not storage.is_remote(model_path) and tokenizer_in(folder)
    dataset_config = Path(model_path) / "dataset_configs" / f"{folder.resolve().name or 'hf'}.json"
    if keep:
        run["datasets"] = [[str(dataset_config), None, None, None]]
    cfg, params = import_hf(folder, overrides={**run, "model_path": model_path})
    config = save_imported_model(cfg, params)  # refuses a model_path holding checkpoints
    if not keep:
        return Imported(config, None)
    kept = Path(model_path) / "tokenizer"
    copy_tokenizer_files(folder, kept)
    dataset = DatasetConfig(
        name=dataset_config.stem,
        n_vocab=cfg.n_vocab,
        tokenizer_path=str(kept),
        tokenizer_is_pretrained=True,
        eos_id=next(e for e in (cfg.eos_id, load_encoder(kept).eos_id, 0) if e is not None),
    )
    write_dataset_config(dataset, dataset_config)
    return Imported(config, str(kept))

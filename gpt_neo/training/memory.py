"""Per-device memory of a config, from the config alone: what `--summary` estimates and what
`layout: "auto"` ranks candidates by, held to the TPU compiler's `memory_analysis`
(tests/training/test_memory.py, bench/memory_planner.py).

What a train step holds on one device:
- arguments: float32 parameters, optimizer state (both split per `layout` + `param_layout`)
  and the batch of token ids;
- gradients: float32, split like the parameters (three times with microbatches: the current
  microbatch's and the running sum, carried into and out of the loop; four with FSDP, which
  also carries the weights in the compute dtype);
- saved activations: with `recompute_grad`, every block's input (the residual stream,
  [batch, seq, embd] in the compute dtype); without it, everything a block's backward pass
  reads (the residual stream before each branch, q/k/v, the attention output, the MLP's
  hidden layer before and after the activation); less what the backward pass frees before
  the last gradients exist (`freed_early`);
- one block's working set while it is recomputed and differentiated: its weights in the
  compute dtype (gathered whole where `param_layout` splits them), its weight gradients
  before they are reduced, and its largest activations;
- the output head's weights in the compute dtype and their gradient, likewise (its loss,
  gpt_neo.models.loss, keeps one chunk of float32 logits, in the forward pass, before any
  gradient exists: not a term of the peak).

Sizes are per device: each logical dimension divided by the mesh axes the layout splits it
over. Decoding holds the parameters in the compute dtype and the KV cache.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from dataclasses import dataclass
from typing import NamedTuple

import jax.numpy as jnp

from gpt_neo import axes
from gpt_neo.config import Config
from gpt_neo.mesh import logical_dim_sizes, mesh_axes, param_spec, pieces, rules
from gpt_neo.models.context import query_block
from gpt_neo.models.gpt import COMPUTE_DTYPES, param_decl_leaves, param_path
from gpt_neo.models.stack import layer_stacks

BYTES_PER_PARAM = 4  # float32 master copies, whatever the compute precision


@dataclass(frozen=True)
class ParamRow:
    name: str  # blocks/*/attn/q style, layers folded together
    layers: int  # how many parameters share the row
    shape: tuple[int, ...]  # as stored (the vocabulary padded, if it is)
    axes: tuple[str | None, ...]
    spec: str  # mesh axes per dimension, "-" where replicated
    device_shape: tuple[int, ...]


def _device_shape(cfg: Config, shape, dims) -> tuple[int, ...]:
    """The per-device shape of a parameter under the parameter rules (mesh sizes from
    mesh_shape; unknown sizes count as 1)."""
    sizes = mesh_axes(cfg) or {}
    table = rules(cfg).parameters
    return tuple(size // pieces(sizes, table, dim) for size, dim in zip(shape, dims, strict=True))


def param_rows(cfg: Config) -> list[ParamRow]:
    grouped: dict[str, list] = defaultdict(list)
    for path, decl in param_decl_leaves(cfg, per_layer=True)[0]:  # stacks count by layer
        grouped[re.sub(r"^blocks/\d+/", "blocks/*/", param_path(path))].append(decl)
    rows = []
    for name, decls in grouped.items():
        decl = decls[0]
        spec = param_spec(cfg, decl.axes)
        rows.append(
            ParamRow(
                name,
                len(decls),
                decl.stored_shape,
                decl.axes,
                ",".join(_mesh_text(a) for a in spec) or "-",
                _device_shape(cfg, decl.stored_shape, decl.axes),
            )
        )
    return rows


def _mesh_text(entry) -> str:
    """One PartitionSpec entry as text: `x`, `x+z`, or `-` for replicated."""
    if entry is None:
        return "-"
    return entry if isinstance(entry, str) else "+".join(entry)


ADAFACTOR_MIN_DIM_TO_FACTOR = 128  # optax.scale_by_factored_rms's default


def optimizer_state_elements(cfg: Config, shape: tuple[int, ...], device_shape) -> int:
    """Optimizer-state floats per device for one parameter of `shape` (`device_shape` on one
    device). Moments shaped like the parameter are split like it (gpt_neo.training.optim.state_shardings);
    Adafactor's factored statistics are replicated."""
    if cfg.opt_name.lower() == "adam":
        return 2 * math.prod(device_shape)  # first and second moments
    # Adafactor (optax): factors the two largest dims when both reach 128, keeping a row and a
    # column statistic plus a 1-element placeholder; else the full v and two placeholders.
    largest = sorted(range(len(shape)), key=lambda d: shape[d])[-2:]
    if len(shape) < 2 or shape[largest[0]] < ADAFACTOR_MIN_DIM_TO_FACTOR:
        return math.prod(device_shape) + 2
    size = math.prod(shape)
    return size // shape[largest[1]] + size // shape[largest[0]] + 1


def memory_per_device(cfg: Config) -> dict[str, int]:
    """Bytes per device of float32 parameters and optimizer state, under the configured mesh."""
    params = optimizer = 0
    for row in param_rows(cfg):
        params += row.layers * math.prod(row.device_shape)
        optimizer += row.layers * optimizer_state_elements(cfg, row.shape, row.device_shape)
    return {"parameters": params * BYTES_PER_PARAM, "optimizer state": optimizer * BYTES_PER_PARAM}


@dataclass(frozen=True)
class MemoryPlan:
    """Estimated bytes per device of one train step (and of decoding)."""

    parameters: int
    optimizer_state: int
    batch: int
    gradients: int
    saved_activations: int
    block_working_set: int  # one block's backward pass, with the output head's weights
    freed_early: int  # saved activations freed before the last gradients exist (see `plan`)
    scan_copies: int  # what scanning stacked layers adds (see SCAN_BYTES_PER_PARAMETER)
    kv_cache: int  # decoding, at n_ctx positions for predict_batch_size rows
    prefill_working_set: int
    decode_parameters: int  # decoding reads compute-dtype parameters
    decode_gathered: int  # ... and gathered whole, where param_layout splits them

    @property
    def arguments(self) -> int:
        return self.parameters + self.optimizer_state + self.batch

    @property
    def temporaries(self) -> int:
        return (
            self.gradients
            + self.saved_activations
            - self.freed_early
            + self.block_working_set
            + self.scan_copies
        )

    @property
    def train_total(self) -> int:
        return self.arguments + self.temporaries

    @property
    def decode_total(self) -> int:
        return (
            self.decode_parameters
            + self.decode_gathered
            + 2 * self.kv_cache
            + self.prefill_working_set
        )

    def lines(self) -> list[tuple[str, int]]:
        return [
            ("parameters (float32)", self.parameters),
            ("optimizer state", self.optimizer_state),
            ("gradients (float32)", self.gradients),
            ("saved activations", self.saved_activations),
            ("freed as gradients arrive", -self.freed_early),
            ("working set", self.block_working_set),
            *([("scanned layers' copies", self.scan_copies)] if self.scan_copies else []),
            ("batch", self.batch),
        ]


def local_dims(cfg: Config, sizes: dict[str, int], microbatches: int = 1) -> dict[str, int]:
    """Each logical dimension's size on one device under the activation layout."""
    table = rules(cfg).activations
    dims = logical_dim_sizes(cfg)
    dims[axes.BATCH] = (cfg.train_batch_size or 1) // microbatches  # plan() sets it
    return {
        name: -(-size // pieces(sizes, table, name))
        for name, size in dims.items()
        if size is not None
    }


def num_microbatches(cfg: Config, batch_size: int, data_parallel: int) -> int:
    """GPT-Neo's `tokens_per_mb_per_replica`: sequences per microbatch = tokens // n_ctx,
    lowered until it divides the per-replica batch."""
    per_replica = batch_size // data_parallel
    if not cfg.tokens_per_mb_per_replica:
        return 1
    size = max(1, min(per_replica, cfg.tokens_per_mb_per_replica // cfg.n_ctx))
    while per_replica % size:
        size -= 1
    return per_replica // size


def plan(cfg: Config, sizes: dict[str, int] | None = None) -> MemoryPlan:
    """The estimate for `cfg` on a mesh of `sizes` (default: `mesh_shape`; unset: 1 device)."""
    sizes = sizes or mesh_axes(cfg) or {"x": 1}
    if mesh_axes(cfg) != sizes:
        cfg = cfg.replace(mesh_shape=",".join(f"{k}:{v}" for k, v in sizes.items()))
    act = jnp.dtype(COMPUTE_DTYPES[cfg.precision]).itemsize
    stored = memory_per_device(cfg)
    data = pieces(sizes, rules(cfg).activations, axes.BATCH)  # data-parallel replicas
    batch = cfg.train_batch_size
    if not batch:  # a model-only config: one sequence per replica
        batch = data
        cfg = cfg.replace(train_batch_size=batch)
    n_micro = num_microbatches(cfg, batch, data)
    d = local_dims(cfg, sizes, n_micro)
    tokens = d[axes.BATCH] * d[axes.SEQ]
    qkv = tokens * d[axes.HEADS] * d[axes.KV]
    hidden = tokens * d[axes.EMBD]
    mlp = tokens * d[axes.MLP]
    attending = sum(kind != "none" for kind in cfg.attention_types)

    if cfg.recompute_grad:
        saved = cfg.n_layer * hidden * act
    else:
        # the residual stream before each branch (XLA recomputes the LayerNorms from it,
        # fused into the matmuls), q, k, v and the attention output, the MLP's pre-activation
        # and activation (k and v as the attention reads them: one per query head, also with
        # grouped-query attention)
        per_block = (2 * hidden + 4 * qkv + 2 * mlp) * act
        saved = cfg.n_layer * per_block - (cfg.n_layer - attending) * 4 * qkv * act

    layer = weights(cfg, lambda name: name.startswith("blocks/"))
    head = weights(cfg, lambda name: name in ("wte", "head/kernel"))
    every = weights(cfg, every_layer=True)
    fsdp = gathers_weights(cfg)
    block = (
        # the MLP's hidden layer, five buffers of it: pre-activation and activation
        # (recomputed), their gradients and a copy; measured where they dominate (125M at 256
        # sequences per device: three under-estimate the compiler by 19%, five are within 1%)
        5 * mlp * act
        + layer.gathered * act  # compute-dtype weights, whole where param_layout splits them
        + (layer.gathered - layer.local) * 4  # their gradients before the reduce-scatter
        + head.gathered * act  # the output head's weights and gradient, likewise
        + (head.gathered - head.local) * 4
    )

    block += context_attention_bytes(cfg, sizes, n_micro)

    # with microbatches, one microbatch's gradients plus their running sum, which the loop
    # carries in and out (two buffers: 3 in all fits the compiler at 125M, batch 32 and 1024).
    # With FSDP the loop also holds a copy of the sum (the barrier that keeps microbatches
    # in sequence, gpt_neo.training.step.gradients) and the local weights in the compute dtype, cast
    # once before the loop (125M and 1.3B on v5e:2x2: -9% and +6% with both, -20% and -12%
    # without).
    grads = stored["parameters"] * (1 if n_micro == 1 else 4 if fsdp else 3)
    if n_micro > 1 and fsdp:
        block += stored["parameters"] * act // 4
    # The backward pass frees each block's saved activations as it makes the block's
    # gradients. Where gradients are whole on every device (data and tensor parallel) XLA
    # overlaps the two fully: the peak is the larger of (saved + the head's gradient, made
    # first) and all of one pass's gradients. With FSDP (parameters split beyond the
    # activation layout) it overlaps less, the more the larger the model: on v5e:2x2 none at
    # 125M and 350M, 46% at 1.3B, 73% at 2.7B (bench/memory_planner.py); counted as half.
    fresh = stored["parameters"]  # one pass's gradients (a microbatch sum, if any, stays)
    overlap = saved + fresh - max(saved + head.local * 4, fresh)
    freed_early = overlap // 2 if fsdp else overlap
    # sampling: prompts padded to the data-parallel size (gpt_neo.inference.sample), then split like a
    # batch; the loop carries the cache in and out (two copies), and the prefill of half the
    # context holds one layer's attention scores over the cache
    decode_rows = -(-cfg.predict_batch_size // data)
    cache = 2 * attending * decode_rows * cfg.n_ctx * d[axes.KV_HEADS] * d[axes.KV] * act
    # (scores, their exponentials and the mask: three [rows, heads, n_ctx / 2, n_ctx] float32)
    prefill_scores = 3 * decode_rows * d[axes.HEADS] * (cfg.n_ctx // 2) * cfg.n_ctx * 4
    return MemoryPlan(
        parameters=stored["parameters"],
        optimizer_state=stored["optimizer state"],
        batch=batch // data * (cfg.n_ctx + 1) * 4,
        gradients=grads,
        saved_activations=saved,
        block_working_set=block,
        freed_early=freed_early,
        scan_copies=_scan_copies(cfg),
        kv_cache=cache,
        prefill_working_set=prefill_scores,
        decode_parameters=stored["parameters"] * act // 4,
        # the compiler hoists FSDP's weight gathers out of the decode loop: every weight is
        # gathered whole at once, beside its shard
        decode_gathered=every.gathered * act if fsdp else 0,
    )


def context_attention_bytes(cfg: Config, sizes: dict[str, int], microbatches: int = 1) -> int:
    """One attention layer's working set in the backward pass when the layout splits the
    sequence (`gpt_neo.models.context`), 0 when it does not: one block of queries' float32
    scores against a device's keys, three times (scores, probabilities, their gradient), the
    queries' float32 gradient sum, and the keys and values from other devices with float32
    gradient sums: every device's, gathered (`all_gather`), or two chunks in flight (`ring`:
    the one computed and the one arriving, and the sums travelling and being added)."""
    split = pieces(sizes, rules(cfg).activations, axes.SEQ)
    if split == 1:
        return 0
    act = jnp.dtype(COMPUTE_DTYPES[cfg.precision]).itemsize
    d = local_dims(cfg, sizes, microbatches)
    local = cfg.n_ctx // split  # tokens of one sequence on one device
    rows_heads = d[axes.BATCH] * d[axes.HEADS]
    queries = query_block(local if cfg.mlm_training else local // 2, 4 * rows_heads * local)
    scores = 3 * rows_heads * queries * local * 4
    query_grads = rows_heads * local * d[axes.KV] * 4
    kv = 2 * d[axes.BATCH] * d[axes.KV_HEADS] * d[axes.KV]  # a token's key and value
    if cfg.context_parallel == "all_gather":
        keys = kv * cfg.n_ctx * (act + 4)
    else:
        keys = kv * local * 2 * (act + 4)
    return scores + query_grads + keys


def context_bytes_sent(cfg: Config, sizes: dict[str, int], microbatches: int = 1) -> int:
    """Bytes one device sends per train step for context-parallel attention: each layer's keys
    and values go to every other device of the sequence split in each forward pass (a
    recomputed one too), again in the backward pass, and their float32 gradients come back.
    The same for `all_gather` (gather, gather, reduce-scatter) and `ring` (P-1 hops, P-1 hops,
    P hops). Local layers send less (a halo of window - 1 tokens): counted as global."""
    split = pieces(sizes, rules(cfg).activations, axes.SEQ)
    if split == 1:
        return 0
    act = jnp.dtype(COMPUTE_DTYPES[cfg.precision]).itemsize
    d = local_dims(cfg, sizes, microbatches)
    chunk = 2 * d[axes.BATCH] * d[axes.SEQ] * d[axes.KV_HEADS] * d[axes.KV]  # elements
    forward_passes = 2 if cfg.recompute_grad else 1
    attending = sum(kind not in ("none", "linear") for kind in cfg.attention_types)
    per_layer = (split - 1) * chunk * ((forward_passes + 1) * act + 4)
    return microbatches * attending * per_layer


# Scanned layers (gpt_neo.models.stack) cost the TPU compiler more memory than the same layers
# unrolled: the backward loop's stacked gradients are a buffer of their own, and compute-dtype
# copies of the stacks are hoisted out of the loops (bfloat16 propagation). Counted per
# parameter of the stacked layers' local shards, as measured on v5e:2x2 with libtpu 0.0.52:
# the whole plan is then within 3% of the compiler at 125M data parallel (12 layers), 5% at 24
# layers, 7% at 1.3B under FSDP (bench/memory_planner.py).
SCAN_BYTES_PER_PARAMETER = 13


def _scan_copies(cfg: Config) -> int:
    if layer_stacks(cfg) is None:
        return 0
    stacked = weights(cfg, lambda name: name.startswith("blocks/"), every_layer=True)
    return SCAN_BYTES_PER_PARAMETER * stacked.local


def gathers_weights(cfg: Config) -> bool:
    """FSDP: whether `param_layout` splits weights that the matmuls read whole, so that every
    pass gathers them."""
    every = weights(cfg, every_layer=True)
    return every.gathered > every.local


class Weights(NamedTuple):
    local: int  # elements on one device
    gathered: int  # elements as the matmuls use them


def weights(cfg: Config, include=lambda name: True, every_layer: bool = False) -> Weights:
    """Elements of the parameters whose summary name `include` accepts (one block of each
    kind, or `every_layer`): on one device, and as the matmuls use them (split only where the
    activation layout splits the same dimension; the rest gathered, as FSDP does)."""
    mesh = mesh_axes(cfg) or {}
    acts = rules(cfg).activations
    local = gathered = 0
    for row in param_rows(cfg):
        if not include(row.name):
            continue
        count = row.layers if every_layer else 1
        local += count * math.prod(row.device_shape)
        gathered += count * math.prod(
            size // pieces(mesh, acts, dim) for size, dim in zip(row.shape, row.axes, strict=True)
        )
    return Weights(local, gathered)

"""How the layers' parameters are stored: a list of blocks, or stacks that `lax.scan` runs.

A model whose layers repeat a pattern (`attention_types` and `moe_layers` together, e.g.
GPT-Neo's `[["global","local"], 12]`) stores them as one stack per position of the pattern:

    loop:     params["blocks"] = [layer 0, layer 1, ..., layer n-1]
    scanned:  params["stacks"] = [stack 0, ..., stack p-1]    (p = the pattern's length)
              stack j = layers j, j+p, j+2p, ... with a leading axis of `repeats` = n / p

The leading axis is never split over the mesh; every other dimension is laid out as the
layer's own. `config.rules.scan_period` decides which a config gets (`scan_layers`).

Everything outside the model's forward pass that names layers (Hugging Face and
Mesh-TensorFlow conversion, per-layer gradient norms, the memory planner, checkpoints written
the other way) reads and writes the per-layer list and converts at its edge with
`stacked`/`per_layer`, which work on any tree holding parameter-shaped dicts (optimizer
states too) and on arrays, shapes or declarations alike.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from gpt_neo.config import Config, scan_period
from gpt_neo.models.layers import ParamDecl

BLOCKS, STACKS = "blocks", "stacks"


@dataclass(frozen=True)
class Stacks:
    """The scanned layout: `period` stacks of `repeats` layers each."""

    period: int
    repeats: int

    def layers(self, position: int) -> range:
        """The layers stack `position` holds, in order along its leading axis."""
        return range(position, self.period * self.repeats, self.period)


def layer_stacks(cfg: Config) -> Stacks | None:
    """The config's scanned layout, or None when its layers run in a Python loop."""
    period = scan_period(cfg)
    return None if period is None else Stacks(period, cfg.n_layer // period)


def stacked(cfg: Config, tree):
    """`tree` with every per-layer block list in the config's stored layout (a no-op when the
    config loops)."""
    stacks = layer_stacks(cfg)
    return tree if stacks is None else stack_tree(stacks, tree)


def per_layer(cfg: Config, tree):
    """`tree` with every stack list unrolled into the per-layer block list (a no-op when the
    config loops)."""
    stacks = layer_stacks(cfg)
    return tree if stacks is None else unstack_tree(stacks, tree)


def per_layer_blocks(cfg: Config, params) -> list:
    """The blocks of `params`, one per layer, whichever layout it is stored in."""
    return per_layer(cfg, params)[BLOCKS]


def stack_tree(stacks: Stacks, tree):
    """Every dict in `tree` that holds a per-layer `blocks` list, with `stacks` instead."""
    return _rewrite(tree, BLOCKS, lambda blocks: _stack(stacks, blocks))


def unstack_tree(stacks: Stacks, tree):
    """Every dict in `tree` that holds `stacks`, with the per-layer `blocks` list instead."""
    return _rewrite(tree, STACKS, lambda layers: _unstack(stacks, layers))


def _has_layers(node) -> bool:
    return isinstance(node, dict) and (BLOCKS in node or STACKS in node)


def _rewrite(tree, key: str, convert: Callable[[list], list]):
    other = STACKS if key == BLOCKS else BLOCKS

    def visit(node):
        if not (isinstance(node, dict) and key in node):
            return node
        node = dict(node)
        node[other] = convert(node.pop(key))
        return node

    return jax.tree.map(visit, tree, is_leaf=_has_layers)


def _stack(stacks: Stacks, blocks: list) -> list:
    if len(blocks) != stacks.period * stacks.repeats:
        raise ValueError(
            f"{len(blocks)} blocks do not make {stacks.period} stacks of {stacks.repeats}"
        )
    return [
        jax.tree.map(_stack_leaves, *(blocks[i] for i in stacks.layers(j)), is_leaf=_is_decl)
        for j in range(stacks.period)
    ]


def _unstack(stacks: Stacks, layers: list) -> list:
    blocks: list = [None] * (stacks.period * stacks.repeats)
    for j, stack in enumerate(layers):
        for r, i in enumerate(stacks.layers(j)):
            blocks[i] = jax.tree.map(
                lambda leaf, r=r: _slice_leaf(leaf, r), stack, is_leaf=_is_decl
            )
    return blocks


def _is_decl(node) -> bool:
    return isinstance(node, ParamDecl)


def _stack_leaves(*leaves):
    first = leaves[0]
    if isinstance(first, ParamDecl):
        return ParamDecl((len(leaves), *first.shape), (None, *first.axes), first.init)
    if isinstance(first, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(
            (len(leaves), *first.shape),
            first.dtype,
            sharding=_sharding(first, lambda s: (None, *s)),
        )
    if isinstance(first, np.ndarray):  # host arrays stay on the host (imports)
        return np.stack(leaves)
    return jnp.stack(leaves)


def _slice_leaf(leaf, index: int):
    if isinstance(leaf, ParamDecl):
        return ParamDecl(leaf.shape[1:], leaf.axes[1:], leaf.init)
    if isinstance(leaf, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(
            leaf.shape[1:], leaf.dtype, sharding=_sharding(leaf, lambda s: tuple(s)[1:])
        )
    return leaf[index]


def _sharding(shape: jax.ShapeDtypeStruct, respec: Callable):
    """The sharding of a shape with a layers axis added or taken away (never split)."""
    sharding = shape.sharding
    if not isinstance(sharding, NamedSharding):
        return sharding
    spec = tuple(sharding.spec) + (None,) * (len(shape.shape) - len(sharding.spec))
    return NamedSharding(sharding.mesh, PartitionSpec(*respec(spec)))

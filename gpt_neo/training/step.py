"""One training step: the loss of a batch (cross-entropy, z-loss, MoE's auxiliary losses), its
gradients accumulated over microbatches, and the optimizer update. Pure functions of the config,
traced under the run's mesh (`jax.set_mesh`), which says how a batch's rows are spread.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P

from gpt_neo import axes
from gpt_neo.config import Config
from gpt_neo.data.batch import Batch
from gpt_neo.mesh import activation_spec, batch_axes, split_size
from gpt_neo.models.gpt import head_inputs, trunk
from gpt_neo.models.loss import head_loss
from gpt_neo.models.stack import BLOCKS, STACKS, per_layer_blocks
from gpt_neo.training.memory import gathers_weights
from gpt_neo.training.objectives import MASKING_STREAM, Example, make_example
from gpt_neo.training.optim import learning_rate


def loss_fn(cfg: Config, params, batch, rng, target_count=None, *, train=True, share=1.0):
    """Cross-entropy of `batch` (records [batch, n_ctx + 1], or an `Example` made from them:
    see `gpt_neo.training.objectives`) plus GPT-Neo's z-loss (z_loss * logsumexp(logits)^2), summed
    over the counted targets and divided by `target_count` (default: how many targets the
    batch counts, which makes it the mean; a microbatch passes its whole batch's count, so
    that microbatch losses add up to the batch's).
    MoE layers add their load-balancing loss (and router z-loss) times `share`, the batch's
    fraction that `tokens` is (1 / microbatches: Mesh-TensorFlow divides it there, once).
    Returns (total, metrics): `loss` (cross-entropy), `z_loss`, for a masked LM `accuracy`
    (of the argmax at the masked positions), and with MoE layers `moe_loss`,
    `router_z_loss` and per layer `moe/<i>/aux_loss`, `moe/<i>/dropped`,
    `moe/<i>/load/<expert>`, all already weighted by `share`."""
    example = batch if isinstance(batch, Example) else make_example(cfg, batch)
    x, _, moe_stats = trunk(
        cfg, params, example.inputs, rng=rng, train=train, segment_ids=example.segments
    )
    if target_count is None:
        target_count = jnp.maximum(example.weights.sum(), 1.0)
    terms = head_loss(
        cfg, *head_inputs(cfg, params, x), example.targets, example.weights, target_count
    )
    metrics = {"loss": terms.cross_entropy, "z_loss": terms.z_loss}
    if cfg.mlm_training:
        metrics["accuracy"] = terms.correct
    if not moe_stats:
        return terms.total, metrics
    hp = cfg.moe
    balance = hp.moe_loss_coef * share * sum(s.aux_loss for s in moe_stats.values())
    router_z = hp.moe_router_z_loss * share * sum(s.router_z_loss for s in moe_stats.values())
    metrics |= {"moe_loss": balance, "router_z_loss": router_z}
    for layer, stats in moe_stats.items():
        metrics[f"moe/{layer}/aux_loss"] = share * stats.aux_loss
        metrics[f"moe/{layer}/dropped"] = share * stats.dropped
        metrics |= {f"moe/{layer}/load/{e}": share * v for e, v in enumerate(stats.load)}
    return terms.total + balance + router_z, metrics


def uses_randomness(cfg: Config) -> bool:
    """Whether a training step draws random numbers (dropout, random MoE routing)."""
    if max(cfg.embed_dropout, cfg.attn_dropout, cfg.res_dropout) > 0:
        return True
    if not cfg.moe_layers:
        return False
    hp = cfg.moe
    if hp.moe_gating == "top_2":
        return hp.moe_second_policy_train == "random" or hp.moe_dropout_rate > 0
    if hp.moe_gating == "rand_1":
        return hp.moe_rand_1_policy_train != "argmax" or hp.moe_dropout_rate > 0
    return hp.moe_dropout_rate > 0


def context_data_parallel(cfg: Config) -> int:
    """How many data-parallel pieces a batch is split into under the mesh being traced
    against (1 outside any)."""
    mesh = jax.sharding.get_abstract_mesh()
    return 1 if mesh.empty else split_size(dict(mesh.shape), batch_axes(cfg))


def split_microbatches(batch: jax.Array, n_micro: int, data_parallel: int) -> jax.Array:
    """[B, T] -> [n_micro, B / n_micro, T] so that every microbatch takes an equal share of
    each data-parallel replica's rows (the rows stay on their devices)."""
    b, t = batch.shape
    rows = b // (data_parallel * n_micro)
    return (
        batch.reshape(data_parallel, n_micro, rows, t)
        .swapaxes(0, 1)
        .reshape(n_micro, b // n_micro, t)
    )


def gradients(cfg: Config, params, batch, step_rng, n_micro: int = 1):
    """(grads, metrics) of the mean loss over batch [B, n_ctx + 1], accumulated over
    `n_micro` microbatches (a lax.scan) when the batch does not fit at once; the metrics are
    `loss_fn`'s, for the whole batch. A masked LM masks the whole batch first (so that the
    microbatches share one count of masked positions). Each microbatch takes an equal share of
    every data-parallel replica's rows, as the mesh in context spreads them."""
    grad_fn = jax.value_and_grad(functools.partial(loss_fn, cfg), has_aux=True)
    masking_rng = None if step_rng is None else jax.random.fold_in(step_rng, MASKING_STREAM)
    example = make_example(cfg, batch, masking_rng)
    target_count = jnp.maximum(example.weights.sum(), 1.0)

    def grads_of(params, example, index):
        rng = None
        if uses_randomness(cfg):
            assert step_rng is not None  # a training step: train_step passes one
            rng = jax.random.fold_in(step_rng, index)
        (_, metrics), grads = grad_fn(params, example, rng, target_count, share=1.0 / n_micro)
        return grads, metrics

    if n_micro == 1:
        return grads_of(params, example, 0)
    data_parallel = context_data_parallel(cfg)
    batch_spec = activation_spec(cfg, (axes.BATCH, None))
    micro = jax.tree.map(  # every field of the example: inputs, targets, weights, segments
        lambda a: jax.lax.with_sharding_constraint(
            split_microbatches(a, n_micro, data_parallel), P(None, *batch_spec)
        ),
        example,
    )

    # With FSDP, XLA overlaps the microbatches' weight gathers and passes so much that 1.3B
    # on v5e:2x2 needs 8.1 GiB of temporaries for 2 microbatches against 4.1 for one. Making
    # each microbatch's weights and tokens wait for the running sum keeps the microbatches in
    # sequence (6.6 GiB; 125M: 1.29 -> 1.19). Not without FSDP: there the barrier costs a
    # copy of the sum (125M data parallel: 1.87 -> 2.24 GiB).
    in_sequence = gathers_weights(cfg)

    def accumulate(total, xs):
        index, example = xs
        looped_params = params
        if in_sequence:
            total, looped_params, example = jax.lax.optimization_barrier((total, params, example))
        return jax.tree.map(jnp.add, total, grads_of(looped_params, example, index)), None

    metric_shapes = jax.eval_shape(grads_of, params, jax.tree.map(lambda a: a[0], micro), 0)[1]
    zero_metrics = jax.tree.map(lambda m: jnp.zeros(m.shape, m.dtype), metric_shapes)
    zero = (jax.tree.map(jnp.zeros_like, params), zero_metrics)
    total, _ = jax.lax.scan(accumulate, zero, (jnp.arange(n_micro), micro))
    return total  # every microbatch's terms were already divided by the whole batch's size


def gradient_norms(cfg: Config, grads) -> dict[str, jax.Array]:
    """`log_grads`: the norm of each layer's gradient and of the embeddings' and ln_f's, as
    `grad_norm/blocks/3`, `grad_norm/wte`, ...; their squares add up to the global norm's.
    Stacked layers are named by layer too (slices of a stack, read in place)."""
    parts = {name: g for name, g in grads.items() if name not in (BLOCKS, STACKS)}
    parts |= {f"blocks/{i}": g for i, g in enumerate(per_layer_blocks(cfg, grads))}
    return {f"grad_norm/{name}": optax.tree.norm(g) for name, g in parts.items()}


def packing_metrics(batch) -> dict[str, jax.Array]:
    """For packed batches: `padding`, the share of input tokens that are padding, and
    `segments_per_row`, the mean number of documents (pieces) per row."""
    if not isinstance(batch, Batch) or batch.segments is None:
        return {}
    inputs = batch.segments[:, :-1]
    return {
        "padding": jnp.mean((inputs == 0).astype(jnp.float32)),
        "segments_per_row": jnp.mean(jnp.max(inputs, axis=1).astype(jnp.float32)),
    }


def train_step(cfg: Config, optimizer, n_micro: int, state, batch):
    """One optimizer step on a global batch (a `Batch`, or records [B, n_ctx + 1]) in
    `n_micro` microbatches; returns (state, metrics)."""
    params = state["params"]
    step_rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
    grads, loss_metrics = gradients(cfg, params, batch, step_rng, n_micro)
    updates, opt_state = optimizer.update(grads, state["opt_state"], params)
    new_state = {
        "params": optax.apply_updates(params, updates),
        "opt_state": opt_state,
        "step": state["step"] + 1,
        "rng": state["rng"],
    }
    metrics = {
        **loss_metrics,
        **packing_metrics(batch),
        "grad_norm": optax.tree.norm(grads),
        "lr": learning_rate(cfg, state["step"]),
    }
    if cfg.log_grads:
        metrics |= gradient_norms(cfg, grads)
    return new_state, metrics

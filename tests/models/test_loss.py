"""The fused, chunked output-head loss against plain autodiff through full float32 logits."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpt_neo.mesh import make_mesh
from gpt_neo.models.gpt import forward, init_params
from gpt_neo.models.loss import head_loss, loss_chunks
from gpt_neo.training.step import loss_fn
from tests.support.helpers import perturbed_params, random_tokens, tiny_config


def reference_terms(cfg, x, weights, bias, targets, target_weights, count):
    """The loss the way it was written before fusing: full logits, autodiff does the rest."""
    logits = jnp.einsum("bte,ve->btv", x, weights, preferred_element_type=jnp.float32)
    if bias is not None:
        logits = logits + bias.astype(jnp.float32)
    real = jnp.arange(logits.shape[-1]) < cfg.n_vocab
    logits = jnp.where(real, logits, jnp.finfo(jnp.float32).min)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    cross_entropy = jnp.sum((log_z - target) * target_weights) / count
    z_loss = cfg.z_loss * jnp.sum(jnp.square(log_z) * target_weights) / count
    correct = jnp.sum((jnp.argmax(logits, -1) == targets) * target_weights) / count
    return cross_entropy + z_loss, (cross_entropy, z_loss, correct)


def inputs(dtype, *, vocab=96, n_vocab=90, bias=False, seed=0):
    keys = jax.random.split(jax.random.key(seed), 5)
    b, t, e = 2, 16, 24
    x = jax.random.normal(keys[0], (b, t, e)).astype(dtype)
    weights = (0.3 * jax.random.normal(keys[1], (vocab, e))).astype(dtype)
    bias_value = (0.1 * jax.random.normal(keys[2], (vocab,))).astype(dtype) if bias else None
    targets = jax.random.randint(keys[3], (b, t), 0, n_vocab)
    target_weights = (jax.random.uniform(keys[4], (b, t)) > 0.2).astype(jnp.float32)
    return x, weights, bias_value, targets, target_weights


@pytest.mark.parametrize("chunks", [None, 1, 4, 16])  # None: small logits, plain autodiff
@pytest.mark.parametrize(
    "dtype,bias,tolerance",
    [(jnp.float32, False, 2e-6), (jnp.float32, True, 2e-6), (jnp.bfloat16, False, 2e-2)],
)
def test_fused_loss_and_gradients_equal_autodiff_through_full_logits(
    chunks, dtype, bias, tolerance
):
    # a masked LM's config: the only objective whose accuracy (argmax == target) is counted
    cfg = tiny_config(n_vocab=90, z_loss=1e-3, mlm_training=True, mlm_mask_id=1)
    x, weights, bias_value, targets, target_weights = inputs(dtype, bias=bias)
    count = target_weights.sum()
    diff = (0, 1, 2) if bias else (0, 1)

    def fused(x, weights, bias_value):
        terms = head_loss(
            cfg, x, weights, bias_value, targets, target_weights, count, chunks=chunks
        )
        return terms.total, terms[1:]

    def reference(x, weights, bias_value):
        return reference_terms(cfg, x, weights, bias_value, targets, target_weights, count)

    (total, parts), grads = jax.value_and_grad(fused, diff, has_aux=True)(x, weights, bias_value)
    (ref_total, ref_parts), ref_grads = jax.value_and_grad(reference, diff, has_aux=True)(
        x, weights, bias_value
    )
    np.testing.assert_allclose(total, ref_total, rtol=1e-6)
    np.testing.assert_allclose(np.array(parts), np.array(ref_parts), rtol=1e-6, atol=1e-9)
    assert float(parts[1]) > 0 and 0 <= float(parts[2]) <= 1  # z-loss counted, accuracy a share
    for got, want in zip(grads, ref_grads, strict=True):
        assert got.dtype == want.dtype
        scale = float(jnp.abs(want.astype(jnp.float32)).max())
        np.testing.assert_allclose(
            np.asarray(got, np.float32), np.asarray(want, np.float32), atol=tolerance * scale
        )
    # padding rows past n_vocab get no gradient, as their logits are masked
    assert float(jnp.abs(grads[1][cfg.n_vocab :].astype(jnp.float32)).max()) == 0.0


@pytest.mark.slow
def test_loss_fn_equals_the_cross_entropy_of_the_models_logits_with_gradients():
    """Whole model: `loss_fn` (fused head) against log-softmax of `forward`'s logits."""
    cfg = tiny_config(z_loss=0.0)
    params = perturbed_params(cfg)
    tokens = jnp.asarray(random_tokens(cfg, batch=4, length=cfg.n_ctx + 1))

    def plain(params):
        logits = forward(cfg, params, tokens[:, :-1]).logits[..., : cfg.n_vocab]
        logp = jax.nn.log_softmax(logits)
        return -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1).mean()

    (loss, metrics), grads = jax.value_and_grad(
        lambda p: loss_fn(cfg, p, tokens, None), has_aux=True
    )(params)
    ref_loss, ref_grads = jax.value_and_grad(plain)(params)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    np.testing.assert_allclose(metrics["loss"], ref_loss, rtol=1e-6)
    for path, got in jax.tree_util.tree_leaves_with_path(grads):
        want = ref_grads
        for key in path:
            want = want[key.key if hasattr(key, "key") else key.idx]
        np.testing.assert_allclose(got, want, atol=1e-6, err_msg=jax.tree_util.keystr(path))


def test_chunks_bound_the_per_device_logits():
    cfg = tiny_config(n_vocab=50304, mesh_shape="x:4,y:2", layout="batch:x,vocab:y")
    # no mesh in scope: 32 x 2048 x 50304 x 4 B = 12.3 GiB on one device -> at least 50
    # chunks of 256 MiB; 64 is the first count that divides 2048
    assert loss_chunks(cfg, 32, 2048, 50304) == 64
    with jax.set_mesh(make_mesh(cfg)):
        # per device 8 x 2048 x 25152 x 4 B = 1.54 GiB: 7 chunks of 256 MiB, 8 divides 2048
        assert loss_chunks(cfg, 32, 2048, 50304) == 8
    assert loss_chunks(cfg, 1, 64, 512) == 1


@pytest.mark.slow
def test_sharded_training_loss_matches_one_device_with_several_chunks(monkeypatch):
    """Vocabulary split over a mesh axis, batch over another, the sequence in 4 chunks."""
    import gpt_neo.models.loss as loss_module

    cfg = tiny_config(mesh_shape="x:4,y:2", layout="batch:x,vocab:y", z_loss=1e-4)
    tokens = jnp.asarray(random_tokens(cfg, batch=8, length=cfg.n_ctx + 1))
    single = perturbed_params(cfg)
    want, want_grads = jax.value_and_grad(lambda p: loss_fn(cfg, p, tokens, None)[0])(single)
    per_chunk = 8 // 4 * cfg.n_ctx // 4 * cfg.n_vocab // 2 * 4  # a quarter of the sequence
    monkeypatch.setattr(loss_module, "CHUNK_BYTES", per_chunk)
    mesh = make_mesh(cfg)
    params = jax.device_put(single, jax.tree.map(lambda a: a.sharding, init_params(cfg, 0, mesh)))
    with jax.set_mesh(mesh):
        assert loss_chunks(cfg, 8, cfg.n_ctx, cfg.n_vocab) == 4
        got, got_grads = jax.jit(jax.value_and_grad(lambda p, t: loss_fn(cfg, p, t, None)[0]))(
            params, tokens
        )
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads), strict=True):
        np.testing.assert_allclose(a, b, atol=2e-6)


def test_under_a_sequence_split_each_device_computes_only_its_own_positions_logits():
    """Context parallelism: the sequence of x is split 8 ways and the loss runs in 4 chunks.
    Every chunk takes its share of every device's positions, so no device is sent another's
    hidden states (contiguous chunks would each lie on 2 devices, and the scan would gather
    each to all 8: 8x the logits' FLOPs). The gradient of x keeps x's layout, and the terms
    and gradients equal full-logit autodiff."""
    cfg = tiny_config(mesh_shape="x:8", layout="sequence:x")
    x, weights, _, targets, target_weights = inputs(jnp.float32)
    x = jnp.tile(x, (1, 4, 1))  # 64 positions: 8 per device, chunks of 16 (2 per device)
    targets, target_weights = (jnp.tile(a, (1, 4)) for a in (targets, target_weights))
    count = jnp.sum(target_weights)
    mesh = make_mesh(cfg)
    split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "x"))
    x_split, t_split, w_split = (jax.device_put(a, split) for a in (x, targets, target_weights))

    def total(x, weights, targets, target_weights):
        terms = head_loss(cfg, x, weights, None, targets, target_weights, count, chunks=4)
        return terms.total

    grad = jax.jit(jax.value_and_grad(total, argnums=(0, 1)))
    with jax.set_mesh(mesh):
        program = grad.lower(x_split, weights, t_split, w_split).compile()
        value, (dx, dw) = program(x_split, weights, t_split, w_split)
    text = program.as_text()
    sent = re.findall(r"(all-gather|all-to-all|collective-permute)(-start)?\(", text)
    assert not sent, f"hidden states sent between devices: {sorted({s[0] for s in sent})}"
    assert dx.sharding.spec[1] == "x"
    want, (want_dx, want_dw) = jax.value_and_grad(
        lambda x, w: reference_terms(cfg, x, w, None, targets, target_weights, count)[0],
        argnums=(0, 1),
    )(x, weights)
    np.testing.assert_allclose(value, want, rtol=1e-5)
    np.testing.assert_allclose(dx, want_dx, atol=1e-6)
    np.testing.assert_allclose(dw, want_dw, atol=1e-6)

"""Sharded runs on 8 simulated devices equal the single-device run.

Every layout below splits a different set of dimensions (batch, heads, vocab,
intermediate_expanded, embd, memory_length, sequence); the model has every layer kind.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import gpt_neo
from gpt_neo import axes
from gpt_neo.mesh import activation_spec
from gpt_neo.models.gpt import forward
from tests.support.helpers import random_tokens, tiny_config

# (mesh_shape, layout, expected spec of an attention q kernel [embd, heads, kv], of wte [vocab, embd])
LAYOUTS = [
    ("x:8", "batch:x", P(None, None, None), P(None, None)),
    ("x:8", "heads:x,intermediate_expanded:x,vocab:x", P(None, "x", None), P("x", None)),
    (
        "x:4,y:2",
        "batch:x,heads:y,vocab:y,intermediate_expanded:y",
        P(None, "y", None),
        P("y", None),
    ),
    ("x:4,y:2", "batch:x,memory_length:y,embd:y", P("y", None, None), P(None, "y")),
    ("x:2,y:4", "embd:x,heads:y,vocab:y,intermediate_expanded:y", P("x", "y", None), P("y", "x")),
    ("x:2,y:4", "batch:x,embd:y", P("y", None, None), P(None, "y")),
    ("x:2,y:4", "batch:y,sequence:x", P(None, None, None), P(None, None)),
]
SEED = 7


def loss(cfg, params, tokens):
    logits = forward(cfg, params, tokens).logits
    logp = jax.nn.log_softmax(logits[:, :-1])
    return -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1).mean()


def same_sharding(array, sharding):
    return array.sharding.is_equivalent_to(sharding, array.ndim)


@pytest.fixture(scope="module")
def single_device():
    cfg = tiny_config(train_batch_size=8)
    params = gpt_neo.init_params(cfg, SEED)
    tokens = jnp.asarray(random_tokens(cfg, batch=8))
    logits = gpt_neo.apply(cfg, params, tokens)
    grads = jax.jit(jax.grad(lambda p, t: loss(cfg, p, t)))(params, tokens)
    return params, tokens, logits, grads


@pytest.mark.slow
@pytest.mark.parametrize(("mesh_shape", "layout", "q_spec", "wte_spec"), LAYOUTS)
def test_sharded_model_equals_single_device(single_device, mesh_shape, layout, q_spec, wte_spec):
    ref_params, tokens, ref_logits, ref_grads = single_device
    cfg = tiny_config(train_batch_size=8, mesh_shape=mesh_shape, layout=layout)
    mesh = gpt_neo.make_mesh(cfg)
    params = gpt_neo.init_params(cfg, SEED, mesh=mesh)

    # created already sharded, as the layout says
    assert same_sharding(params["blocks"][0]["attn"]["q"], NamedSharding(mesh, q_spec))
    assert same_sharding(params["wte"], NamedSharding(mesh, wte_spec))
    for leaf in jax.tree.leaves(params):
        assert isinstance(leaf.sharding, NamedSharding) and leaf.sharding.mesh == mesh
    q = params["blocks"][0]["attn"]["q"]
    per_device = [s // (mesh.shape[a] if a else 1) for s, a in zip(q.shape, q_spec, strict=True)]
    assert all(list(s.data.shape) == per_device for s in q.addressable_shards)

    # the same seed gives the same values on every mesh
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    logits = gpt_neo.apply(cfg, params, tokens)
    np.testing.assert_allclose(logits, ref_logits, atol=1e-5)
    assert same_sharding(logits, NamedSharding(mesh, activation_spec(cfg, axes.LOGITS)))

    with jax.set_mesh(mesh):
        sharded_tokens = jax.device_put(
            tokens, NamedSharding(mesh, activation_spec(cfg, axes.TOKENS))
        )
        grads = jax.jit(jax.grad(lambda p, t: loss(cfg, p, t)))(params, sharded_tokens)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4)


def test_splash_kernel_under_shard_map_equals_xla_kernel():
    # shard_map over batch and heads; on CPU the Pallas kernel runs in interpret mode
    base = dict(
        n_ctx=128, attention_types=["global", "local", "global", "local"], local_attention_radius=32
    )
    cfg = tiny_config(mesh_shape="x:4,y:2", layout="batch:x,heads:y", **base)
    mesh = gpt_neo.make_mesh(cfg)
    params = gpt_neo.init_params(cfg, 0, mesh=mesh)
    tokens = random_tokens(cfg, batch=4)
    splash = gpt_neo.apply(cfg.replace(attention_kernel="splash"), params, tokens)
    np.testing.assert_allclose(splash, gpt_neo.apply(cfg, params, tokens), atol=2e-5)

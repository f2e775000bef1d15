"""Attention kernels against a loop-based NumPy reference, and their cost and memory shape."""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from gpt_neo.errors import ConfigError
from gpt_neo.models import attention as attn
from tests.oracles import reference
from tests.support.helpers import tiny_config


def qkv(t, h=2, d=16, batch=2, seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    return [jax.random.normal(k, (batch, t, h, d), jnp.float32) for k in keys]


def numpy_softmax_attention(q, k, v, window=None, scale=1.0):
    return np.stack(
        [
            reference.softmax_attention(*map(np.float64, x), window, scale)
            for x in zip(q, k, v, strict=True)
        ]
    )


@pytest.mark.parametrize("window", [None, 1, 5, 8])
def test_dense_attention_matches_reference(window):
    q, k, v = qkv(21)
    expected = numpy_softmax_attention(q, k, v, window)
    np.testing.assert_allclose(attn.dense_attention(q, k, v, window=window), expected, atol=1e-5)


def grouped_qkv(t, heads, kv_heads, d=16, batch=2, seed=0):
    """Queries of `heads` heads; keys and values of `kv_heads` heads."""
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(kq, (batch, t, heads, d), jnp.float32)
    k, v = (jax.random.normal(key, (batch, t, kv_heads, d), jnp.float32) for key in (kk, kv))
    return q, k, v


def repeated(a, heads):
    """Hugging Face's `repeat_kv` in NumPy: each key/value head repeated for its group."""
    return np.repeat(np.asarray(a), heads // a.shape[2], axis=2)


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
@pytest.mark.parametrize("query_blocks", [1, 4, 5])
@pytest.mark.parametrize("window", [None, 5])
def test_dense_attention_groups_queries_and_blocks_them(kv_heads, query_blocks, window):
    # 21 positions in 4 or 5 query blocks: uneven blocks, the last one short
    q, k, v = grouped_qkv(21, 4, kv_heads)
    expected = numpy_softmax_attention(q, repeated(k, 4), repeated(v, 4), window, scale=0.3)
    out = attn.dense_attention(q, k, v, window=window, query_blocks=query_blocks, scale=0.3)
    np.testing.assert_allclose(out, expected, atol=1e-5)


@pytest.mark.slow
def test_query_blocks_give_the_gradients_of_one_block():
    q, k, v = grouped_qkv(33, 4, 2)
    cotangent = jax.random.normal(jax.random.key(9), q.shape)

    def grads(blocks):
        def loss(q, k, v):
            return jnp.vdot(attn.dense_attention(q, k, v, query_blocks=blocks), cotangent)

        return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    for got, want in zip(grads(4), grads(1), strict=True):
        np.testing.assert_allclose(got, want, atol=2e-5)


def test_query_blocks_are_at_most_four_of_at_least_64_queries():
    assert [attn.query_blocks_for(t) for t in (32, 64, 128, 200, 256, 4096)] == [1, 1, 2, 3, 4, 4]


def test_query_blocks_skip_most_of_the_masked_half():
    def dense(blocks):
        return lambda q, k, v: attn.dense_attention(q, k, v, query_blocks=blocks)

    # 4 blocks score 1 + 2 + 3 + 4 of 16 key blocks: 5/8 of the square, plus softmax work
    ratio = _flops(dense(4), 1024) / _flops(dense(1), 1024)
    assert 0.55 < ratio < 0.7, ratio


@pytest.mark.parametrize("kv_heads", [4, 1])
def test_blocked_local_attention_reads_grouped_keys(kv_heads):
    q, k, v = grouped_qkv(37, 4, kv_heads)
    expected = numpy_softmax_attention(q, repeated(k, 4), repeated(v, 4), 8)
    out = attn.blocked_local_attention(q, k, v, window=8)
    np.testing.assert_allclose(out, expected, atol=1e-5)


@pytest.mark.parametrize(("t", "window"), [(64, 8), (61, 8), (37, 16), (9, 8), (30, 1)])
def test_blocked_local_attention_matches_reference(t, window):
    q, k, v = qkv(t)
    expected = numpy_softmax_attention(q, k, v, window)
    np.testing.assert_allclose(
        attn.blocked_local_attention(q, k, v, window=window), expected, atol=1e-5
    )


@pytest.mark.parametrize("t", [1, 50, 64, 130])
def test_causal_linear_attention_matches_gpt_neo_definition(t):
    q, k, v = qkv(t)
    expected = np.stack(
        [reference.causal_linear_attention(*map(np.float64, x)) for x in zip(q, k, v, strict=True)]
    )
    np.testing.assert_allclose(
        attn.causal_linear_attention(q, k, v), expected, rtol=1e-4, atol=1e-5
    )


def test_linear_attention_never_materialises_a_seq_by_d_by_d_tensor():
    t, d = 512, 16
    q, k, v = qkv(t, d=d)
    jaxpr = jax.make_jaxpr(attn.causal_linear_attention)(q, k, v)

    def shapes(jaxpr):
        for eqn in jaxpr.eqns:
            yield from (var.aval.shape for var in eqn.outvars)
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                yield from shapes(sub)

    biggest = max(np.prod(s) for s in shapes(jaxpr.jaxpr))
    assert biggest < 2 * t * d * d  # [b, t, h, d, d] would be 2 * 2 * 512 * 16 * 16 floats
    assert biggest <= q.size  # nothing larger than the inputs themselves


def _flops(fn, t):
    q, k, v = (jax.ShapeDtypeStruct((1, t, 4, 64), jnp.float32),) * 3
    return jax.jit(fn).lower(q, k, v).compile().cost_analysis()["flops"]


def test_local_attention_cost_grows_linearly_with_sequence_length():
    def local(q, k, v):
        return attn.blocked_local_attention(q, k, v, window=128)

    local_ratio = _flops(local, 8192) / _flops(local, 4096)
    global_ratio = _flops(attn.dense_attention, 8192) / _flops(attn.dense_attention, 4096)
    assert local_ratio > 1.8 and local_ratio < 2.3, local_ratio  # O(T * window)
    assert global_ratio > 3.5, global_ratio  # O(T^2), for contrast
    assert _flops(local, 8192) < _flops(attn.dense_attention, 8192) / 10


@pytest.mark.parametrize("window", [None, 7])
def test_dot_product_attention_call_matches_reference(window):
    # The cuDNN kernel's call, run with XLA's implementation: checks scale, causality, window.
    q, k, v = qkv(40)
    out = attn.dot_product_attention(q, k, v, window=window, implementation="xla")
    np.testing.assert_allclose(out, numpy_softmax_attention(q, k, v, window), atol=1e-5)


@pytest.mark.parametrize("window", [None, 64])
def test_splash_kernel_matches_reference_in_interpret_mode(window):
    cfg = tiny_config(n_ctx=128, attention_kernel="splash")
    q, k, v = qkv(128, d=64)
    out = attn.splash_attention(cfg, q, k, v, window=window, interpret=True)
    # head dim 64 gives scores of magnitude ~10: float32 reassociation allows a few 1e-5
    np.testing.assert_allclose(out, numpy_softmax_attention(q, k, v, window), atol=5e-5)


def test_auto_kernel_on_cpu_is_the_xla_reference():
    assert attn.resolve_kernel(tiny_config(), jnp.bfloat16, 128, False) == "xla"


def test_forced_kernels_refuse_what_they_cannot_do():
    cudnn, splash = tiny_config(attention_kernel="cudnn"), tiny_config(attention_kernel="splash")
    with pytest.raises(ConfigError, match="no attention dropout"):
        attn.resolve_kernel(cudnn, jnp.bfloat16, 128, True)
    with pytest.raises(ConfigError, match="needs precision bfloat16"):
        attn.resolve_kernel(cudnn, jnp.float32, 128, False)
    with pytest.raises(ConfigError, match="multiple of 128"):
        attn.resolve_kernel(splash, jnp.float32, 100, False)
    # a split sequence is refused with the layout, before anything is traced: cuDNN always,
    # splash where a half chunk (n_ctx / 16 here) is not whole 128-token tiles
    with pytest.raises(ConfigError, match="'cudnn' computes whole sequences only"):
        tiny_config(attention_kernel="cudnn", mesh_shape="x:8", layout="sequence:x")
    with pytest.raises(ConfigError, match="multiples of 128 tokens"):
        tiny_config(attention_kernel="splash", mesh_shape="x:8", layout="sequence:x")
    split = tiny_config(
        attention_kernel="splash", n_ctx=2048, mesh_shape="x:8", layout="sequence:x"
    )
    assert split.attention_kernel == "splash"
    assert attn.resolve_kernel(splash, jnp.float32, 128, False) == "splash"

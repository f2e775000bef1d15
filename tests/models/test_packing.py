"""Packed rows (segment ids): each document's logits are those it has alone, no gradient
crosses a document, and only the targets that count (same document, not padding, loss mask)
weigh in the loss. The references are independent: each document run alone through the model,
the NumPy attention oracles run segment by segment, and targets counted by hand."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gpt_neo
from gpt_neo.data.batch import Batch
from gpt_neo.models import attention as attn
from gpt_neo.models import moe
from gpt_neo.training.objectives import causal_example
from gpt_neo.training.step import loss_fn
from tests.oracles import reference
from tests.support.helpers import tiny_config

LENGTHS = (20, 13, 25)  # three documents and 6 padding tokens in a row of 64
N_CTX = 64

CONFIGS = {
    # the blocked local kernel (window 8 < 64) and memory slots every segment sees
    "global+local, memory slots": dict(
        attention_types=["global", "local"] * 2, num_mem_kv=2, local_attention_radius=8
    ),
    "linear": dict(attention_types=["linear", "global", "linear", "local"]),
    "rotary": dict(attention_types=["global", "local"] * 2, rotary_emb=True),
    "axial positions": dict(attention_types=["global", "local"] * 2, axial_pos_emb=[8, 8]),
    "moe, generous capacity": dict(
        attention_types=["global", "local"] * 2,
        moe_layers=[1, 3],
        moe_params={
            "moe_num_experts": 4,
            "moe_hidden_size": 32,
            "moe_capacity_factor_eval": 8.0,
            "moe_second_policy_eval": "all",
        },
    ),
    "scanned": dict(attention_types=["global", "local"] * 2, scan_layers=True),
}


def packed_row(lengths=LENGTHS, n_ctx=N_CTX, seed=0, vocab=128):
    """(tokens [1, n_ctx], segments [1, n_ctx], documents): documents back to back, padding
    (segment 0, token 0) after them."""
    rng = np.random.default_rng(seed)
    documents = [rng.integers(1, vocab, n).astype(np.int32) for n in lengths]
    tokens = np.zeros(n_ctx, np.int32)
    segments = np.zeros(n_ctx, np.int32)
    start = 0
    for index, doc in enumerate(documents, 1):
        tokens[start : start + doc.size] = doc
        segments[start : start + doc.size] = index
        start += doc.size
    return tokens[None], segments[None], documents


def spans(lengths=LENGTHS):
    starts = np.cumsum((0, *lengths))
    return [slice(int(a), int(b)) for a, b in itertools.pairwise(starts)]


@pytest.mark.parametrize("name", CONFIGS)
def test_each_packed_document_has_the_logits_it_has_alone(name):
    cfg = tiny_config(n_ctx=N_CTX, **CONFIGS[name])
    params = gpt_neo.init_params(cfg, 3)
    tokens, segments, documents = packed_row()
    packed = gpt_neo.apply(cfg, params, tokens, segment_ids=segments)
    for doc, where in zip(documents, spans(), strict=True):
        alone = gpt_neo.apply(cfg, params, doc[None])
        np.testing.assert_allclose(packed[0, where], alone[0], atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_packed_documents_on_a_sharded_mesh_equal_each_alone_on_one_device():
    # FSDP (parameters split over x) with batch on x and heads on y
    mesh_keys = dict(mesh_shape="x:2,y:4", layout="batch:x,heads:y", param_layout="embd:x")
    base = CONFIGS["global+local, memory slots"]
    single = tiny_config(n_ctx=N_CTX, **base)
    sharded = tiny_config(n_ctx=N_CTX, **base, **mesh_keys)
    params = gpt_neo.init_params(single, 5)
    sharded_params = gpt_neo.init_params(sharded, 5, mesh=gpt_neo.make_mesh(sharded))
    rows = [packed_row(seed=s) for s in (0, 1)]
    tokens = np.concatenate([r[0] for r in rows])
    segments = np.concatenate([r[1] for r in rows])
    packed = gpt_neo.apply(sharded, sharded_params, tokens, segment_ids=segments)
    for row, (_, _, documents) in enumerate(rows):
        for doc, where in zip(documents, spans(), strict=True):
            alone = gpt_neo.apply(single, params, doc[None])
            np.testing.assert_allclose(packed[row, where], alone[0], atol=1e-5, rtol=1e-5)


def _document_loss_grads(cfg, params, tokens, segments, document: int):
    """Gradients of the loss terms of one document's targets alone (its loss mask)."""
    row = np.concatenate([tokens, tokens[:, -1:]], axis=1)  # records are n_ctx + 1 long
    segs = np.concatenate([segments, np.zeros_like(segments[:, -1:])], axis=1)
    mask = (segs == document).astype(np.int32)
    batch = Batch(jnp.asarray(row), jnp.asarray(segs), jnp.asarray(mask))
    return _loss_grads(cfg)(params, batch)


def _loss_grads(cfg):
    """d loss / d params, the loss's sum divided by 1 (the terms themselves, not a mean)."""
    return jax.jit(jax.grad(lambda p, batch: loss_fn(cfg, p, batch, None, 1.0, train=False)[0]))


@pytest.mark.slow
def test_changing_one_document_leaves_another_documents_gradients_unchanged():
    cfg = tiny_config(n_ctx=N_CTX, **CONFIGS["linear"])
    params = gpt_neo.init_params(cfg, 1)
    tokens, segments, _ = packed_row()
    changed = tokens.copy()
    first = spans()[0]
    changed[0, first] = (changed[0, first] * 7 + 3) % cfg.n_vocab  # document 1's tokens
    before = _document_loss_grads(cfg, params, tokens, segments, document=2)
    after = _document_loss_grads(cfg, params, changed, segments, document=2)
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True):
        np.testing.assert_array_equal(a, b)  # bit for bit: nothing of A enters B
    # and document 1's own terms do change: the check above is not vacuous
    own_before = _document_loss_grads(cfg, params, tokens, segments, document=1)
    own_after = _document_loss_grads(cfg, params, changed, segments, document=1)
    assert not np.allclose(own_before["wte"], own_after["wte"])


def test_a_batch_whose_loss_mask_is_zero_has_zero_gradients():
    cfg = tiny_config(n_ctx=N_CTX, attention_types=["global", "local"] * 2)
    params = gpt_neo.init_params(cfg, 2)
    tokens = np.random.default_rng(0).integers(0, 128, (2, N_CTX + 1)).astype(np.int32)
    batch = Batch(jnp.asarray(tokens), None, jnp.zeros_like(tokens))
    grads = _loss_grads(cfg)(params, batch)
    assert all(not np.any(np.asarray(g)) for g in jax.tree.leaves(grads))


def test_targets_count_within_a_document_and_where_the_loss_mask_says():
    cfg = tiny_config(n_ctx=8)
    tokens = np.arange(10, 19, dtype=np.int32)[None]  # 9 = n_ctx + 1
    segments = np.array([[1, 1, 1, 2, 2, 2, 2, 0, 0]], np.int32)
    loss_mask = np.array([[0, 1, 1, 0, 0, 1, 1, 0, 0]], np.int32)
    example = causal_example(cfg, Batch(tokens, segments, loss_mask))
    # target j is token j + 1: it counts if it continues input j's document (not padding) and
    # its loss mask is 1. By hand: j=0,1 yes; j=2 starts document 2; j=3 mask 0; j=4,5 yes;
    # j=6,7 padding
    expected = [1, 1, 0, 0, 1, 1, 0, 0]
    np.testing.assert_array_equal(example.weights[0], expected)
    np.testing.assert_array_equal(example.segments[0], segments[0, :-1])


def _segmented(oracle, q, k, v, segments, **kw):
    """An oracle over one sequence at a time, run on each segment separately (padding too)."""
    out = np.zeros(q.shape, np.float64)
    for b in range(q.shape[0]):
        for s in np.unique(segments[b]):
            where = segments[b] == s
            out[b, where] = oracle(*(np.float64(a[b, where]) for a in (q, k, v)), **kw)
    return out


def _qkv(t, seed=0, d=16):
    keys = jax.random.split(jax.random.key(seed), 3)
    return [jax.random.normal(key, (2, t, 2, d), jnp.float32) for key in keys]


def _segments(t, lengths_per_row):
    rows = []
    for lengths in lengths_per_row:
        row = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)])
        rows.append(np.pad(row, (0, t - row.size)))  # padding: segment 0
    return np.stack(rows).astype(np.int32)


SEGMENT_ROWS = [(10, 3, 30, 1, 20), (70,)]  # many short documents; one long document


@pytest.mark.parametrize("window", [None, 8])
@pytest.mark.parametrize("query_blocks", [1, 3])
def test_softmax_kernels_stop_at_segment_boundaries(window, query_blocks):
    q, k, v = _qkv(80)
    segments = _segments(80, SEGMENT_ROWS)
    expected = _segmented(reference.softmax_attention, q, k, v, segments, window=window)
    dense = attn.dense_attention(
        q, k, v, window=window, segments=jnp.asarray(segments), query_blocks=query_blocks
    )
    np.testing.assert_allclose(dense, expected, atol=1e-5)
    if window is not None:
        blocked = attn.blocked_local_attention(
            q, k, v, window=window, segments=jnp.asarray(segments)
        )
        np.testing.assert_allclose(blocked, expected, atol=1e-5)


@pytest.mark.slow
def test_linear_attention_restarts_its_sums_at_segment_boundaries():
    # chunks of 16 over 80 tokens: documents start inside chunks and span chunk boundaries
    q, k, v = _qkv(80, seed=1)
    segments = _segments(80, SEGMENT_ROWS)
    expected = _segmented(reference.causal_linear_attention, q, k, v, segments)
    out = attn.causal_linear_attention(q, k, v, chunk=16, segments=jnp.asarray(segments))
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("window", [None, 32])
def test_splash_kernel_takes_segment_ids_in_interpret_mode(window):
    cfg = tiny_config(n_ctx=128, attention_kernel="splash")
    q, k, v = _qkv(128, d=64)
    segments = _segments(128, [(50, 7, 60), (128,)])
    out = attn.splash_attention(
        cfg, q, k, v, window=window, interpret=True, segments=jnp.asarray(segments)
    )
    expected = _segmented(reference.softmax_attention, q, k, v, segments, window=window)
    np.testing.assert_allclose(out, expected, atol=5e-5)


@pytest.mark.slow
def test_moe_routes_no_padding():
    cfg = tiny_config(
        n_ctx=16,
        moe_layers=[0],
        moe_params={
            "moe_num_experts": 4,
            "moe_hidden_size": 16,
            "moe_group_size": 32,
            "moe_capacity_factor_eval": 8.0,
            "moe_second_policy_eval": "all",
        },
    )
    p = gpt_neo.init_params(cfg, 0)["blocks"][0]["moe"]
    x = jax.random.normal(jax.random.key(0), (2, 16, cfg.n_embd))
    real = jnp.asarray(np.arange(16)[None, :] < np.array([[10], [16]]))  # 6 padding tokens
    y, stats = moe.moe_mlp(cfg, p, x, train=False, real=real)
    # the real tokens alone (one group of 26): the same outputs, load and balance loss
    flat = x.reshape(32, -1)[np.asarray(real).reshape(-1)]
    y_real, stats_real = moe.moe_mlp(cfg, p, flat[None], train=False)
    np.testing.assert_array_equal(np.asarray(y)[~np.asarray(real)], 0.0)
    np.testing.assert_allclose(np.asarray(y)[np.asarray(real)], y_real[0], atol=1e-6)
    np.testing.assert_allclose(stats.load, stats_real.load, atol=1e-6)
    np.testing.assert_allclose(stats.aux_loss, stats_real.aux_loss, rtol=1e-6)

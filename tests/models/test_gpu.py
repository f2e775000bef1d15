"""On a GPU only (marker `gpu`; bench/gpu_check.sh runs these on a lent GPU machine, and the
suite skips them elsewhere): cuDNN flash attention against XLA's attention on the same inputs,
bfloat16 training steps against float32 ones, and KV-cache decoding against the full forward
pass. Nothing here imports TensorFlow: batches are made in NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gpt_neo
from gpt_neo.config import from_dict
from gpt_neo.models import attention
from gpt_neo.models.gpt import forward, init_params
from gpt_neo.training.trainer import Trainer

pytestmark = pytest.mark.gpu

SHAPE = {
    "n_embd": 256,
    "n_head": 4,
    "n_layer": 4,
    "n_ctx": 512,
    "n_vocab": 1024,
    "attention_types": [[["global", "local"], 2]],
    "local_attention_radius": 128,
}


@pytest.mark.parametrize("window", [None, 128])
def test_cudnn_flash_attention_matches_xla_attention(window):
    keys = jax.random.split(jax.random.key(0), 3)
    q, k, v = (jax.random.normal(key, (2, 512, 4, 64), jnp.bfloat16) for key in keys)
    q = q * 0.125  # GPT-Neo folds the 1/sqrt(d) scale into q
    flash = jax.jit(
        lambda q, k, v: attention.dot_product_attention(
            q, k, v, window=window, implementation="cudnn"
        )
    )
    plain = jax.jit(
        lambda q, k, v: attention.dense_attention(
            q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), window=window
        )
    )
    np.testing.assert_allclose(
        np.asarray(flash(q, k, v), np.float32), np.asarray(plain(q, k, v)), atol=2e-2, rtol=2e-2
    )
    # the model's own choice on this machine is the fused kernel
    cfg = from_dict({**SHAPE, "precision": "bfloat16"})
    assert attention.resolve_kernel(cfg, jnp.bfloat16, 512, has_dropout=False) == "cudnn"


@pytest.mark.parametrize("window", [None, 128])
def test_cudnn_flash_attention_honours_segment_ids(window):
    keys = jax.random.split(jax.random.key(1), 3)
    q, k, v = (jax.random.normal(key, (2, 512, 4, 64), jnp.bfloat16) for key in keys)
    q = q * 0.125
    lengths = [(100, 37, 300, 75), (512,)]  # packed documents; the second row one document
    segments = np.zeros((2, 512), np.int32)
    for row, sizes in enumerate(lengths):
        segments[row] = np.repeat(np.arange(1, len(sizes) + 1), sizes)
    segments = jnp.asarray(segments)
    flash = jax.jit(
        lambda q, k, v, s: attention.dot_product_attention(
            q, k, v, window=window, implementation="cudnn", segments=s
        )
    )
    plain = jax.jit(
        lambda q, k, v, s: attention.dense_attention(
            *(a.astype(jnp.float32) for a in (q, k, v)), window=window, segments=s
        )
    )
    np.testing.assert_allclose(
        np.asarray(flash(q, k, v, segments), np.float32),
        np.asarray(plain(q, k, v, segments)),
        atol=2e-2,
        rtol=2e-2,
    )


def test_a_grouped_query_llama_style_model_on_cudnn_matches_xla():
    """Llama/Qwen-style attention (2 key/value heads for 4 query heads, scores scaled by
    1/sqrt(head_dim), QK-norm) through cuDNN flash attention, against the XLA kernel."""
    keys = {
        **SHAPE,
        "precision": "bfloat16",
        "rotary_emb": True,
        "n_kv_head": 2,
        "norm": "rmsnorm",
        "bias": False,
        "qk_norm": True,
        "scale_attn_weights": True,
    }
    fused, plain = from_dict(keys), from_dict({**keys, "attention_kernel": "xla"})
    params = init_params(fused, 2)
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, 1024, (2, 512)), jnp.int32)
    assert attention.resolve_kernel(fused, jnp.bfloat16, 512, has_dropout=False) == "cudnn"
    ours = forward(fused, params, tokens).logits
    np.testing.assert_allclose(ours, forward(plain, params, tokens).logits, atol=5e-2, rtol=5e-2)


def losses(cfg, steps: int = 8) -> list[float]:
    trainer = Trainer(cfg, gpt_neo.make_mesh(cfg, devices=jax.devices()[:1]))
    state = trainer.init_state(0)
    tokens = np.random.default_rng(0).integers(0, cfg.n_vocab, (8, cfg.n_ctx + 1), np.int32)
    out = []
    with jax.set_mesh(trainer.mesh):
        batch = trainer.place(tokens)
        for _ in range(steps):
            state, metrics = trainer.step(state, batch)
            out.append(float(metrics["loss"]))
    return out


def test_bfloat16_training_steps_follow_float32_ones():
    keys = {**SHAPE, "train_batch_size": 8, "lr": 1e-3, "mesh_shape": "x:1"}
    full = losses(from_dict(keys))
    half = losses(from_dict({**keys, "precision": "bfloat16"}))
    assert all(np.isfinite(half))
    assert half[-1] < half[0] - 0.5  # it learns the batch
    np.testing.assert_allclose(half, full, rtol=3e-2)


def test_kv_cache_decoding_matches_the_full_forward_pass():
    cfg = from_dict({**SHAPE, "precision": "bfloat16"})
    params = init_params(cfg, 1)
    prompt = [int(t) for t in np.random.default_rng(1).integers(0, cfg.n_vocab, 64)]
    new = gpt_neo.generate(cfg, params, [prompt], max_new_tokens=16, temperature=0.0)[0]
    # greedy: each new token is the argmax of the full pass over everything before it
    tokens = jnp.asarray([prompt + new])
    logits = forward(cfg, params, tokens).logits[0, len(prompt) - 1 : -1, : cfg.n_vocab]
    agree = np.mean(np.asarray(jnp.argmax(logits, -1)) == np.asarray(new))
    assert agree >= 0.9  # bfloat16 ties may break either way; a wrong cache breaks most

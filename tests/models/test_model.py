"""The GPT-Neo forward pass against an independent NumPy implementation, and its options."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gpt_neo
from gpt_neo.models.activations import ACTIVATION_PARAMS, ACTIVATIONS
from gpt_neo.models.gpt import forward, param_count
from tests.oracles import reference
from tests.support.helpers import perturbed_params, random_tokens, tiny_config


def test_forward_matches_numpy_reference_for_every_layer_kind():
    cfg = tiny_config()  # global, local (window 8 < 32), linear, none
    params = perturbed_params(cfg)
    tokens = random_tokens(cfg, batch=2)
    logits = gpt_neo.apply(cfg, params, tokens)
    assert logits.shape == (2, cfg.n_ctx, cfg.n_vocab) and logits.dtype == jnp.float32
    np.testing.assert_allclose(logits, reference.forward(cfg, params, tokens), atol=1e-4)


def test_shorter_sequences_use_the_first_positions():
    cfg = tiny_config()
    params = perturbed_params(cfg)
    tokens = random_tokens(cfg, batch=2, length=13)
    np.testing.assert_allclose(
        gpt_neo.apply(cfg, params, tokens), reference.forward(cfg, params, tokens), atol=1e-4
    )


def test_every_activation_has_an_independent_reference():
    assert set(ACTIVATIONS) == set(reference.ACTIVATIONS)


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_activation_matches_numpy(name):
    x = np.linspace(-4, 4, 101, dtype=np.float32).reshape(1, 101)
    params = {k: np.float32(v) for k, v in ACTIVATION_PARAMS.get(name, {}).items()}
    ours = ACTIVATIONS[name](jnp.asarray(x), params)
    expected = reference.activation(name, x.astype(np.float64), params)
    np.testing.assert_allclose(ours, expected, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("name", ["relu", "prelu", "softmax", "silu"])
def test_model_uses_the_configured_activation(name):
    cfg = tiny_config(activation_function=name)
    params = perturbed_params(cfg)
    tokens = random_tokens(cfg, batch=1)
    np.testing.assert_allclose(
        gpt_neo.apply(cfg, params, tokens), reference.forward(cfg, params, tokens), atol=1e-4
    )


def test_learnable_activation_scalars_are_parameters():
    params = gpt_neo.init_params(tiny_config(activation_function="prelu"), 0)
    assert float(params["blocks"][0]["mlp"]["act"]["alpha"]) == pytest.approx(0.2)


def test_none_layers_have_no_attention_parameters():
    params = gpt_neo.init_params(tiny_config(), 0)
    assert "attn" not in params["blocks"][3] and "ln_1" not in params["blocks"][3]
    assert set(params["blocks"][0]["attn"]) == {"q", "k", "v", "o", "o_bias"}


@pytest.mark.parametrize(("by_depth", "by_in"), [(False, False), (True, False), (True, True)])
def test_init_follows_gpt_neo_scales(by_depth, by_in):
    cfg = tiny_config(
        n_embd=256,
        n_head=4,
        n_layer=4,
        n_vocab=512,
        attention_types=["global"] * 4,
        scale_by_depth=by_depth,
        scale_by_in=by_in,
    )
    p = gpt_neo.init_params(cfg, seed=3)
    d, hd, m, layers = 256, 64, 1024, 4
    block = reference.layer_weights(cfg, p, 1)  # stacked: all four layers repeat
    expected = {
        "wte": (p["wte"], 0.02),
        "wpe": (p["wpe"], 0.01),
        "q": (block["attn"]["q"], d**-0.5 * hd**-0.5),
        "k": (block["attn"]["k"], d**-0.5),
        "o": (block["attn"]["o"], d**-0.5),
        "fc": (block["mlp"]["fc_kernel"], 0.02 / (d**0.5 if by_in else 1)),
        "proj": (
            block["mlp"]["proj_kernel"],
            0.02 / (layers**0.5 if by_depth else 1) / (m**0.5 if by_in else 1),
        ),
    }
    for name, (value, std) in expected.items():
        assert float(jnp.std(value)) == pytest.approx(std, rel=0.05), name
        assert abs(float(jnp.mean(value))) < 0.1 * std, name
    assert float(jnp.abs(block["mlp"]["fc_bias"]).max()) == 0.0
    assert np.all(np.asarray(block["ln_1"]["scale"]) == 1.0)


def test_same_seed_same_params_different_seed_different():
    cfg = tiny_config()
    a, b, c = (gpt_neo.init_params(cfg, s) for s in (5, 5, 6))
    assert all(jax.tree.leaves(jax.tree.map(lambda x, y: bool(jnp.all(x == y)), a, b)))
    assert not np.allclose(a["wte"], c["wte"])


def test_param_count_matches_the_initialised_tree():
    cfg = tiny_config(activation_function="aria")
    leaves = jax.tree.leaves(gpt_neo.init_params(cfg, 0))
    assert param_count(cfg) == sum(x.size for x in leaves)


def test_bfloat16_computes_in_bfloat16_with_float32_params_and_logits():
    cfg = tiny_config()
    params = perturbed_params(cfg)
    tokens = random_tokens(cfg, batch=2)
    f32 = gpt_neo.apply(cfg, params, tokens)
    bf16_cfg = cfg.replace(precision="bfloat16")
    bf16 = gpt_neo.apply(bf16_cfg, params, tokens)
    assert bf16.dtype == jnp.float32 and params["wte"].dtype == jnp.float32
    assert 0 < float(jnp.abs(bf16 - f32).max()) < 0.1  # rounded, but the same function
    jaxpr = str(jax.make_jaxpr(lambda p, t: forward(bf16_cfg, p, t).logits)(params, tokens))
    assert "bf16[2,32,64]" in jaxpr  # hidden activations really are bfloat16


def loss_fn(cfg, params, tokens, rng=None):
    logits = forward(cfg, params, tokens, rng=rng).logits
    logp = jax.nn.log_softmax(logits[:, :-1])
    return -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1).mean()


@pytest.mark.slow
def test_recompute_grad_gives_the_same_gradients():
    cfg = tiny_config()
    params = perturbed_params(cfg)
    tokens = jnp.asarray(random_tokens(cfg, batch=2))
    plain = jax.grad(lambda p: loss_fn(cfg, p, tokens))(params)
    remat_cfg = cfg.replace(recompute_grad=True)
    remat = jax.grad(lambda p: loss_fn(remat_cfg, p, tokens))(params)
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(remat), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)
    jaxpr = str(jax.make_jaxpr(jax.grad(lambda p: loss_fn(remat_cfg, p, tokens)))(params))
    assert "remat" in jaxpr or "checkpoint" in jaxpr


def test_dropout_applies_only_in_training_and_follows_the_rng():
    cfg = tiny_config(embed_dropout=0.1, attn_dropout=0.1, res_dropout=0.1)
    params = perturbed_params(cfg)
    tokens = random_tokens(cfg, batch=2)
    eval_logits = gpt_neo.apply(cfg, params, tokens)
    key = jax.random.key(0)
    train_a = gpt_neo.apply(cfg, params, tokens, train=True, rng=key)
    train_b = gpt_neo.apply(cfg, params, tokens, train=True, rng=key)
    train_c = gpt_neo.apply(cfg, params, tokens, train=True, rng=jax.random.key(1))
    np.testing.assert_array_equal(train_a, train_b)
    assert not np.allclose(train_a, eval_logits) and not np.allclose(train_a, train_c)
    no_dropout = cfg.replace(embed_dropout=0.0, attn_dropout=0.0, res_dropout=0.0)
    np.testing.assert_allclose(
        gpt_neo.apply(no_dropout, params, tokens, train=True, rng=key), eval_logits, atol=1e-6
    )
    with pytest.raises(ValueError, match="needs rng"):
        gpt_neo.apply(cfg, params, tokens, train=True)


def test_apply_inside_a_users_jit_gives_the_same_logits():
    cfg = tiny_config()
    params = perturbed_params(cfg)
    tokens = random_tokens(cfg, batch=2)
    inside = jax.jit(lambda p, t: gpt_neo.apply(cfg, p, t))(params, tokens)
    np.testing.assert_allclose(inside, gpt_neo.apply(cfg, params, tokens), atol=1e-6)


def test_sequence_longer_than_n_ctx_is_refused():
    cfg = tiny_config()
    with pytest.raises(ValueError, match="exceeds n_ctx"):
        gpt_neo.apply(cfg, gpt_neo.init_params(cfg, 0), random_tokens(cfg, 1, cfg.n_ctx + 1))


def test_the_config_accepts_exactly_the_implemented_activations():
    from gpt_neo.config import ACTIVATION_FUNCTIONS

    assert sorted(ACTIVATION_FUNCTIONS) == sorted(ACTIVATIONS)
    assert len(set(ACTIVATION_FUNCTIONS)) == len(ACTIVATION_FUNCTIONS)

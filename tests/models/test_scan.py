"""Scanned layer stacks (`scan_layers`): the same numbers as the Python loop they replace, in
the forward pass, the gradients, a training step (optimizer and weight decay included), MoE
statistics, dropout and decoding; parameters stored as the stacks the docs describe (read by
the NumPy oracle's own indexing); the choice of layout and its errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gpt_neo
from gpt_neo.config import REPO_ROOT, from_dict, load_config
from gpt_neo.errors import ConfigError
from gpt_neo.models.gpt import forward, init_params
from gpt_neo.models.stack import BLOCKS, STACKS, layer_stacks, per_layer
from gpt_neo.training.step import gradient_norms, gradients
from gpt_neo.training.trainer import Trainer
from tests.oracles import reference
from tests.support.helpers import random_tokens, tiny_config, train_steps

SMALL = {"n_embd": 64, "n_head": 4, "n_layer": 4, "n_ctx": 32, "n_vocab": 128}
MOE = {"moe_num_experts": 4, "moe_hidden_size": 32}


def the_125m_shape():
    """125M's blocks (and their init), 4 of them; a small vocabulary: the head is not scanned,
    and GPT-2's 50257 rows were most of this case's time."""
    cfg = load_config(str(REPO_ROOT / "configs" / "gpt_neo_125M.json"))
    return cfg.replace(
        n_layer=4, n_ctx=32, n_vocab=2048, attention_types=[[["global", "local"], 2]]
    )


CASES = {
    "125M shape, 4 layers": the_125m_shape,
    "global/local, dropout": lambda: from_dict(
        {
            **SMALL,
            "attention_types": [[["global", "local"], 2]],
            "local_attention_radius": 4,
            "embed_dropout": 0.1,
            "attn_dropout": 0.1,
            "res_dropout": 0.1,
        }
    ),
    "Llama-style (GQA, RMSNorm, SwiGLU, QK-norm)": lambda: from_dict(
        {
            **SMALL,
            "rotary_emb": True,
            "mlp_glu": True,
            "activation_function": "swiglu",
            "norm": "rmsnorm",
            "bias": False,
            "n_kv_head": 2,
            "qk_norm": True,
            "scale_attn_weights": True,
        }
    ),
    "MoE every other layer": lambda: from_dict({**SMALL, "moe_layers": [1, 3], "moe_params": MOE}),
}


def both(cfg):
    """(the looped config, the scanned one)."""
    scanned = cfg.replace(scan_layers=None)
    assert layer_stacks(scanned) is not None, "the default scans a pattern that repeats"
    return cfg.replace(scan_layers=False), scanned


def max_difference(a, b) -> float:
    """The largest difference of two trees' leaves, relative to each leaf's largest value."""
    return max(
        (
            float(jnp.max(jnp.abs(x - y)) / (jnp.max(jnp.abs(x)) + 1e-30))
            for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
        ),
        default=0.0,
    )


def loss(cfg, params, tokens, rng):
    logits = forward(cfg, params, tokens[:, :-1], rng=rng).logits[..., : cfg.n_vocab]
    targets = jax.nn.one_hot(tokens[:, 1:], cfg.n_vocab)
    return -jnp.mean(jnp.sum(jax.nn.log_softmax(logits) * targets, -1))


@pytest.mark.slow  # 8-30 s each on 2 cores
@pytest.mark.parametrize("case", sorted(CASES))
def test_scan_and_loop_give_the_same_logits_and_gradients(case):
    looped, scanned = both(CASES[case]())
    loop_params, scan_params = init_params(looped, 5), init_params(scanned, 5)
    # the same initial values, stored two ways
    assert STACKS in scan_params and BLOCKS not in scan_params
    assert max_difference(loop_params, per_layer(scanned, scan_params)) == 0.0
    tokens = jnp.asarray(random_tokens(looped, batch=2, length=looped.n_ctx + 1, seed=1))
    rng = jax.random.key(7) if looped.res_dropout else None

    loop_out = forward(looped, loop_params, tokens[:, :-1], rng=rng)
    scan_out = forward(scanned, scan_params, tokens[:, :-1], rng=rng)
    assert max_difference(loop_out.logits, scan_out.logits) < 1e-6
    assert sorted(loop_out.moe_stats) == sorted(scan_out.moe_stats) == list(looped.moe_layers)
    assert max_difference(loop_out.moe_stats, scan_out.moe_stats) < 1e-6

    loop_grads = jax.grad(loss, argnums=1)(looped, loop_params, tokens, rng)
    scan_grads = jax.grad(loss, argnums=1)(scanned, scan_params, tokens, rng)
    assert max_difference(loop_grads, per_layer(scanned, scan_grads)) < 1e-5


def test_stacks_hold_the_layers_as_documented_and_match_the_numpy_oracle():
    # layer i is row i // 2 of stack i % 2: the oracle indexes the stacks on its own
    cfg = from_dict({**SMALL, "attention_types": [[["global", "local"], 2]], "n_layer": 4})
    params = init_params(cfg, 2)
    assert [p["attn"]["q"].shape for p in params[STACKS]] == [(2, 64, 4, 16)] * 2
    looped = init_params(cfg.replace(scan_layers=False), 2)
    np.testing.assert_array_equal(
        params[STACKS][1]["mlp"]["fc_kernel"][1], looped[BLOCKS][3]["mlp"]["fc_kernel"]
    )
    tokens = random_tokens(cfg, batch=2, seed=3)
    expected = reference.forward(cfg, params, tokens)
    got = forward(cfg, params, jnp.asarray(tokens)).logits[..., : cfg.n_vocab]
    np.testing.assert_allclose(np.asarray(got), expected, atol=2e-4, rtol=2e-4)


@pytest.mark.slow
def test_fsdp_on_x2_y4_steps_and_differentiates_the_same_scanned_or_looped():
    cfg = tiny_config(
        attention_types=[[["global", "local"], 2]],
        mesh_shape="x:2,y:4",
        layout="batch:x,heads:y,intermediate_expanded:y",
        param_layout="embd:x",
        train_batch_size=8,
        lr=1e-2,
        weight_decay=0.1,
        # Adam with a small epsilon is sign-like where a gradient is near 0, turning float32
        # rounding into whole steps; a large one keeps updates proportional to the gradients
        epsilon=1.0,
    )
    looped, scanned = both(cfg)
    batches = [random_tokens(cfg, batch=8, length=cfg.n_ctx + 1, seed=s) for s in range(2)]
    # the first step's update (weight decay on stacked matrices, not on stacked biases), then
    # the gradients at the updated parameters
    results = []
    for c in (looped, scanned):
        mesh = gpt_neo.make_mesh(c)
        state = train_steps(c, mesh, batches[:1], seed=3)
        with jax.set_mesh(mesh):
            grads, _ = jax.jit(lambda p, b, c=c: gradients(c, p, b, None))(
                state["params"], Trainer(c, mesh).place(batches[1])
            )
        results.append(per_layer(c, jax.device_get((state, grads))))
        if c is scanned:  # stacks keep the layer's own split, the layers axis unsplit
            q = state["params"][STACKS][0]["attn"]["q"]
            assert q.sharding.spec[:3] == (None, "x", "y")
    (loop_state, loop_grads), (scan_state, scan_grads) = results
    assert max_difference(loop_grads, scan_grads) < 1e-5
    assert max_difference(loop_state["params"], scan_state["params"]) < 1e-5
    assert max_difference(loop_state["opt_state"], scan_state["opt_state"]) < 1e-5


@pytest.mark.slow
def test_log_grads_names_each_layer_of_a_stack():
    cfg = from_dict({**SMALL, "attention_types": [[["global", "local"], 2]], "log_grads": True})
    looped, scanned = both(cfg)
    tokens = jnp.asarray(random_tokens(cfg, batch=2, length=cfg.n_ctx + 1, seed=1))
    norms = []
    for c in (looped, scanned):
        grads, _ = gradients(c, init_params(c, 1), tokens, None)
        norms.append({k: float(v) for k, v in gradient_norms(c, grads).items()})
    assert sorted(norms[0]) == sorted(norms[1])
    assert {f"grad_norm/blocks/{i}" for i in range(4)} <= set(norms[1])
    for name, value in norms[0].items():
        assert norms[1][name] == pytest.approx(value, rel=1e-5)


def test_decoding_reads_a_stacked_cache_and_samples_the_same_tokens():
    looped, scanned = both(CASES["global/local, dropout"]())
    prompts = [[5, 6, 7], [9, 10, 11, 12, 13]]
    out = [
        gpt_neo.generate(c, init_params(c, 4), prompts, max_new_tokens=8, temperature=0.0)
        for c in (looped, scanned)
    ]
    assert out[0] == out[1]
    assert all(len(row) == 8 for row in out[1])


@pytest.mark.parametrize(
    ("keys", "layout"),
    [
        ({"attention_types": [[["global", "local"], 6]], "n_layer": 12}, (2, 6)),
        ({"attention_types": ["global"] * 4}, (1, 4)),
        ({"moe_layers": [0, 2], "moe_params": MOE}, (2, 2)),
        ({"attention_types": ["global", "none", "global", "none"]}, (2, 2)),
        ({"attention_types": ["global", "local", "local", "global"]}, None),  # no pattern
        ({"moe_layers": [1], "moe_params": MOE}, None),  # irregular MoE
        ({"share_parameters": True}, None),  # one block already
        ({"attention_types": ["global"] * 4, "scan_layers": False}, None),
        ({"n_layer": 1, "attention_types": ["global"]}, None),
    ],
)
def test_which_configs_scan(keys, layout):
    stacks = layer_stacks(from_dict({**SMALL, **keys}))
    assert (stacks and (stacks.period, stacks.repeats)) == layout


@pytest.mark.parametrize(
    ("keys", "why"),
    [
        (
            {"attention_types": ["global", "local", "local", "global"]},
            "attention_types ['global', 'local', 'local', 'global'] do not repeat a pattern",
        ),
        (
            {"moe_layers": [1], "moe_params": MOE},
            "moe_layers [1] do not repeat with the attention pattern ['global']",
        ),
        ({"share_parameters": True}, "share_parameters runs one block for every layer"),
    ],
)
def test_scan_layers_true_where_the_layers_do_not_repeat_is_one_clear_error(keys, why):
    with pytest.raises(ConfigError) as err:
        from_dict({**SMALL, **keys, "scan_layers": True})
    message = str(err.value)
    assert why in message
    assert "Set scan_layers to false (or remove it) to run the layers in a loop" in message
    assert "\n" not in message

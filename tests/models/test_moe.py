"""MoE numerics against independent oracles: a NumPy re-statement of Mesh-TensorFlow 0.1.18
(tests/oracles/moe_reference.py), Hugging Face's Switch Transformers layer and Mixtral router (PyTorch),
and finite differences for gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpt_neo.config import from_dict
from gpt_neo.mesh import make_mesh
from gpt_neo.models import moe
from tests.oracles import moe_reference as ref

M, H, E = 8, 12, 4


def moe_config(batch_split=1, **moe_params):
    keys = {
        "n_embd": M,
        "n_head": 2,
        "n_layer": 1,
        "n_ctx": 16,
        "n_vocab": 32,
        "moe_layers": [0],
        "moe_params": {"moe_num_experts": E, "moe_hidden_size": H, **moe_params},
    }
    if batch_split > 1:
        keys |= {"mesh_shape": f"x:{batch_split}", "layout": "batch:x"}
    return from_dict(keys)


def weights(seed=0, scale=1.0):
    rng = np.random.default_rng(seed)
    return {
        "router": rng.normal(0, scale, (M, E)).astype(np.float32),
        "wi": rng.normal(0, M**-0.5, (E, M, H)).astype(np.float32),
        "wo": rng.normal(0, H**-0.5, (E, H, M)).astype(np.float32),
    }


def inputs(batch=3, length=10, seed=1):
    return np.random.default_rng(seed).normal(size=(batch, length, M)).astype(np.float32)


@pytest.mark.parametrize(
    ("n", "max_size", "mesh", "expected"),
    [
        (3000, 1024, 1, (2, 1500)),  # G starts at n // max: S may exceed the maximum
        (16384, 1024, 4, (16, 1024)),  # GPT-Neo's deleted MoE config
        (30, 7, 2, (6, 5)),
        (30, 8, 1, (3, 10)),
        (8, 1024, 8, (8, 1)),
    ],
)
def test_groups_follow_mesh_tensorflow(n, max_size, mesh, expected):
    assert moe.split_into_groups(n, max_size, mesh) == expected
    assert ref.split_into_groups(n, max_size, mesh) == expected


def test_capacity_follows_mesh_tensorflow():
    # reference section 1.2 (b): S=1024, E=16 -> 80 in training, 128 in eval; floor and cap
    assert moe.expert_capacity(1024, 16, 1.25, 1) == 80
    assert moe.expert_capacity(1024, 16, 2.0, 1) == 128
    assert moe.expert_capacity(5, 4, 0.5, 1) == 1
    assert moe.expert_capacity(5, 4, 100.0, 1) == 5


CASES = [  # (policy, group size, batch split, capacity factor, second-place loss)
    ("all", 7, 1, 1.0, False),
    ("none", 8, 1, 1.0, False),
    ("threshold", 8, 2, 1.5, True),  # S = 10 > group size 8 on one piece; 6 groups on two
    ("all", 1024, 1, 4.0, False),  # one group, nothing dropped
    ("all", 3, 1, 0.1, False),  # capacity floor of 1
]


@pytest.mark.parametrize(("policy", "group_size", "split", "factor", "second_loss"), CASES)
def test_top2_layer_equals_the_numpy_restatement(policy, group_size, split, factor, second_loss):
    cfg = moe_config(
        split,
        moe_group_size=group_size,
        moe_capacity_factor_eval=factor,
        moe_second_policy_eval=policy,
        moe_second_threshold_eval=0.3,
        moe_use_second_place_loss=second_loss,
    )
    p, x = weights(), inputs()
    with jax.set_mesh(make_mesh(cfg, jax.devices()[:split])):
        y, stats = moe.moe_mlp(cfg, p, jnp.asarray(x), train=False)
    expected, aux, dropped = ref.moe_layer(
        x,
        p["router"],
        p["wi"],
        p["wo"],
        group_size=group_size,
        mesh_dim_size=split,
        capacity_factor=factor,
        policy=policy,
        threshold=0.3,
        second_place_loss=second_loss,
    )
    np.testing.assert_allclose(y, expected, atol=2e-5)
    assert float(stats.aux_loss) == pytest.approx(aux, rel=1e-5)
    assert float(stats.dropped) == pytest.approx(dropped, abs=1e-6)
    if factor < 4.0:
        assert dropped > 0.05  # the case does test capacity drops
    np.testing.assert_allclose(float(jnp.sum(stats.load)), 1.0, rtol=1e-6)


def test_random_second_policy_with_injected_uniforms_equals_the_numpy_restatement():
    x, p = inputs(batch=4, length=12), weights(seed=3)
    groups, size = moe.split_into_groups(48, 12, 1)
    uniforms = np.random.default_rng(5).uniform(size=(groups, size)).astype(np.float32)
    cfg = moe_config(moe_group_size=12)
    grouped = jnp.asarray(x.reshape(groups, size, M))
    gates = jax.nn.softmax(grouped @ p["router"], axis=-1)
    capacity = moe.expert_capacity(size, E, 1.25, 1)
    routing = moe.top2_routing(gates, capacity, "random", 0.2, jnp.asarray(uniforms))
    y = moe.dispatched_experts(cfg, p, grouped, routing.combine, None).reshape(x.shape)
    expected, aux, dropped = ref.moe_layer(
        x,
        p["router"],
        p["wi"],
        p["wo"],
        group_size=12,
        capacity_factor=1.25,
        policy="random",
        threshold=0.2,
        uniforms=uniforms,
    )
    np.testing.assert_allclose(y, expected, atol=2e-5)
    assert float(routing.aux_loss) == pytest.approx(aux, rel=1e-5)
    assert float(routing.dropped) == pytest.approx(dropped, abs=1e-6)


def test_random_policy_keeps_second_choices_at_the_expected_rate():
    # P(keep) = min(1, gate_2 / threshold); capacity = S, so only the policy drops
    gates = jax.nn.softmax(jax.random.normal(jax.random.key(0), (64, 256, E)) * 1.5, axis=-1)
    uniforms = jax.random.uniform(jax.random.key(1), (64, 256))
    routing = moe.top2_routing(gates, 256, "random", 0.2, uniforms)
    kept_second = np.asarray((routing.combine > 0).sum((2, 3)) - 1)  # slots per token - first
    top2 = np.sort(np.asarray(gates), -1)[..., -2:]
    gate_2 = top2[..., 0] / (top2.sum(-1) + 1e-9)
    expected = np.minimum(1.0, gate_2 / 0.2)
    n = expected.size
    sigma = np.sqrt((expected * (1 - expected)).sum()) / n
    assert abs(kept_second.mean() - expected.mean()) < 4 * sigma
    assert 0.2 < expected.mean() < 0.95  # neither all nor none kept


@pytest.mark.slow
def test_top2_gradients_match_finite_differences_of_the_numpy_restatement():
    cfg = moe_config(moe_group_size=8, moe_capacity_factor_eval=1.0, moe_second_policy_eval="all")
    p, x = weights(seed=4), inputs(batch=2, length=8, seed=6)
    cotangent = np.random.default_rng(7).normal(size=x.shape)

    def ours(p, x):
        return jnp.sum(moe.moe_mlp(cfg, p, x, train=False)[0] * cotangent)

    grads = jax.grad(ours, argnums=(0, 1))(p, jnp.asarray(x))

    def theirs(p64, x64):
        y = ref.moe_layer(
            x64, p64["router"], p64["wi"], p64["wo"], group_size=8, capacity_factor=1.0
        )
        return float((y[0] * cotangent).sum())

    p64 = {k: v.astype(np.float64) for k, v in p.items()}
    x64 = x.astype(np.float64)
    rng = np.random.default_rng(8)
    eps = 1e-6
    for name in ("router", "wi", "wo", "x"):
        target = x64 if name == "x" else p64[name]
        ours_grad = np.asarray(grads[1] if name == "x" else grads[0][name])
        for _ in range(6):
            index = tuple(rng.integers(0, s) for s in target.shape)
            saved = target[index]
            target[index] = saved + eps
            up = theirs(p64, x64)
            target[index] = saved - eps
            down = theirs(p64, x64)
            target[index] = saved
            assert ours_grad[index] == pytest.approx((up - down) / (2 * eps), abs=2e-4), name


def _switch_mlp(p, capacity):
    import torch
    from transformers import SwitchTransformersConfig
    from transformers.models.switch_transformers.modeling_switch_transformers import (
        SwitchTransformersSparseMLP,
    )

    config = SwitchTransformersConfig(
        d_model=M,
        d_ff=H,
        num_experts=E,
        expert_capacity=capacity,
        router_bias=False,
        router_dtype="float32",
        router_jitter_noise=0.0,
        dense_act_fn="relu",
        dropout_rate=0.0,
    )
    mlp = SwitchTransformersSparseMLP(config).eval()
    with torch.no_grad():
        mlp.router.classifier.weight.copy_(torch.from_numpy(p["router"].T))
        for e in range(E):
            getattr(mlp.experts, f"expert_{e}").wi.weight.copy_(torch.from_numpy(p["wi"][e].T))
            getattr(mlp.experts, f"expert_{e}").wo.weight.copy_(torch.from_numpy(p["wo"][e].T))
    return mlp


@pytest.mark.slow
def test_rand_1_equals_switch_transformers_layer_with_drops_and_gradients():
    import torch

    # HF Switch routes each sequence as one group: moe_group_size = sequence length
    length, capacity = 16, 3
    cfg = moe_config(moe_gating="rand_1", moe_group_size=length, moe_capacity_factor_eval=0.75)
    assert moe.expert_capacity(length, E, 0.75, 1) == capacity
    p, x = weights(seed=9, scale=2.0), inputs(batch=4, length=length, seed=10)
    y, stats = moe.moe_mlp(cfg, p, jnp.asarray(x), train=False)
    assert float(stats.dropped) > 0.1  # tokens over capacity are dropped in both

    mlp = _switch_mlp(p, capacity)
    x_torch = torch.from_numpy(x).requires_grad_(True)
    expected = mlp(x_torch)
    np.testing.assert_allclose(y, expected.detach().numpy(), atol=3e-6)

    cotangent = np.random.default_rng(11).normal(size=x.shape).astype(np.float32)
    (expected * torch.from_numpy(cotangent)).sum().backward()
    grads = jax.grad(
        lambda p, x: jnp.sum(moe.moe_mlp(cfg, p, x, train=False)[0] * cotangent), argnums=(0, 1)
    )(p, jnp.asarray(x))
    np.testing.assert_allclose(grads[1], x_torch.grad.numpy(), atol=1e-5)
    np.testing.assert_allclose(
        grads[0]["router"], mlp.router.classifier.weight.grad.numpy().T, atol=1e-5
    )
    for e in range(E):
        expert = getattr(mlp.experts, f"expert_{e}")
        np.testing.assert_allclose(grads[0]["wi"][e], expert.wi.weight.grad.numpy().T, atol=1e-5)
        np.testing.assert_allclose(grads[0]["wo"][e], expert.wo.weight.grad.numpy().T, atol=1e-5)


def test_aux_loss_equals_switch_transformers_load_balancing_loss():
    import torch
    from transformers.models.switch_transformers.modeling_switch_transformers import (
        load_balancing_loss_func,
    )

    p, x = weights(seed=12, scale=2.0), inputs(batch=4, length=16, seed=13)
    for gating in ("top_2", "rand_1"):
        cfg = moe_config(moe_gating=gating, moe_group_size=16, moe_second_policy_eval="all")
        _, stats = moe.moe_mlp(cfg, p, jnp.asarray(x), train=False)
        probs = torch.softmax(torch.from_numpy(x.astype(np.float64) @ p["router"]), -1)
        expected = load_balancing_loss_func(probs, probs.argmax(-1))
        assert float(stats.aux_loss) == pytest.approx(float(expected), rel=1e-5), gating


def test_top_k_choices_and_weights_equal_mixtrals_router():
    import torch
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter

    p, x = weights(seed=14, scale=2.0), inputs(batch=2, length=16, seed=15)
    config = MixtralConfig(hidden_size=M, num_local_experts=E, num_experts_per_tok=2)
    router = MixtralTopKRouter(config)
    with torch.no_grad():
        router.weight.copy_(torch.from_numpy(p["router"].T))
        _, scores, indices = router(torch.from_numpy(x))
    gates = jax.nn.softmax(jnp.asarray(x) @ p["router"], axis=-1)
    index, weights_, _, _ = moe.topk_dropless(gates, 2)
    np.testing.assert_array_equal(np.asarray(index).reshape(-1, 2), indices.numpy())
    np.testing.assert_allclose(np.asarray(weights_).reshape(-1, 2), scores.numpy(), atol=1e-6)
    # and top_2 with policy `all` and no drops routes the same pairs with the same weights
    routing = moe.top2_routing(gates, 16, "all", 0.2)
    per_expert = np.asarray(routing.combine.sum(-1)).reshape(-1, E)
    expected = np.zeros_like(per_expert)
    np.put_along_axis(expected, indices.numpy(), scores.numpy(), axis=-1)
    np.testing.assert_allclose(per_expert, expected, atol=1e-6)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_dropless_layer_sends_every_token_to_its_k_experts(k):
    cfg = moe_config(moe_gating="dropless_top_k", moe_top_k=k, moe_group_size=8)
    p, x = weights(seed=16, scale=2.0), inputs(batch=3, length=8, seed=17)
    y, stats = moe.moe_mlp(cfg, p, jnp.asarray(x), train=False)
    expected = np.zeros_like(x, np.float64)
    for b in range(3):
        for t in range(8):
            gates = ref.softmax(x[b, t].astype(np.float64) @ p["router"])
            best = sorted(range(E), key=lambda e: (-gates[e], e))[:k]
            total = sum(gates[e] for e in best)
            for e in best:
                expected[b, t] += (
                    gates[e] / total * ref.ffn(x[b, t], p["wi"][e], p["wo"][e], ref.relu)
                )
    np.testing.assert_allclose(y, expected, atol=2e-5)
    assert float(stats.dropped) == 0.0


def test_tiled_grouped_matmul_equals_ragged_dot_with_gradients():
    # the CPU form of the dropless experts against jax's own ragged_dot: uneven and empty
    # groups, rows past the groups' total, forward and both gradients
    rng = np.random.default_rng(18)
    x = jnp.asarray(rng.normal(size=(300, 6)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(5, 6, 7)), jnp.float32)
    sizes = jnp.asarray([40, 0, 130, 7, 100], jnp.int32)  # 277 of 300 rows
    cotangent = jnp.asarray(rng.normal(size=(300, 7)), jnp.float32)

    def run(f):
        return jax.value_and_grad(lambda x, w: jnp.sum(f(x, w) * cotangent), argnums=(0, 1))(x, w)

    tiled = run(lambda x, w: moe.tiled_grouped_matmul(x, w, sizes, tile=16))
    ragged = run(lambda x, w: jax.lax.ragged_dot(x, w, sizes))
    np.testing.assert_allclose(
        moe.tiled_grouped_matmul(x, w, sizes, tile=16), jax.lax.ragged_dot(x, w, sizes), atol=1e-5
    )
    for a, b in zip(jax.tree.leaves(tiled), jax.tree.leaves(ragged), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)

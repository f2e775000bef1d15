"""MoE layouts on 8 simulated devices equal the single-device run: logits, gradients, and a few
training steps (with random second-expert choices), for capacity-based and dropless routing,
with experts split over the data axis (all-to-all), over their own axis, next to tensor
parallelism and next to FSDP."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import gpt_neo
from gpt_neo.config import from_dict
from gpt_neo.models.gpt import forward
from gpt_neo.training.trainer import Trainer
from tests.support.helpers import random_tokens

# Groups are sequences (moe_group_size = n_ctx, batch 8), so routing is the same whatever the
# batch is split into, and every layout computes the same function as one device.
MODEL = {
    "n_embd": 32,
    "n_head": 4,
    "n_layer": 3,
    "n_ctx": 16,
    "n_vocab": 64,
    "attention_types": ["global", "local", "global"],
    "local_attention_radius": 4,
    "moe_layers": [0, 2],
    "train_batch_size": 8,
    "lr": 1e-3,  # Adam moves a parameter with a near-zero gradient by ~lr whatever its sign
    "warmup_steps": 0,
}
TOP_2 = {
    "moe_num_experts": 8,
    "moe_hidden_size": 48,
    "moe_group_size": 16,
    "moe_capacity_factor_train": 1.0,
    "moe_capacity_factor_eval": 1.0,
    "moe_second_policy_eval": "threshold",
}
DROPLESS = {**TOP_2, "moe_gating": "dropless_top_k", "moe_top_k": 2}

# (mesh_shape, layout, param_layout, expected spec of an expert's wi [experts, embd, hidden])
LAYOUTS = [
    ("x:8", "batch:x,experts:x", None, P("x", None, None)),
    ("x:4,y:2", "batch:x,experts:y", None, P("y", None, None)),
    ("x:2,y:4", "batch:x+y,experts:y", None, P("y", None, None)),
    ("x:4,y:2", "batch:x,experts:x,heads:y,expert_hidden:y", None, P("x", None, "y")),
    ("x:4,y:2", "batch:x+y,experts:y", "embd:x", P("y", "x", None)),
]
IDS = ["ep-on-data", "ep-own-axis", "ep-inside-data", "ep+tensor", "ep+fsdp"]


def config(routing, mesh_shape="x:1", layout="batch:x", param_layout=None):
    keys = {**MODEL, "moe_params": routing, "mesh_shape": mesh_shape, "layout": layout}
    if param_layout:
        keys["param_layout"] = param_layout
    return from_dict(keys)


def loss(cfg, params, tokens):
    logits = forward(cfg, params, tokens).logits
    logp = jax.nn.log_softmax(logits[:, :-1])
    return -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1).mean()


def perturbed(params, seed=3):
    """Random layer norms and biases, so no parameter is at a symmetric starting value."""
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(
        tree, [a + 0.05 * jax.random.normal(k, a.shape) for a, k in zip(leaves, keys, strict=True)]
    )


@pytest.fixture(scope="module", params=[TOP_2, DROPLESS], ids=["top_2", "dropless"])
def single_device(request):
    cfg = config(request.param)
    params = perturbed(gpt_neo.init_params(cfg, 0))
    tokens = jnp.asarray(random_tokens(cfg, batch=8))
    logits = gpt_neo.apply(cfg, params, tokens)
    grads = jax.jit(jax.grad(lambda p, t: loss(cfg, p, t)))(params, tokens)
    return request.param, params, tokens, logits, grads


@pytest.mark.slow
@pytest.mark.parametrize(("mesh_shape", "layout", "param_layout", "wi_spec"), LAYOUTS, ids=IDS)
def test_moe_layout_equals_single_device(single_device, mesh_shape, layout, param_layout, wi_spec):
    routing, ref_params, tokens, ref_logits, ref_grads = single_device
    cfg = config(routing, mesh_shape, layout, param_layout)
    mesh = gpt_neo.make_mesh(cfg)
    params = jax.device_put(ref_params, gpt_neo.models.gpt.param_shardings(cfg, mesh))
    wi = params["blocks"][0]["moe"]["wi"]
    assert wi.sharding.is_equivalent_to(jax.sharding.NamedSharding(mesh, wi_spec), 3)
    assert wi.addressable_shards[0].data.shape[0] < wi.shape[0]  # experts really are split
    np.testing.assert_allclose(gpt_neo.apply(cfg, params, tokens), ref_logits, atol=2e-5)
    with jax.set_mesh(mesh):
        grads = jax.jit(jax.grad(lambda p, t: loss(cfg, p, t)))(params, tokens)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True):
        np.testing.assert_allclose(a, b, atol=2e-6)


def test_experts_on_the_data_axis_move_tokens_with_an_all_to_all():
    cfg = config(TOP_2, "x:8", "batch:x,experts:x")
    mesh = gpt_neo.make_mesh(cfg)
    params = gpt_neo.init_params(cfg, 0, mesh)
    tokens = jnp.asarray(random_tokens(cfg, batch=8))
    with jax.set_mesh(mesh):
        hlo = (
            jax.jit(lambda p, t: forward(cfg, p, t).logits)
            .lower(params, tokens)
            .compile()
            .as_text()
        )
    assert "all-to-all" in hlo


@pytest.mark.slow
@pytest.mark.parametrize("routing", [TOP_2, DROPLESS], ids=["top_2", "dropless"])
def test_training_steps_on_8_devices_equal_one_device(routing):
    routing = {**routing, "moe_second_policy_train": "random", "moe_router_z_loss": 1e-3}
    reference = config(routing)
    sharded = config(routing, "x:4,y:2", "batch:x,experts:x,heads:y")
    batches = [random_tokens(reference, batch=8, length=17, seed=s) for s in range(3)]
    results = []
    for cfg in (reference, sharded):
        trainer = Trainer(cfg, gpt_neo.make_mesh(cfg, jax.devices()[: 8 if cfg is sharded else 1]))
        state = trainer.init_state(0)
        with jax.set_mesh(trainer.mesh):
            for batch in batches:
                state, metrics = trainer.step(state, trainer.place(batch))
        results.append((jax.device_get(state["params"]), jax.device_get(metrics)))
    (ref_params, ref_metrics), (params, metrics) = results
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params), strict=True):
        np.testing.assert_allclose(a, b, atol=5e-5)
    assert ref_metrics.keys() == metrics.keys()
    for key in ("loss", "moe_loss", "router_z_loss", "moe/0/dropped", "moe/2/load/3"):
        assert float(metrics[key]) == pytest.approx(float(ref_metrics[key]), rel=1e-4, abs=1e-7)
    assert float(metrics["moe_loss"]) > 0 and float(metrics["router_z_loss"]) > 0

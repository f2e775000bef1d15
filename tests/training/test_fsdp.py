"""`param_layout`: parameters (and their gradients and optimizer state) split by their own
rules. FSDP and FSDP + tensor parallelism equal the single-device run, and shrink each
device's share of the parameters and optimizer state by the mesh factor."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import gpt_neo
from gpt_neo import axes
from gpt_neo.models.gpt import param_decl_leaves
from gpt_neo.training.checkpoint.checkpointer import Checkpointer
from gpt_neo.training.step import gradients
from gpt_neo.training.trainer import Trainer
from tests.support.helpers import assert_trained_alike, random_tokens, tiny_config

SEED = 3
STEPS = 5
FSDP = {"mesh_shape": "x:8", "layout": "batch:x", "param_layout": "embd:x"}
FSDP_TP = {
    "mesh_shape": "x:4,y:2",
    "layout": "batch:x,heads:y,intermediate_expanded:y,vocab:y",
    "param_layout": "embd:x",
}
RUN = {"train_batch_size": 8, "train_steps": STEPS, "lr": 1e-2, "weight_decay": 0.1}


def train(cfg, batches):
    """(first-step grads, params after len(batches) steps, the Trainer), on cfg's mesh."""
    mesh = gpt_neo.make_mesh(cfg)
    trainer = Trainer(cfg, mesh)
    state = trainer.init_state(SEED)
    with jax.set_mesh(mesh):
        grads = jax.jit(lambda p, b: gradients(cfg, p, b, None)[0])(
            state["params"], trainer.place(batches[0])
        )
        for batch in batches:
            state, _ = trainer.step(state, trainer.place(batch))
    return grads, state, trainer


@pytest.fixture(scope="module")
def batches():
    cfg = tiny_config()
    return [random_tokens(cfg, batch=8, length=cfg.n_ctx + 1, seed=s) for s in range(STEPS)]


@pytest.fixture(scope="module")
def single_device(batches):
    cfg = tiny_config(mesh_shape="x:1", **RUN)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("x",))
    trainer = Trainer(cfg, mesh)
    state = trainer.init_state(SEED)
    grads = jax.jit(lambda p, b: gradients(cfg, p, b, None)[0])(state["params"], batches[0])
    logits = gpt_neo.apply(cfg, state["params"], batches[0][:, :-1])
    for batch in batches:
        state, _ = trainer.step(state, jnp.asarray(batch))
    return logits, grads, state


@pytest.mark.slow
@pytest.mark.parametrize(
    "layout, wte_spec", [(FSDP, P(None, "x")), (FSDP_TP, P("y", "x"))], ids=["fsdp", "fsdp+tp"]
)
def test_fsdp_layouts_equal_the_single_device_run(single_device, batches, layout, wte_spec):
    ref_logits, ref_grads, ref_state = single_device
    cfg = tiny_config(**RUN, **layout)
    mesh = gpt_neo.make_mesh(cfg)
    params = gpt_neo.init_params(cfg, SEED, mesh)
    assert params["wte"].sharding.spec == wte_spec
    logits = gpt_neo.apply(cfg, params, batches[0][:, :-1])
    np.testing.assert_allclose(logits, ref_logits, atol=1e-5)

    grads, state, _ = train(cfg, batches)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
    assert_trained_alike(state["params"], ref_state["params"], RUN["lr"])
    # the weights and their Adam moments stay split over the data axis after every step
    q = state["params"]["blocks"][0]["attn"]["q"]
    assert q.sharding.spec[0] == "x"
    mu = state["opt_state"][1][0].mu["blocks"][0]["attn"]["q"]
    assert mu.sharding.spec[0] == "x"


def shard_bytes(leaf) -> int:
    """Bytes of `leaf` held by the first device."""
    return next(s.data.nbytes for s in leaf.addressable_shards if s.device == jax.devices()[0])


@pytest.mark.slow
@pytest.mark.parametrize("layout", [FSDP, FSDP_TP], ids=["fsdp x:8", "fsdp+tp x:4,y:2"])
def test_fsdp_divides_parameter_and_optimizer_bytes_by_the_mesh(layout):
    plain = tiny_config(**RUN, mesh_shape=layout["mesh_shape"], layout=layout["layout"])
    fsdp = plain.replace(param_layout=layout["param_layout"])
    x = gpt_neo.make_mesh(fsdp).shape["x"]
    # what FSDP adds, per parameter: every one with a model-width dimension is split x ways
    split = [x if axes.EMBD in decl.axes else 1 for _, decl in param_decl_leaves(fsdp)[0]]
    before, after = (Trainer(c, gpt_neo.make_mesh(c)).init_state(SEED) for c in (plain, fsdp))
    adam_before, adam_after = before["opt_state"][1][0], after["opt_state"][1][0]
    for tree_before, tree_after in (
        (before["params"], after["params"]),
        (adam_before.mu, adam_after.mu),
        (adam_before.nu, adam_after.nu),
    ):
        measured = [shard_bytes(leaf) for leaf in jax.tree.leaves(tree_after)]
        unsplit = [shard_bytes(leaf) for leaf in jax.tree.leaves(tree_before)]
        assert measured == [b // s for b, s in zip(unsplit, split, strict=True)]
    total_before = sum(map(shard_bytes, jax.tree.leaves((before["params"], before["opt_state"]))))
    total_after = sum(map(shard_bytes, jax.tree.leaves((after["params"], after["opt_state"]))))
    # all but the MLP's hidden bias (and Adam's step counter) shrink by the mesh factor
    assert x * 0.9 < total_before / total_after <= x


@pytest.mark.slow
def test_a_checkpoint_restores_under_another_param_layout(tmp_path, batches):
    plain = tiny_config(**RUN, mesh_shape="x:4,y:2", layout="batch:x,heads:y")
    fsdp = plain.replace(param_layout="embd:x")
    _, state, _ = train(plain, batches[:2])
    checkpointer = Checkpointer(str(tmp_path), keep=2)
    checkpointer.save(2, state, {"position": "start"}, plain)
    checkpointer.wait()
    trainer = Trainer(fsdp, gpt_neo.make_mesh(fsdp))
    restored, _ = checkpointer.restore_latest(fsdp, trainer.abstract_state())
    checkpointer.close()
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert restored["params"]["wte"].sharding.spec == P(None, "x")
    assert restored["opt_state"][1][0].nu["wte"].sharding.spec == P(None, "x")
    with jax.set_mesh(trainer.mesh):  # and training goes on from it
        restored, metrics = trainer.step(restored, trainer.place(batches[2]))
    assert np.isfinite(float(metrics["loss"]))

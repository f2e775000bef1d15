"""A checkpoint restores into a model that stores its layers the other way (`scan_layers`:
stacked, or one block per layer as every checkpoint before stacking existed): the train state
arrives converted, value for value, placed per the current layout, and training goes on as
if nothing had changed. A checkpoint of another depth is refused before anything is read."""

import jax
import numpy as np
import pytest

from gpt_neo.errors import ConfigError
from gpt_neo.mesh import make_mesh
from gpt_neo.models.stack import per_layer
from gpt_neo.training.checkpoint.checkpointer import Checkpointer, load_params
from gpt_neo.training.trainer import Trainer
from tests.support.helpers import random_tokens, tiny_config

BATCHES = 3


def model(tmp_path, **keys):
    base = {
        "attention_types": [[["global", "local"], 2]],
        "mesh_shape": "x:4,y:2",
        "layout": "batch:x,heads:y",
        "param_layout": "embd:x",
        "train_batch_size": 8,
        "lr": 1e-2,
        "weight_decay": 0.1,
        "model_path": str(tmp_path / "run"),
    }
    return tiny_config(**{**base, **keys})


def steps(cfg, trainer, state, batches):
    losses = []
    with jax.set_mesh(trainer.mesh):
        for batch in batches:
            state, metrics = trainer.step(state, trainer.place(batch))
            losses.append(float(metrics["loss"]))
    return state, losses


def host(cfg, tree) -> dict:
    """Leaves by path in the per-layer layout, on the host."""
    return {
        jax.tree_util.keystr(path): np.asarray(leaf)
        for path, leaf in jax.tree_util.tree_leaves_with_path(per_layer(cfg, jax.device_get(tree)))
    }


@pytest.mark.slow
@pytest.mark.parametrize(
    ("written", "read"),
    [(False, None), (None, False)],
    ids=["per-layer->stacked", "stacked->per-layer"],
)
def test_a_checkpoint_restores_into_the_other_layout_and_trains_on(tmp_path, written, read):
    batches = [random_tokens(model(tmp_path), batch=8, length=33, seed=s) for s in range(BATCHES)]
    writer = model(tmp_path, scan_layers=written)
    trainer = Trainer(writer, make_mesh(writer))
    state, _ = steps(writer, trainer, trainer.init_state(0), batches[:2])
    checkpointer = Checkpointer(writer.model_path, 3)
    checkpointer.save(2, state, {"position": "start"}, writer)
    checkpointer.close()
    wrote = host(writer, state)
    _, expected_losses = steps(writer, trainer, state, batches[2:])  # donates `state`

    reader = model(tmp_path, scan_layers=read)
    trainer = Trainer(reader, make_mesh(reader))
    assert ("stacks" in state["params"]) != ("stacks" in trainer.abstract_state()["params"])
    checkpointer = Checkpointer(reader.model_path, 3)
    try:
        restored, data_state = checkpointer.restore_latest(reader, trainer.abstract_state())
    finally:
        checkpointer.close()
    assert data_state == {"position": "start"}
    assert jax.tree.structure(restored) == jax.tree.structure(trainer.abstract_state())
    shardings = jax.tree.leaves(trainer.state_shardings)
    assert all(
        leaf.sharding.is_equivalent_to(sharding, leaf.ndim)
        for leaf, sharding in zip(jax.tree.leaves(restored), shardings, strict=True)
    )
    got = host(reader, restored)
    assert sorted(wrote) == sorted(got)
    for name, value in wrote.items():
        np.testing.assert_array_equal(got[name], value, err_msg=name)

    _, losses = steps(reader, trainer, restored, batches[2:])
    assert losses == pytest.approx(expected_losses, rel=1e-5)

    params, step = load_params(reader)  # what --predict, --eval and --export read
    assert step == 2
    for name, value in host(reader, {"params": params}).items():
        np.testing.assert_array_equal(value, wrote[name], err_msg=name)


def test_a_stacked_checkpoint_of_another_depth_is_refused_before_reading(tmp_path):
    writer = model(tmp_path)
    trainer = Trainer(writer, make_mesh(writer))
    checkpointer = Checkpointer(writer.model_path, 3)
    checkpointer.save(0, trainer.init_state(0), {"position": "start"}, writer)
    checkpointer.close()
    deeper = model(tmp_path, n_layer=8, attention_types=[[["global", "local"], 4]])
    checkpointer = Checkpointer(deeper.model_path, 3)
    try:
        with pytest.raises(ConfigError, match=r"n_layer: checkpoint 4, config 8"):
            checkpointer.restore_latest(deeper, Trainer(deeper, make_mesh(deeper)).abstract_state())
    finally:
        checkpointer.close()

"""Checkpoints written before the package move restore after it: the train state's tree, its
parameters bit for bit, and a run that resumes from it (tests/fixtures/checkpoint_before_packages,
written by the old code)."""

import json
import shutil
from pathlib import Path

import jax
import numpy as np

from gpt_neo.config import from_dict
from gpt_neo.mesh import make_mesh
from gpt_neo.training.checkpoint.checkpointer import Checkpointer, load_params
from gpt_neo.training.trainer import Trainer

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "checkpoint_before_packages"


def fixture_config(tmp_path):
    shutil.copytree(FIXTURE / "run", tmp_path / "run")  # a restore may set damaged steps aside
    keys = json.loads((FIXTURE / "config.json").read_text())
    return from_dict({**keys, "model_path": str(tmp_path / "run")})


def flat(tree) -> dict:
    return {
        jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(tree)
    }


def test_a_checkpoint_from_before_the_package_move_restores_and_trains_on(tmp_path):
    cfg = fixture_config(tmp_path)
    expected = np.load(FIXTURE / "params_at_2.npz")
    mesh = make_mesh(cfg)
    trainer = Trainer(cfg, mesh)
    checkpointer = Checkpointer(str(tmp_path / "run"), cfg.keep_checkpoints)
    try:
        state, data_state = checkpointer.restore_latest(cfg, trainer.abstract_state())
    finally:
        checkpointer.close()
    assert int(state["step"]) == 2 and data_state["position"] == "start"
    params = flat(state["params"])
    assert sorted(params) == sorted(expected.files)
    for name, value in params.items():
        np.testing.assert_array_equal(value, expected[name])
    batch = np.random.default_rng(0).integers(0, cfg.n_vocab, (8, cfg.n_ctx + 1), np.int32)
    with jax.set_mesh(mesh):
        state, metrics = trainer.step(state, trainer.place(batch))
    assert int(state["step"]) == 3 and np.isfinite(float(metrics["loss"]))

    restored, step = load_params(cfg)  # what --predict, --eval and --export read
    assert step == 2
    for name, value in flat(restored).items():
        np.testing.assert_array_equal(value, expected[name])

"""MoE models end to end: main.py trains one, logs the balance loss apart and per layer, resumes
exactly and on another expert layout, decodes with the KV cache, refuses export; bad MoE
keys are one clear line and exit 2; --summary counts active parameters."""

import json

import jax
import numpy as np
import pytest

import gpt_neo
from gpt_neo.config import from_dict, load_config
from gpt_neo.models.gpt import flops_per_token, param_count
from main import main
from tests.inference.test_sample import PROMPTS, assert_greedy
from tests.support.helpers import REPO, SMALL_RUN, restore_params, write_config, write_text_dataset
from tests.training.test_train import run_config as train_run_config

MOE = {
    "moe_layers": [1],
    "moe_params": {
        "moe_num_experts": 8,
        "moe_hidden_size": 32,
        "moe_group_size": 32,
        "moe_router_z_loss": 1e-3,
    },
}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_text_dataset(tmp_path_factory.mktemp("text"))


def run_config(folder, dataset, **overrides):
    """tests/training/test_train.py's small run, with MoE layer 1 and experts on the data axis."""
    keys = {**MOE, "layout": "batch:x,heads:y,experts:x", **overrides}
    return train_run_config(folder, dataset, **keys)


def records(folder):
    lines = (folder / "run" / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "loss" in r]


@pytest.mark.process
def test_moe_training_logs_balance_loss_per_layer_and_resumes_on_another_layout(
    tmp_path, dataset, capsys
):
    from gpt_neo.storage import tf

    full = run_config(tmp_path / "full", dataset, train_steps=16, lr_decay_end=16)
    assert main(["--model", full, "--steps_per_checkpoint", "4"]) == 0
    assert "MoE loss" in capsys.readouterr().out
    logged = records(tmp_path / "full")
    assert logged[-1]["loss"] < logged[0]["loss"] - 0.3  # it learns
    loads = [f"moe/1/load/{e}" for e in range(8)]
    for record in logged:
        assert record["moe_loss"] == pytest.approx(0.01 * record["moe/1/aux_loss"], rel=1e-5)
        assert record["moe/1/aux_loss"] >= 1.0 - 1e-4  # E * sum f P is at least 1
        assert 0.0 <= record["moe/1/dropped"] < 1.0 and record["router_z_loss"] > 0
        assert sum(record[k] for k in loads) == pytest.approx(1.0, rel=1e-5)
    tags = {
        value.tag
        for path in (tmp_path / "full" / "run" / "tensorboard").iterdir()
        for event in tf().compat.v1.train.summary_iterator(str(path))
        for value in event.summary.value
    }
    assert {"moe_loss", "router_z_loss", "moe/1/aux_loss", "moe/1/dropped", *loads} <= tags
    reference = restore_params(f"{tmp_path}/full/run/checkpoints/16/state")

    half = run_config(tmp_path / "half", dataset, train_steps=8, lr_decay_end=16)
    assert main(["--model", half, "--steps_per_checkpoint", "4"]) == 0
    assert main(["--model", half, "--set", "train_steps=16", "--steps_per_checkpoint", "4"]) == 0
    resumed = restore_params(f"{tmp_path}/half/run/checkpoints/16/state")
    for a, b in zip(jax.tree.leaves(reference), jax.tree.leaves(resumed), strict=True):
        np.testing.assert_array_equal(a, b)  # bit for bit

    moved = run_config(tmp_path / "moved", dataset, train_steps=8, lr_decay_end=16)
    assert main(["--model", moved, "--steps_per_checkpoint", "4"]) == 0
    experts_on_y = ["train_steps=16", "layout=batch:x,experts:y,expert_hidden:x"]
    assert main(["--model", moved, "--set", *experts_on_y, "--steps_per_checkpoint", "4"]) == 0
    other = restore_params(f"{tmp_path}/moved/run/checkpoints/16/state")
    for a, b in zip(jax.tree.leaves(reference), jax.tree.leaves(other), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4)  # same math, other reduction order

    out = tmp_path / "hf"
    assert main(["--model", full, "--export", str(out)]) == 2
    assert "no GPT-Neo class with mixture-of-experts layers" in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())


def perturbed(params):
    noise = np.random.default_rng(0)
    return jax.tree.map(lambda a: a + 0.05 * noise.normal(size=a.shape).astype(np.float32), params)


@pytest.mark.slow
@pytest.mark.parametrize("gating", ["top_2", "rand_1", "dropless_top_k"])
def test_greedy_decoding_with_moe_equals_argmax_of_a_full_forward(gating):
    cfg = decoding_config(gating)
    params = perturbed(gpt_neo.init_params(cfg, 0))
    out = gpt_neo.generate(cfg, params, PROMPTS, max_new_tokens=12, temperature=0.0)
    assert [len(o) for o in out] == [12, 12, 12]
    assert_greedy(cfg, params, PROMPTS, out)


def decoding_config(gating, **keys):
    # eval capacity = the whole group and every second choice kept: nothing is dropped
    routing = {**MOE["moe_params"], "moe_gating": gating, "moe_capacity_factor_eval": 8.0}
    routing["moe_second_policy_eval"] = "all"
    return from_dict({**SMALL_RUN, "moe_layers": [0, 1], "moe_params": routing, **keys})


@pytest.mark.parametrize("gating", ["top_2", "dropless_top_k"])
def test_sharded_moe_decoding_equals_single_device(gating):
    cfg = decoding_config(gating, mesh_shape="x:2,y:4", layout="batch:x,experts:y,heads:y")
    params = perturbed(gpt_neo.init_params(cfg, 0))
    single = gpt_neo.generate(cfg, params, PROMPTS, max_new_tokens=8, temperature=0.0)
    mesh = gpt_neo.make_mesh(cfg)
    sharded_params = jax.device_put(params, gpt_neo.models.gpt.param_shardings(cfg, mesh))
    assert (
        gpt_neo.generate(cfg, sharded_params, PROMPTS, max_new_tokens=8, temperature=0.0) == single
    )


def test_bfloat16_moe_routes_in_float32_and_follows_the_float32_model():
    cfg = decoding_config("top_2")
    bf16 = cfg.replace(precision="bfloat16")
    params = perturbed(gpt_neo.init_params(cfg, 0))
    tokens = np.asarray([PROMPTS[1] * 2], np.int32)
    full, half = gpt_neo.apply(cfg, params, tokens), gpt_neo.apply(bf16, params, tokens)
    assert np.isfinite(half).all()
    error = np.abs(half - full)[0].max(-1)  # per position
    # bfloat16 noise (~1e-2), more where it flips a near-tie between two experts (and at the
    # positions after it that attend to that token)
    assert np.median(error) < 0.02 and error.max() < 1.0, error
    jaxpr = str(
        jax.make_jaxpr(lambda p: gpt_neo.models.gpt.forward(bf16, p, tokens).logits)(params)
    )
    router = [
        line for line in jaxpr.splitlines() if "f32[1,22,8]" in line and "dot_general" in line
    ]
    assert router  # the router's logits [groups, group size, experts] are float32


def test_summary_counts_total_and_active_parameters(capsys):
    assert main(["--model", "configs/demo_moe.json", "--summary"]) == 0
    out = capsys.readouterr().out
    cfg = load_config(REPO / "configs" / "demo_moe.json")
    hp = cfg.moe
    leaves = jax.tree.leaves(jax.eval_shape(lambda: gpt_neo.init_params(cfg, 0)))
    total = sum(int(np.prod(leaf.shape)) for leaf in leaves)
    per_expert = 2 * cfg.n_embd * hp.moe_hidden_size  # wi and wo, no biases
    idle = len(cfg.moe_layers) * (hp.moe_num_experts - 2) * per_expert  # top_2: 2 of 8 work
    assert param_count(cfg) == total
    assert param_count(cfg, active=True) == total - idle
    assert f"parameters total {total:,}" in out and f"active per token {total - idle:,}" in out
    dense_like = 6 * (total - idle - cfg.n_ctx * cfg.n_embd)
    attention = 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * cfg.n_ctx
    assert flops_per_token(cfg) == dense_like + attention  # MFU counts active experts only


def routing(**changes):
    return {"moe_params": {**MOE["moe_params"], **changes}}


BAD = [
    ({"moe_layers": [0, 4]}, "layer 4 does not exist; indices are 0-based, 0 to 1"),
    ({"moe_layers": [1, 1]}, "names layer 1 twice"),
    ({"moe_layers": False}, "must be a list of 0-based layer indices"),
    ({"moe_params": None}, "needs 'moe_params'"),
    (routing(moe_num_experts=None), "'moe_num_experts' is null; give it a value"),
    (routing(moe_gating="top2"), "unknown moe_params moe_gating 'top2'. Did you mean 'top_2'?"),
    (routing(moe_gating="switch"), "no-token-left-behind"),
    (routing(moe_second_policy_train="sometimes"), "unknown moe_params moe_second_policy_train"),
    (routing(moe_capacity_factor_train=0), "'moe_capacity_factor_train' must be above 0"),
    (routing(moe_capacity_factor_eval=-1.0), "'moe_capacity_factor_eval' must be above 0"),
    (routing(moe_num_expert=8), "Did you mean 'moe_num_experts'?"),
    (routing(moe_switch_jitter=0.1), "0.1.19+ name of 'moe_rand_1_jitter'"),
    ({**routing(moe_num_experts=6), "layout": "batch:x,experts:x"}, "does not divide moe_num_experts"),
    ({"moe_layers": []}, "'moe_layers' lists no layer"),
    ({"moe_activation": "swish"}, "unknown moe_activation 'swish'"),
]  # fmt: skip


@pytest.mark.parametrize(("change", "message"), BAD)
def test_bad_moe_keys_are_one_line_and_exit_2(tmp_path, capsys, change, message):
    keys = {k: v for k, v in {**SMALL_RUN, **MOE, **change}.items() if v is not None}
    model = write_config(tmp_path / "bad.json", keys)
    assert main(["--model", model, "--summary"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err

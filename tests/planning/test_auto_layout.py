"""`mesh_shape`/`layout`/`param_layout: "auto"`: the search enumerates every split the mesh
allows, a memory limit moves its choice to one that the compiler confirms fits, training with
the choice equals the single-device run, and on a TPU slice described ahead of time a model
that plain data parallelism cannot hold (2.7B on v5e:2x2) gets a layout that fits."""

import itertools
import json
import re

import jax
import numpy as np
import pytest

import gpt_neo
from gpt_neo import axes
from gpt_neo.cli.main import main
from gpt_neo.config import auto_keys
from gpt_neo.errors import ConfigError
from gpt_neo.mesh import mesh_axes, pieces, rules
from gpt_neo.planning import aot, auto_layout
from gpt_neo.training.memory import num_microbatches
from tests.support.helpers import (
    REPO,
    SMALL_RUN,
    assert_trained_alike,
    random_tokens,
    tiny_config,
    train_steps,
    write_config,
    write_text_dataset,
)

SEED, STEPS = 3, 4
RUN = {"train_batch_size": 8, "train_steps": STEPS, "lr": 1e-2}
MiB = 2**20


@pytest.mark.parametrize(
    "keys, chosen",
    [
        (
            {"mesh_shape": "auto"},
            ("mesh_shape", "layout", "param_layout", "tokens_per_mb_per_replica"),
        ),
        (
            {"mesh_shape": "x:8", "layout": "auto"},
            ("layout", "param_layout", "tokens_per_mb_per_replica"),
        ),
        (
            {"layout": "batch:x", "param_layout": "auto", "tokens_per_mb_per_replica": 64},
            ("param_layout",),
        ),
        ({"mesh_shape": "x:8", "layout": "batch:x"}, ()),
    ],
)
def test_auto_chooses_the_auto_keys_and_the_unset_ones_after_them(keys, chosen):
    assert auto_keys(tiny_config(**keys)) == chosen


def test_a_value_that_depends_on_an_auto_one_is_refused():
    with pytest.raises(
        ConfigError, match=r'mesh_shape is "auto" but layout is .batch:x.*Set layout'
    ):
        tiny_config(mesh_shape="auto", layout="batch:x")
    with pytest.raises(ConfigError, match=r"gpt_neo.choose_layout"):
        gpt_neo.make_mesh(tiny_config(mesh_shape="auto"))


def jobs(cfg):
    """(mesh sizes, batch pieces, tensor pieces, FSDP, microbatches, sequence pieces) of a
    concrete config, read back through the layout rules."""
    sizes = mesh_axes(cfg)
    acts, params = rules(cfg).activations, rules(cfg).parameters
    data = pieces(sizes, acts, axes.BATCH)
    tensor = pieces(sizes, acts, axes.HEADS)
    for dim in (axes.MLP, axes.VOCAB):  # Megatron: heads, MLP hidden and vocabulary together
        assert acts.get(dim) == acts.get(axes.HEADS)
    fsdp = params.get(axes.EMBD) is not None
    token_axes = acts.get(axes.BATCH, ()) + acts.get(axes.SEQ, ())
    assert not fsdp or params[axes.EMBD] == token_axes  # weights over the axes splitting tokens
    micro = num_microbatches(cfg, cfg.train_batch_size, data)
    return tuple(sorted(sizes.items())), data, tensor, fsdp, micro, pieces(sizes, acts, axes.SEQ)


def test_the_search_enumerates_every_split_of_an_auto_mesh():
    cfg = tiny_config(mesh_shape="auto", train_batch_size=8)  # n_head 8, d_mlp 256, embd 64
    ranked = auto_layout.rank(cfg, 8, auto_layout.hardware.UNKNOWN, None)
    # by hand: tensor t | 8 heads or a sequence split c (2c | n_ctx 32), data 8/t or 8/c |
    # batch 8, FSDP when there is a data or sequence axis, microbatches m = powers of two
    # dividing the 8/d rows each replica holds
    expected = set()
    for second, size in [("tensor", t) for t in (1, 2, 4, 8)] + [
        ("context", 2),
        ("context", 4),
        ("context", 8),
    ]:
        d = 8 // size
        mesh = tuple(sorted({"data": d, second: size}.items()))
        mesh = tuple((a, s) for a, s in mesh if s > 1)
        t, c = (size, 1) if second == "tensor" else (1, size)
        for fsdp in (False, True) if d * c > 1 else (False,):
            for m in (1, 2, 4, 8):
                if (8 // d) % m == 0:
                    expected.add((mesh, d, t, fsdp, m, c))
    assert {jobs(c.cfg) for c in ranked} == expected
    assert len(ranked) == len(expected)


def test_a_given_mesh_gets_every_assignment_of_jobs_to_its_axes():
    cfg = tiny_config(mesh_shape="x:4,y:2", layout="auto", train_batch_size=8)
    ranked = auto_layout.rank(cfg, 8, auto_layout.hardware.UNKNOWN, None)
    splits = {
        tuple(rules(c.cfg).activations.get(dim) for dim in (axes.BATCH, axes.HEADS, axes.SEQ))
        for c in ranked
    }
    # each axis data, tensor or sequence: 3 x 3 assignments
    jobs_of = {"data": axes.BATCH, "tensor": axes.HEADS, "sequence": axes.SEQ}
    expected = set()
    for x_job, y_job in itertools.product(jobs_of, repeat=2):
        split = {jobs_of[x_job]: ("x",)}
        split[jobs_of[y_job]] = (*split.get(jobs_of[y_job], ()), "y")
        expected.add(tuple(split.get(dim) for dim in (axes.BATCH, axes.HEADS, axes.SEQ)))
    assert splits == expected
    assert all(c.cfg.mesh_shape == "x:4,y:2" for c in ranked)


@pytest.fixture(scope="module")
def batches():
    cfg = tiny_config()
    return [random_tokens(cfg, batch=8, length=cfg.n_ctx + 1, seed=s) for s in range(STEPS)]


@pytest.mark.slow
def test_a_memory_limit_moves_the_choice_the_compiler_confirms_it_and_it_trains_like_one_device(
    batches,
):
    cfg = tiny_config(mesh_shape="auto", **RUN)
    devices = jax.devices()
    unlimited = auto_layout.choose(cfg, devices, compile_step=None, limit=None)
    naive = unlimited.cfg
    # no memory pressure: plain data parallelism, which adds no communication to the step
    assert jobs(naive)[1:] == (8, 1, False, 1, 1)
    naive_bytes = aot.compile_train_step(naive, devices).total

    limit = naive_bytes // 2
    choice = auto_layout.choose(cfg, devices, limit=limit)
    assert jobs(choice.cfg) != jobs(naive)
    assert choice.compiled.total <= limit  # the CPU compiler's own memory analysis
    lines = "\n".join(choice.lines())
    assert "(naive)" in lines and "does not fit" in lines and "compiled:" in lines

    single = tiny_config(mesh_shape="x:1", **RUN)
    reference = train_steps(
        single, jax.sharding.Mesh(np.array(devices[:1]), ("x",)), batches, SEED
    )["params"]
    chosen = train_steps(choice.cfg, gpt_neo.make_mesh(choice.cfg), batches, SEED)["params"]
    assert_trained_alike(chosen, reference, RUN["lr"])


def test_nothing_fits_is_one_clear_error():
    cfg = tiny_config(mesh_shape="auto", **RUN)
    with pytest.raises(
        ConfigError, match=r"nothing fits on 8 x cpu: the smallest of \d+ candidates needs .* KiB"
    ):
        auto_layout.choose(cfg, jax.devices(), compile_step=None, limit=10_000)


@pytest.mark.tpu
def test_training_from_the_command_line_chooses_records_and_samples(tmp_path, capsys):
    dataset = write_text_dataset(tmp_path / "text")
    keys = {
        **SMALL_RUN,
        "mesh_shape": "auto",
        "layout": "auto",
        "train_steps": 4,
        "datasets": [[dataset, 1, "documents_random", 1.0]],
        "model_path": str(tmp_path / "run"),
    }
    model = write_config(tmp_path / "model.json", keys)
    assert main(["--model", model, "--steps_per_checkpoint", "4"]) == 0
    out = capsys.readouterr().out
    chosen = re.search(r'chosen #1: "mesh_shape": "([^"]+)", "layout": "([^"]+)"', out)
    assert chosen and "compiled:" in out and "step 4/4 | loss" in out
    # the confirming compile went into the (fresh) compilation cache: training's was a hit
    hits = re.search(r"compilation cache \S+: (\d+) hit", out)
    assert hits and int(hits.group(1)) >= 1
    recorded = json.loads((tmp_path / "run" / "sacred" / "1" / "config.json").read_text())
    assert (recorded["mesh_shape"], recorded["layout"]) == chosen.groups()

    assert main(["--model", model, "--predict", "--max_new_tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "auto layout" in out and "compiled:" not in out  # sampling ranks, compiles nothing extra
    assert list((tmp_path / "run").glob("predictions_4.txt"))


PRESETS = REPO / "configs"


def ranked_on_v5e_2x2(preset: str):
    """(the search's ranking of `preset` at batch 32 for v5e:2x2, nothing compiled; its HBM)."""
    devices = aot.topology_devices("v5e:2x2")
    cfg = gpt_neo.load_config(
        str(PRESETS / f"{preset}.json"),
        overrides={"mesh_shape": "auto", "layout": "auto", "train_batch_size": 32},
    )
    return auto_layout.choose(cfg, devices, compile_step=None), aot.hbm_bytes(devices)


@pytest.mark.tpu
def test_2_7b_on_v5e_2x2_gets_a_layout_that_fits_where_data_parallel_does_not():
    choice, hbm = ranked_on_v5e_2x2("gpt_neo_2.7B")
    naive = next(c for c in choice.ranked if auto_layout._is_naive(c.split))
    assert naive.memory.train_total > 2 * hbm  # 43 GiB: the float32 weights and Adam alone
    assert choice.chosen.memory.train_total < hbm
    assert jobs(choice.cfg)[3]  # it splits the weights (FSDP)
    # scanned, the same split needs the stacks' extra copies and no longer fits: the search
    # unrolls the layers, and says so
    scanned = next(
        c for c in choice.ranked if c.split == choice.chosen.split and c.cfg.scan_layers is None
    )
    assert scanned.memory.train_total > hbm > choice.chosen.memory.train_total
    assert choice.cfg.scan_layers is False
    lines = "\n".join(choice.lines())
    assert ", layers unrolled" in lines and '"scan_layers": false' in lines


@pytest.mark.tpu
def test_the_search_keeps_the_layers_scanned_where_they_fit():
    choice, _ = ranked_on_v5e_2x2("gpt_neo_125M")
    assert choice.chosen.tier == 0 and choice.cfg.scan_layers is None  # the faster compile
    assert any(c.unrolled for c in choice.ranked)  # both were ranked


@pytest.mark.tpu
@pytest.mark.slow
def test_summary_on_a_topology_compiles_the_choice_where_data_parallel_does_not_fit(tmp_path):
    """125M's shape with 2 of its layers (a full preset compiles for minutes) at batch 1024 x
    2048 on v5e:2x2: plain data parallelism needs about 17 GiB of the chips' 15.75; the choice
    is compiled and fits."""
    from tests.support.helpers import start_main

    overrides = [
        "mesh_shape=auto",
        "layout=auto",
        "train_batch_size=1024",
        "precision=bfloat16",
        "recompute_grad=true",
        "n_layer=2",
        'attention_types=[[["global"], 2]]',
    ]
    process = start_main(
        "--model", "gpt_neo_125M", "--set", *overrides, "--summary", "--topology", "v5e:2x2"
    )
    out, _ = process.communicate(timeout=900)
    assert process.returncode == 0, out[-3000:]
    naive = re.search(r"data:4 data-parallel \(naive\) +([\d.]+) GiB.*does not fit", out)
    assert naive and float(naive.group(1)) > 15.75
    assert re.search(r"compiled: [\d.]+ GiB in \d+s", out)
    fits = re.search(
        r"per-device memory: estimated [\d.]+ GiB, compiled ([\d.]+) GiB, HBM 15.75 GiB: fits", out
    )
    assert fits and float(fits.group(1)) <= 15.75


def test_a_sequence_too_long_for_one_device_gets_a_sequence_split():
    # one sequence of 8192 tokens, which no data split can share out, and a residual stream
    # that tensor parallelism leaves whole on every device
    cfg = tiny_config(
        mesh_shape="x:8",
        layout="auto",
        train_batch_size=1,
        n_ctx=8192,
        n_embd=512,
        n_layer=8,
        attention_types=[[["global", "local"], 4]],
        recompute_grad=True,
    )
    unlimited = auto_layout.rank(cfg, 8, auto_layout.hardware.UNKNOWN, None)
    splits_sequence = [c for c in unlimited if c.split.sequence]
    others = [c for c in unlimited if not c.split.sequence]
    assert splits_sequence and others
    least = min(c.memory.train_total for c in splits_sequence)
    assert least < min(c.memory.train_total for c in others)
    # a chip that holds the least-memory sequence split, and no candidate without one
    ranked = auto_layout.rank(cfg, 8, auto_layout.hardware.UNKNOWN, least)
    assert ranked[0].split.sequence == ("x",) and ranked[0].tier == 0
    assert rules(ranked[0].cfg).activations[axes.SEQ] == ("x",)
    assert all(c.tier > 0 for c in ranked if not c.split.sequence)
    assert "sequence-parallel" in ranked[0].split.describe()

"""Several TPU slices: `dcn_axes` names the mesh axes that cross the data-centre network.

On CPU the 8 simulated devices stand for slices in consecutive groups (the arrangement
`gpt_neo.mesh` uses where devices carry no slice index); the `tpu` tests take a real
multi-slice topology's devices from libtpu, which do carry one.
"""

import math
import re

import jax
import numpy as np
import pytest

import gpt_neo
from gpt_neo.data.batch import Batch
from gpt_neo.errors import ConfigError
from gpt_neo.mesh import rules
from gpt_neo.planning import auto_layout
from gpt_neo.planning.summary import print_summary
from gpt_neo.training.trainer import Trainer
from tests.support.helpers import (
    assert_trained_alike,
    lowered_train_step,
    tiny_config,
    train_on,
)

TWO_SLICES = {"mesh_shape": "slice:2,x:4", "dcn_axes": "slice"}


def ids(mesh) -> list[list[int]]:
    return [[d.id for d in row] for row in mesh.devices]


def test_a_dcn_axis_steps_between_slices_and_the_other_axes_stay_inside_one():
    assert ids(gpt_neo.make_mesh(tiny_config(**TWO_SLICES))) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    # the slice axis need not come first: it still steps between the groups
    inner_first = tiny_config(mesh_shape="x:4,slice:2", dcn_axes="slice")
    assert ids(gpt_neo.make_mesh(inner_first)) == [[0, 4], [1, 5], [2, 6], [3, 7]]


def test_by_default_batch_is_split_across_slices_and_the_first_axis_inside():
    assert rules(tiny_config(**TWO_SLICES)).activations["batch"] == ("slice", "x")
    four = tiny_config(mesh_shape="x:2,slice:2,y:2", dcn_axes="slice")
    assert rules(four).activations["batch"] == ("slice", "x")
    assert rules(tiny_config(mesh_shape="x:4,y:2")).activations["batch"] == ("x",)  # unchanged


@pytest.mark.parametrize(
    ("keys", "named"),
    [
        ({"layout": "batch:x,heads:slice"}, "'heads' over slice"),
        ({"layout": "batch:slice+x", "param_layout": "embd:slice+x"}, "'embd' over slice"),
    ],
    ids=["tensor parallel", "FSDP"],
)
def test_a_model_parallel_split_across_slices_is_allowed_with_a_warning_of_its_cost(
    keys, named, capsys
):
    cfg = tiny_config(**TWO_SLICES, **keys)
    assert gpt_neo.make_mesh(cfg).shape == {"slice": 2, "x": 4}
    warnings = [line for line in capsys.readouterr().err.splitlines() if "dcn_axes" in line]
    assert len(warnings) == 1 and named in warnings[0]
    assert "data-centre network" in warnings[0]


def test_the_summary_says_which_axis_crosses_slices(capsys):
    print_summary(tiny_config(mesh_shape="x:2,slice:4", dcn_axes="slice"))
    out = capsys.readouterr().out
    assert "mesh: x:2,slice:4 (8 devices; slice across 4 slices (DCN))" in out
    assert "layout (activations): batch->slice+x" in out


def test_data_parallelism_across_slices_warns_of_nothing(capsys):
    gpt_neo.make_mesh(tiny_config(**TWO_SLICES, layout="batch:slice+x", param_layout="embd:x"))
    assert "warning" not in capsys.readouterr().err


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"dcn_axes": "pod"}, "names mesh axis 'pod', which mesh_shape 'slice:2,x:4'"),
        ({"dcn_axes": "slice+slice"}, "names a mesh axis twice"),
        ({"mesh_shape": None}, "set mesh_shape with those axes"),
        ({"mesh_shape": "auto"}, "set mesh_shape with those axes"),
    ],
    ids=["unknown axis", "twice", "no mesh_shape", "auto mesh_shape"],
)
def test_a_dcn_axis_the_mesh_cannot_have_is_one_clear_error(keys, message):
    with pytest.raises(ConfigError, match="dcn_axes") as error:
        tiny_config(**{**TWO_SLICES, **keys})
    assert message in str(error.value) and "\n" not in str(error.value)


def test_the_auto_layout_keeps_slices_data_parallel_and_fsdp_inside_a_slice():
    cfg = tiny_config(mesh_shape="auto", layout="auto", param_layout="auto", train_batch_size=8)
    candidates = [auto_layout.split_config(cfg, s) for s in auto_layout.splits(cfg, 8, slices=2)]
    assert candidates
    for chosen in candidates:
        assert chosen.mesh_shape.startswith("slice:2,") and chosen.dcn_axes == "slice"
        table = rules(chosen)
        assert table.activations["batch"][0] == "slice"
        model_parallel = {k: v for k, v in table.activations.items() if k != "batch"}
        assert not any("slice" in v for v in model_parallel.values()), chosen.layout
        assert not any("slice" in v for v in table.parameter_overrides().values())
    assert any(c.param_layout for c in candidates)  # FSDP is among them, inside slices


@pytest.mark.slow
def test_fsdp_inside_slices_and_data_parallel_across_them_trains_like_one_device():
    """10 Adam steps on 2 slices x 4 devices (weights split inside each slice, the batch over
    all 8) end at one device's loss and weights."""
    steps, lr = 10, 1e-2
    run = {"train_steps": steps, "lr": lr, "warmup_steps": 2, "train_batch_size": 8}
    rng = np.random.default_rng(3)
    length = tiny_config().n_ctx + 1
    batches = [Batch(rng.integers(0, 128, (8, length)).astype(np.int32)) for _ in range(steps)]

    one = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("x",))
    ref_state, ref_loss = train_on(tiny_config(**run, mesh_shape="x:1"), one, batches)
    sliced = tiny_config(**run, **TWO_SLICES, param_layout="embd:x")
    state, loss = train_on(sliced, gpt_neo.make_mesh(sliced), batches)
    assert abs(loss - ref_loss) <= 1e-5 * ref_loss
    assert_trained_alike(state["params"], ref_state["params"], lr)


@pytest.fixture(scope="module")
def two_v5e_slices():
    from gpt_neo.planning import aot

    return aot.topology_devices("v5e:2x2", 2)


@pytest.mark.tpu
def test_on_two_tpu_slices_each_row_of_the_mesh_is_one_slice(two_v5e_slices):
    # handed over interleaved, the devices are still grouped by their slice
    halves = (two_v5e_slices[:4], two_v5e_slices[4:])
    interleaved = [d for pair in zip(*halves, strict=True) for d in pair]
    mesh = gpt_neo.make_mesh(tiny_config(**TWO_SLICES), interleaved)
    assert [{d.slice_index for d in row} for row in mesh.devices] == [{0}, {1}]


@pytest.mark.tpu
@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"mesh_shape": "x:8", "dcn_axes": None}, "span 2 TPU slices and dcn_axes is unset"),
        ({"mesh_shape": "slice:4,x:2"}, "the devices come from 2 slices"),
    ],
    ids=["no dcn_axes", "wrong slice count"],
)
def test_a_mesh_that_does_not_match_the_slices_is_one_clear_error(two_v5e_slices, keys, message):
    with pytest.raises(ConfigError, match=message):
        gpt_neo.make_mesh(tiny_config(**{**TWO_SLICES, **keys}), two_v5e_slices)


@pytest.mark.tpu
def test_dcn_axes_on_one_tpu_slice_is_refused():
    from gpt_neo.planning import aot

    with pytest.raises(ConfigError, match="the TPU devices are one slice"):
        gpt_neo.make_mesh(tiny_config(**TWO_SLICES), aot.topology_devices("v5e:2x4", 1))


@pytest.mark.tpu
def test_across_slices_gradients_cross_the_dcn_as_shards_and_no_weight_is_gathered_over_it(
    two_v5e_slices,
):
    """The TPU program of FSDP inside 2 slices, data parallel across them. libtpu sends what
    crosses slices through its DCN runtime (`_xla_megascale_transfer_type` on host-transfer
    sends). Every such transfer is a gradient all-reduce (weights are gathered over the
    slice's interconnect only), and they carry about one step's gradient shard per device:
    gradients are reduced inside the slice first (reduce-scatter), then once across."""
    cfg = tiny_config(
        **TWO_SLICES,
        layout="batch:slice+x",
        param_layout="embd:x",
        n_embd=256,
        n_head=4,
        n_ctx=256,
        n_vocab=1024,
        train_batch_size=8,
        precision="bfloat16",
    )
    program = lowered_train_step(cfg, two_v5e_slices).compile().as_text()
    sent: dict[str, int] = {}
    for line in program.splitlines():
        kind = re.search(r'_xla_megascale_transfer_type="(\w+)"', line)
        if kind and " send(" in line:
            dims = re.search(r"= \(\w+\[([\d,]*)\]", line)
            assert dims is not None, line
            elements = math.prod(int(d) for d in dims.group(1).split(",") if d)
            sent[kind.group(1)] = sent.get(kind.group(1), 0) + elements
    assert set(sent) == {"ALL_REDUCE"}, sent
    state = Trainer(cfg, gpt_neo.make_mesh(cfg, two_v5e_slices)).abstract_state()
    params = jax.tree.leaves(state["params"])
    whole = sum(p.size for p in params)
    shard = sum(math.prod(p.sharding.shard_shape(p.shape)) for p in params)
    # Reduced inside the slice first, the gradients cross as shards: 1.07M elements here
    # against 0.81M of shards and 3.22M of whole gradients (the embedding's, a scatter-add,
    # crosses whole: XLA's partitioning). One all-reduce across slices per whole gradient
    # would send the 3.22M.
    assert shard <= sent["ALL_REDUCE"] <= 0.4 * whole

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
from gpt_neo import hardware
from gpt_neo.data.batch import Batch
from gpt_neo.errors import ConfigError
from gpt_neo.mesh import rules
from gpt_neo.planning import aot, auto_layout, roofline
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


V5E = hardware.CHIPS["TPU v5e"]
# weights large against activations: an 8-way tensor split halves them against a 4-way one
WIDE = {
    "n_embd": 1024,
    "n_head": 8,
    "n_layer": 2,
    "n_vocab": 4096,
    "attention_types": [[["global"], 2]],
}
AUTO = {"mesh_shape": "auto", "layout": "auto", "param_layout": "auto", "train_batch_size": 8}


def test_the_auto_layout_ranks_data_parallelism_across_slices_first_and_fsdp_inside_a_slice():
    ranked = auto_layout.rank(tiny_config(**AUTO), 8, V5E, None, slices=2)
    across = [c for c in ranked if c.cost.model_across_slices]
    data = [c for c in ranked if not c.cost.model_across_slices]
    assert across and data and ranked == data + across  # every data split before any other
    for chosen in (c.cfg for c in data):
        assert chosen.mesh_shape.startswith("slice:2,") and chosen.dcn_axes == "slice"
        table = rules(chosen)
        assert table.activations["batch"][0] == "slice"
        model_parallel = {k: v for k, v in table.activations.items() if k != "batch"}
        assert not any("slice" in v for v in model_parallel.values()), chosen.layout
        assert not any("slice" in v for v in table.parameter_overrides().values())
    assert any(c.cfg.param_layout for c in data)  # FSDP is among them, inside slices
    assert all("slice" in rules(c.cfg).activations["heads"] for c in across)


def test_a_model_parallel_split_across_slices_is_chosen_only_where_nothing_else_fits():
    cfg = tiny_config(**AUTO, **WIDE)
    free = auto_layout.rank(cfg, 8, V5E, None, slices=2)
    inside = min(c.memory.train_total for c in free if not c.cost.model_across_slices)
    across = min(c.memory.train_total for c in free if c.cost.model_across_slices)
    assert across < inside / (1 + auto_layout.PLANNER_MARGIN)  # 8-way against 4-way tensor
    assert not free[0].cost.model_across_slices  # memory not limited: data across slices
    tight = auto_layout.rank(cfg, 8, V5E, (across + inside) // 2, slices=2)
    assert tight[0].tier == 0 and tight[0].cost.model_across_slices
    assert "(across slices)" in tight[0].why()


def test_gradients_cross_slices_as_one_shard_per_device():
    """The estimate's traffic between slices, by hand: data parallel across 2 slices, each
    device's gradients are summed inside its slice first (a reduce-scatter), so what crosses
    is a 1/(devices per slice) piece, in the compute dtype; the embedding's gradient crosses
    in float32, its lookup's and its output head's parts apart (what the TPU compiler does:
    the HLO test below)."""

    def traffic(inside: int, **keys) -> roofline.Estimate:
        cfg = tiny_config(
            mesh_shape=f"slice:2,x:{inside}",
            dcn_axes="slice",
            layout="batch:slice+x",
            train_batch_size=8,
            precision="bfloat16",
            **keys,
        )
        return roofline.estimate(cfg, V5E)

    cfg = tiny_config()
    embedding = cfg.n_vocab * cfg.n_embd
    rest = sum(p.size for p in jax.tree.leaves(gpt_neo.init_params(cfg, seed=0))) - embedding
    for inside in (2, 4):
        # a ring all-reduce over 2 slices sends 2 (2 - 1) / 2 = 1x its operand
        assert traffic(inside).dcn_bytes == (rest * 2 + 2 * embedding * 4) / inside
    # the same bytes over the DCN's bandwidth, overlapped with compute like the ICI's
    assert traffic(4).dcn == traffic(4).dcn_bytes / V5E.dcn_bandwidth
    # FSDP inside the slice changes what crosses slices not at all
    assert traffic(4, param_layout="embd:x").dcn_bytes == traffic(4).dcn_bytes
    one_slice = roofline.estimate(tiny_config(mesh_shape="x:4", train_batch_size=8), V5E)
    assert one_slice.dcn_bytes == 0 and one_slice.ici_bytes > 0


# the shape of a compiled TPU program's cross-slice sends (libtpu 0.0.x), cut to what counts
SEND = (
    "  %send.{n} = ({dtype}[{dims}]{{2,1,0:T(8,128)(2,1)}}, u32[], token[]) send(%b.{n}, "
    "%after-all.{n}), channel_id={n}, is_host_transfer=true, frontend_attributes={{"
    '_xla_host_transfer_handler_name="xla_megascale_runtime",_xla_megascale_reduce_operation='
    '"SUM",_xla_megascale_transfer_type="ALL_REDUCE"}}'
)
PROGRAM = f"""HloModule jit_train_step

%layers.body (param.1: (s32[], bf16[4,8,128])) -> (s32[], bf16[4,8,128]) {{
  %param.1 = (s32[], bf16[4,8,128]) parameter(0)
{SEND.format(n=1, dtype="bf16", dims="4,8,128")}
  %inner = (s32[], f32[1]) while(%tuple.9), condition=%inner.cond, body=%inner.body
  %tuple.9 = (s32[], f32[1]) tuple(%constant.9, %x)
  %constant.9 = s32[] constant(0)
}}

%inner.body (param.2: (s32[], f32[1])) -> (s32[], f32[1]) {{
{SEND.format(n=2, dtype="f32", dims="1,8,128")}
}}

%inner.cond (param.3: (s32[], f32[1])) -> pred[] {{
  %constant.8 = s32[] constant(3)
  ROOT %lt.2 = pred[] compare(%gte.3, %constant.8), direction=LT
}}

%layers.cond (param.4: (s32[], bf16[4,8,128])) -> pred[] {{
  %constant.7 = s32[] constant(6)
  ROOT %lt.1 = pred[] compare(%gte.4, %constant.7), direction=LT
}}

ENTRY %main.1 (param.0: bf16[4,8,128]) -> bf16[4,8,128] {{
  %constant.1 = s32[] constant(1)
  %copy.1 = s32[]{{:T(128)}} copy(%constant.1)
  %tuple.1 = (s32[], bf16[4,8,128]) tuple(%copy.1, %param.0)
  %while.1 = (s32[], bf16[4,8,128]) while(%tuple.1), condition=%layers.cond, body=%layers.body
{SEND.format(n=3, dtype="f32", dims="2,8,128")}
}}
"""


def test_transfers_across_slices_are_counted_once_per_loop_trip():
    """A send in a loop runs once per trip: the peeled layer loop here (counter from 1 to 6: 5
    trips) sends 4x8x128 bfloat16 each trip; the loop inside it (0 to 3) one 1x8x128 float32
    per trip, 15 times in all; after the loop, one 2x8x128 float32."""
    count, sent = aot.dcn_transfers(PROGRAM)["ALL_REDUCE"]
    assert count == 5 + 15 + 1
    assert sent == 5 * 4 * 1024 * 2 + 15 * 1024 * 4 + 2 * 1024 * 4


@pytest.mark.tpu
def test_the_summary_prints_both_networks_traffic_and_the_compiled_transfers(capsys):
    cfg = tiny_config(
        **TWO_SLICES, layout="batch:slice+x", param_layout="embd:x", train_batch_size=8
    )
    print_summary(cfg)
    out = capsys.readouterr().out
    assert "over the chips' links (ICI)" in out and "across slices (DCN)" in out
    compiled = aot.Compiled(
        arguments=2**20,
        temporaries=2**20,
        outputs=0,
        aliased=0,
        flops=1e9,
        seconds=1.0,
        dcn={"ALL_REDUCE": (25, 3 * 2**20)},
    )
    devices = aot.topology_devices("v5e:2x2", 2)
    lines = aot.report(cfg, "v5e:2x2 x 2", devices, compiled)
    cost = roofline.estimate(cfg, V5E)
    assert any(
        f"{cost.dcn_bytes / 2**20:,.1f} MiB across slices (DCN, 3.12 GB/s" in line for line in lines
    )
    assert any(line.startswith("step time ESTIMATE with communication") for line in lines)
    assert any("25 all_reduce (3.0 MiB of operands" in line for line in lines)


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
    slice's interconnect only), and per step they carry about one gradient shard per device:
    gradients are reduced inside the slice first (reduce-scatter), then once across. The
    planner's estimate of those bytes is within 10% of the program's."""
    cfg = tiny_config(
        **TWO_SLICES,
        layout="batch:slice+x",
        param_layout="embd:x",
        n_embd=512,  # shards of 128 (a TPU tile's width): no padding in the transfers
        n_head=8,
        n_ctx=256,
        n_vocab=1024,
        attention_types=[[["global", "local"], 2]],
        local_attention_radius=64,
        train_batch_size=8,
        precision="bfloat16",
    )
    program = lowered_train_step(cfg, two_v5e_slices).compile().as_text()
    kinds, written = set(), 0  # each send as written in the program, loops not unrolled
    for line in program.splitlines():
        kind = re.search(r'_xla_megascale_transfer_type="(\w+)"', line)
        if kind and " send(" in line:
            operand = re.search(r"= \((bf16|f32)\[([\d,]*)\]", line)
            assert operand is not None, line
            kinds.add(kind.group(1))
            elements = math.prod(int(d) for d in operand.group(2).split(",") if d)
            written += elements * {"bf16": 2, "f32": 4}[operand.group(1)]
    assert kinds == {"ALL_REDUCE"}
    _, sent = aot.dcn_transfers(program)["ALL_REDUCE"]  # per step: loop trips counted
    assert sent >= written  # a send inside a loop counts once per trip

    state = Trainer(cfg, gpt_neo.make_mesh(cfg, two_v5e_slices)).abstract_state()
    params = jax.tree.leaves(state["params"])
    whole = sum(p.size for p in params)
    shard = sum(math.prod(p.sharding.shard_shape(p.shape)) for p in params)
    # one bfloat16 all-reduce per whole gradient would send 2 * whole bytes; a shard per
    # device (the embedding's twice, in float32: its lookup's and its head's) a quarter of it
    assert 2 * shard <= sent <= 0.4 * 2 * whole
    estimate = roofline.estimate(cfg, V5E).dcn_bytes  # a ring over 2 slices sends 1x
    assert abs(estimate / sent - 1) <= 0.10, (estimate, sent)

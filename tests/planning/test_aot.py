"""Compiling for a TPU slice on this CPU machine (libtpu's compiler, `jax.experimental
.topologies`): the programs a TPU would run, TPU kernels included, so a kernel that only fails
at Mosaic lowering fails here; and `--summary --topology`."""

import os
import re
import subprocess
import sys

import jax
import pytest

from gpt_neo.planning import aot
from tests.support.helpers import REPO, lowered_train_step, start_main, tiny_config, write_config

pytestmark = [pytest.mark.slow, pytest.mark.tpu]  # each compile: seconds of libtpu's compiler

# bfloat16, n_ctx a multiple of 128 (splash), global and local layers, heads split over y
SPLASH = dict(
    n_embd=256,
    n_head=4,
    n_layer=2,
    n_ctx=256,
    n_vocab=1024,
    attention_types=["global", "local"],
    local_attention_radius=128,
    train_batch_size=8,
    precision="bfloat16",
    mesh_shape="x:2,y:2",
    layout="batch:x,heads:y",
    train_steps=10,
)


@pytest.fixture(scope="module")
def v5e():
    return aot.topology_devices("v5e:2x2")


@pytest.mark.parametrize(
    ("topology", "devices"),
    [("v4:2x2x1", 4), ("v4:2x2x2", 8), ("v5p:2x2x1", 4), ("v3:2x2", 8), ("v5e:2x2", 4)],
)
def test_a_slice_has_the_devices_its_vms_show(topology, devices):
    """A v4-8's VM lists 4 devices (each chip's two cores run as one, megacore), as v5p's do;
    v3's VMs list each core (8 on a v3-8); v5e chips have one core."""
    assert len(aot.topology_devices(topology)) == devices
    assert len(aot.topology_devices(topology, num_slices=2)) == 2 * devices


# Llama/Qwen-style: 2 key/value heads for 4 query heads, both split over y; scaled scores
GROUPED = dict(
    n_kv_head=2, norm="rmsnorm", bias=False, qk_norm=True, scale_attn_weights=True, rotary_emb=True
)


def test_splash_attention_compiles_for_tpu_with_sharded_grouped_heads(v5e):
    lowered = lowered_train_step(tiny_config(**SPLASH, **GROUPED), v5e)
    # splash's Pallas kernels, forward and backward, global and local layers
    assert lowered.as_text().count("tpu_custom_call") >= 4
    compiled = lowered.compile()  # Mosaic lowers each kernel here
    assert compiled.memory_analysis().argument_size_in_bytes > 0


def test_packed_rows_compile_for_tpu_with_splash_segment_ids(v5e):
    unpacked = lowered_train_step(tiny_config(**SPLASH), v5e).as_text()
    cfg = tiny_config(**SPLASH, datasets=[["d", None, "packed", 1.0]])
    lowered = lowered_train_step(cfg, v5e)
    text = lowered.as_text()
    # the same splash kernels, now also reading each row's segment ids (more operands)
    assert text.count("tpu_custom_call") == unpacked.count("tpu_custom_call") >= 4
    assert _custom_call_operands(text) > _custom_call_operands(unpacked)
    lowered.compile()  # Mosaic lowers the segment-masked kernels


def _custom_call_operands(text: str) -> int:
    return sum(line.count("%") for line in text.splitlines() if "tpu_custom_call" in line)


def test_the_kernel_follows_the_mesh_platform_not_the_default_backend(v5e):
    """This process's backend is CPU either way: a CPU mesh gets XLA attention, a TPU mesh
    splash (before, both got the CPU variant)."""
    cfg = tiny_config(**SPLASH)
    assert jax.default_backend() == "cpu"
    assert "tpu_custom_call" not in lowered_train_step(cfg, jax.devices()[:4]).as_text()
    assert "tpu_custom_call" in lowered_train_step(cfg, v5e).as_text()


def test_moe_dispatch_compiles_for_tpu(v5e):
    cfg = tiny_config(
        **{**SPLASH, "layout": "batch:x,experts:y"},
        moe_layers=[1],
        moe_params={"moe_num_experts": 4, "moe_hidden_size": 256, "moe_gating": "dropless_top_k"},
    )
    text = lowered_train_step(cfg, v5e).as_text()
    assert "ragged_dot" in text  # TPU's grouped matmul, not the CPU's tiled stand-in
    lowered_train_step(cfg, v5e).compile()


@pytest.mark.tpu
def test_summary_topology_prints_the_compilers_memory_and_flops(tmp_path):
    model = write_config(tmp_path / "m.json", {**SPLASH, "model_path": str(tmp_path / "run")})
    process = start_main("--model", model, "--summary", "--topology", "v5e:2x2")
    out, _ = process.communicate(timeout=600)
    assert process.returncode == 0, out[-3000:]
    memory = next(line for line in out.splitlines() if line.startswith("per-device memory:"))
    assert "compiled" in memory and "HBM 15.75 GiB: fits" in memory
    estimated, compiled = (
        float(v) for v in re.findall(r"(?:estimated|compiled) ([\d.]+) GiB", memory)
    )
    assert estimated > 0 and compiled > 0
    assert "compiled the train step for v5e:2x2 (4 x TPU v5 lite)" in out
    assert "roofline ESTIMATE" in out
    sampling = next(line for line in out.splitlines() if line.startswith("compiled sampling"))
    assert "(1 prompt(s) of 128 tokens, 128 new, KV cache)" in sampling
    assert "HBM 15.75 GiB: fits" in sampling


@pytest.mark.tpu
@pytest.mark.parametrize(
    "flags, message",
    [
        (["--topology", "v9:9x9"], "--topology v9:9x9: the TPU runtime does not know it"),
        (["--topology", "v5e:2x2", "--set", "mesh_shape=x:4,y:2"], "needs 8 devices, the topology"),
        (  # 4 layers of n_embd 8192 replicated: 100 GB of weights and Adam moments per chip
            ["--topology", "v5e:2x2", "--set", "n_embd=8192", "--set", "n_head=64"],
            "--topology v5e:2x2: the train step does not fit in the chips' memory: XLA needs",
        ),
    ],
)
def test_bad_topologies_are_one_line(tmp_path, flags, message):
    model = write_config(tmp_path / "m.json", {**SPLASH, "model_path": str(tmp_path / "run")})
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "main.py"),
            "--model",
            model,
            "--summary",
            *flags,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0]


TOPOLOGY = ("--topology", "v5e:2x2")


@pytest.mark.tpu
def test_without_libtpu_the_flag_says_how_to_get_it(tmp_path):
    model = write_config(tmp_path / "m.json", {**SPLASH, "model_path": str(tmp_path / "run")})
    blocker = tmp_path / "blocked"
    blocker.mkdir()
    (blocker / "libtpu.py").write_text("raise ImportError('libtpu is not installed')\n")
    done = subprocess.run(
        [sys.executable, str(REPO / "main.py"), "--model", model, "--summary", *TOPOLOGY],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(blocker)},
    )
    assert done.returncode == 2, done.stdout + done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "pip install '.[tpu]'" in errors[0]


# context parallelism: bfloat16, the sequence split over 4 chips, rotary
CONTEXT = dict(
    n_embd=256,
    n_head=4,
    n_layer=2,
    n_ctx=512,
    n_vocab=1024,
    attention_types=["global", "global"],
    rotary_emb=True,
    train_batch_size=1,
    precision="bfloat16",
    mesh_shape="x:4",
    layout="sequence:x",
    train_steps=10,
)
PERMUTE_START = re.compile(r"^\s*(?:ROOT )?%(\S+) = .*collective-permute-start\(")
PERMUTE_DONE = re.compile(r"collective-permute-done\(%([^\s,)]+)")
COMPUTE = re.compile(r" (fusion|convolution|custom-call)\(")


def overlapped_permutes(program: str) -> list[int]:
    """For each asynchronous collective-permute of a compiled program, how many compute ops
    the schedule puts between its start and its done."""
    lines, starts, between = program.splitlines(), {}, []
    for index, line in enumerate(lines):
        if match := PERMUTE_START.match(line):
            starts[match.group(1)] = index
        if (match := PERMUTE_DONE.search(line)) and match.group(1) in starts:
            span = lines[starts[match.group(1)] + 1 : index]
            between.append(sum(bool(COMPUTE.search(op)) for op in span))
    return between


def test_the_ring_overlaps_its_permutes_with_the_attention_compute(v5e):
    cfg = tiny_config(**CONTEXT, context_parallel="ring")
    program = lowered_train_step(cfg, v5e).compile().as_text()
    assert not re.search(r"collective-permute\(", program)  # none synchronous
    overlapped = overlapped_permutes(program)
    # forward and backward rings of both layers: keys/values 3 hops a layer each way, the
    # gradients of keys and values 4 hops back (and the balanced order's permutes)
    assert len(overlapped) >= 2 * (3 + 3 + 4)
    assert sum(n > 0 for n in overlapped) >= 0.75 * len(overlapped)
    assert not re.search(r"all-gather(-start)?\(", program)  # the ring gathers nothing

    gathered = tiny_config(**CONTEXT, context_parallel="all_gather")
    program = lowered_train_step(gathered, v5e).compile().as_text()
    assert re.search(r"all-gather(-start)?\(", program)
    assert re.search(r"reduce-scatter(-start)?\(", program)  # the keys' gradients go home


def test_on_a_tpu_each_ring_block_is_the_splash_kernel_and_the_ring_still_overlaps(v5e):
    """Chunks of whole 128-token tiles (n_ctx 1024 over 4 chips, 2 chunks each): under
    `attention_kernel: auto` the TPU program runs every block of the walk in the splash kernel,
    forward (with its log-sum-exp) and backward, and no block as XLA scores."""
    cfg = tiny_config(**{**CONTEXT, "n_ctx": 1024}, context_parallel="ring")
    program = lowered_train_step(cfg, v5e).compile().as_text()
    kernels = set(re.findall(r"splash_mqa_(fwd|dkv|dq)_segmented", program))
    assert kernels == {"fwd", "dkv", "dq"}
    overlapped = overlapped_permutes(program)
    assert len(overlapped) >= 2 * (3 + 3 + 4)
    assert sum(n > 0 for n in overlapped) >= 0.75 * len(overlapped)

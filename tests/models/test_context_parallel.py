"""Context parallelism (`sequence:AXIS` in the layout): the same numbers as one device.

The model has every layer kind that attention treats differently under a sequence split (a
global layer, a local one whose window fits in a chunk, a linear one, an MoE layer), rotary,
grouped-query attention and packed segments that cross chunk and device boundaries; the
reference is the same model on one device, without any mesh.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gpt_neo
import gpt_neo.models.gpt
from gpt_neo.config import from_dict
from gpt_neo.data.batch import Batch
from gpt_neo.errors import ConfigError
from gpt_neo.inference import sample
from gpt_neo.mesh import check_layout
from gpt_neo.models import context
from gpt_neo.models.gpt import trunk
from main import main
from tests.support.helpers import (
    SMALL_RUN,
    assert_trained_alike,
    perturbed_params,
    tiny_config,
    train_on,
    write_config,
)

N_CTX = 64
MODEL = {
    "n_ctx": N_CTX,
    "n_head": 4,
    "n_kv_head": 2,
    "n_layer": 4,
    "attention_types": ["global", "local", "linear", "global"],
    "local_attention_radius": 4,  # 3 earlier keys: within one chunk at every split below
    "rotary_emb": True,
    "moe_layers": [3],
    "moe_params": {"moe_num_experts": 4, "moe_hidden_size": 32, "moe_gating": "dropless_top_k"},
    "train_batch_size": 2,
}
# (mesh_shape, layout, param_layout): the three layouts, the first with FSDP on the
# same axis as the sequence
LAYOUTS = [
    ("x:8", "sequence:x", "embd:x"),
    ("x:2,y:4", "batch:x,sequence:y", None),
    ("x:4,y:2", "sequence:x,heads:y", None),
]


def packed_segments(batch: int, length: int, seed: int = 0) -> np.ndarray:
    """Documents of random lengths (crossing chunk and device boundaries), then padding (0)."""
    rng = np.random.default_rng(seed)
    rows = np.zeros((batch, length), np.int32)
    for row in rows:
        cuts = np.sort(rng.choice(np.arange(1, length - 4), 3, replace=False))
        for segment, (start, end) in enumerate(
            zip([0, *cuts], [*cuts, length - 3], strict=True), start=1
        ):
            row[start:end] = segment
    return rows


def hidden_and_grads(cfg, params, tokens, segments, mesh=None):
    """The residual stream after the last block, and the gradient of a loss on all of it."""

    def hidden(p):
        return trunk(cfg, p, tokens, segment_ids=segments)[0].astype(jnp.float32)

    def run():
        x = jax.jit(hidden)(params)
        grads = jax.jit(jax.grad(lambda p: jnp.mean(jnp.square(hidden(p)))))(params)
        return x, grads

    if mesh is None:
        return run()
    with jax.set_mesh(mesh):
        return run()


@pytest.fixture(scope="module")
def one_device():
    cfg = tiny_config(**MODEL)
    params = perturbed_params(cfg, 0)
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, cfg.n_vocab, (2, N_CTX)), jnp.int32)
    segments = jnp.asarray(packed_segments(2, N_CTX))
    return params, tokens, segments, hidden_and_grads(cfg, params, tokens, segments)


def assert_grads_close(grads, reference, rtol=1e-5):
    """Each gradient within `rtol` of its reference's largest entry."""
    named = jax.tree_util.tree_leaves_with_path(grads)
    for (path, a), b in zip(named, jax.tree.leaves(reference), strict=True):
        scale = float(jnp.abs(b).max()) or 1.0
        error = float(jnp.abs(a - b).max()) / scale
        assert error <= rtol, f"{jax.tree_util.keystr(path)}: {error:.2e} of its largest entry"


@pytest.mark.slow
@pytest.mark.parametrize("implementation", ["all_gather", "ring"])
@pytest.mark.parametrize(("mesh_shape", "layout", "param_layout"), LAYOUTS)
def test_a_sequence_split_equals_one_device(
    one_device, mesh_shape, layout, param_layout, implementation, monkeypatch
):
    params, tokens, segments, (ref_x, ref_grads) = one_device
    if "heads" in layout:  # and queries in blocks of 4 (8 per part of a chunk here)
        monkeypatch.setattr(context, "QUERY_BLOCK", 4)
    cfg = tiny_config(
        **MODEL,
        mesh_shape=mesh_shape,
        layout=layout,
        param_layout=param_layout,
        context_parallel=implementation,
    )
    x, grads = hidden_and_grads(cfg, params, tokens, segments, gpt_neo.make_mesh(cfg))
    np.testing.assert_allclose(x, ref_x, atol=1e-5)
    assert_grads_close(grads, ref_grads)


@pytest.mark.slow
@pytest.mark.parametrize(
    "keys",
    [
        # a window longer than a chunk (7 earlier keys, chunks of 4): gathered, not a halo;
        # learned positions, which the balanced order permutes with the tokens
        {"attention_types": ["global", "local"], "local_attention_radius": 8},
        # a masked LM: bidirectional, so the sequence stays in order and is gathered (its
        # linear attention takes no packed segments: unpacked rows)
        {"attention_types": ["global", "local", "linear"], "mlm_training": True, "mlm_mask_id": 3},
    ],
    ids=["window past a chunk", "masked LM"],
)
def test_gathered_paths_equal_one_device(keys):
    model = {"n_ctx": N_CTX, "n_head": 4, "n_layer": len(keys["attention_types"]), **keys}
    model.setdefault("local_attention_radius", 4)
    cfg = tiny_config(**model, train_batch_size=2)
    params = perturbed_params(cfg, 0)
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, cfg.n_vocab, (2, N_CTX)), jnp.int32)
    segments = None if cfg.mlm_training else jnp.asarray(packed_segments(2, N_CTX, seed=3))
    ref_x, ref_grads = hidden_and_grads(cfg, params, tokens, segments)
    split = cfg.replace(mesh_shape="x:8", layout="sequence:x")
    x, grads = hidden_and_grads(split, params, tokens, segments, gpt_neo.make_mesh(split))
    np.testing.assert_allclose(x, ref_x, atol=1e-5)
    assert_grads_close(grads, ref_grads)


def test_the_balanced_order_puts_opposite_chunks_together_and_inverts():
    cfg = tiny_config(
        n_ctx=N_CTX, mesh_shape="x:4,y:2", layout="sequence:x,batch:y", train_batch_size=2
    )
    mesh = gpt_neo.make_mesh(cfg)
    tokens = jnp.broadcast_to(jnp.arange(N_CTX, dtype=jnp.int32), (2, N_CTX))
    with jax.set_mesh(mesh):
        balanced = jax.jit(lambda t: context.to_balanced(cfg, t))(tokens)
        back = jax.jit(lambda t: context.to_contiguous(cfg, t, (None, "seq")))(balanced)
    chunks = np.arange(N_CTX).reshape(8, N_CTX // 8)  # 2 chunks per device
    for device in range(4):
        expected = np.concatenate([chunks[device], chunks[7 - device]])
        np.testing.assert_array_equal(
            np.asarray(balanced)[0, device * 16 : (device + 1) * 16], expected
        )
    np.testing.assert_array_equal(back, tokens)


@pytest.mark.slow
def test_training_on_a_sequence_split_ends_where_one_device_does():
    steps, lr = 20, 1e-2
    # without the MoE layer: its balancing loss is a mean over routing groups, which follow
    # the token order, and so the layout (gpt_neo.models.moe)
    model = {**MODEL, "moe_layers": [], "moe_params": None}
    run = {**model, "train_steps": steps, "lr": lr, "warmup_steps": 2}
    rng = np.random.default_rng(4)
    batches = [
        Batch(
            rng.integers(0, 128, (2, N_CTX + 1)).astype(np.int32),
            packed_segments(2, N_CTX + 1, seed=int(rng.integers(1 << 30))),
        )
        for _ in range(steps)
    ]

    one = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("x",))
    ref_state, ref_loss = train_on(tiny_config(**run, mesh_shape="x:1"), one, batches)
    split = tiny_config(**run, mesh_shape="x:4,y:2", layout="sequence:x,batch:y")
    state, loss = train_on(split, gpt_neo.make_mesh(split), batches)
    assert abs(loss - ref_loss) <= 1e-5 * ref_loss
    assert_trained_alike(state["params"], ref_state["params"], lr)


@pytest.mark.slow
@pytest.mark.parametrize("implementation", ["all_gather", "ring"])
def test_the_splash_kernel_on_each_block_equals_one_device(implementation):
    """`attention_kernel: splash` under a sequence split: every block of the walk is the Pallas
    splash kernel (in its interpreter here, as on a TPU under `auto`), its gradients from
    the merged log-sum-exp; the reference is XLA attention on one device. Chunks of 128
    tokens, the kernel's tile; packed segments cross them."""
    n_ctx = 512
    model = {**MODEL, "n_ctx": n_ctx, "n_layer": 2, "attention_types": ["global", "local"]}
    model.update(moe_layers=[], moe_params=None, train_batch_size=2)
    cfg = tiny_config(**model)
    params = perturbed_params(cfg, 0)
    tokens = jnp.asarray(np.random.default_rng(4).integers(0, cfg.n_vocab, (2, n_ctx)), jnp.int32)
    segments = jnp.asarray(packed_segments(2, n_ctx, seed=5))
    ref_x, ref_grads = hidden_and_grads(cfg, params, tokens, segments)
    split = cfg.replace(
        mesh_shape="x:2",
        layout="sequence:x",
        attention_kernel="splash",
        context_parallel=implementation,
    )
    mesh = gpt_neo.make_mesh(split, jax.devices()[:2])  # the interpreter is slow: 2 devices
    with jax.set_mesh(mesh):
        assert context.block_kernel(split, None, n_ctx // 2) == "splash"
    x, grads = hidden_and_grads(split, params, tokens, segments, mesh)
    np.testing.assert_allclose(x, ref_x, atol=1e-5)
    assert_grads_close(grads, ref_grads)


def model_config(**keys):
    base = {"n_embd": 64, "n_vocab": 128, **MODEL, "mesh_shape": "x:8", "layout": "sequence:x"}
    return from_dict({**base, **keys})


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"n_ctx": 40}, "needs n_ctx to be a multiple of 16"),
        (
            {"context_parallel": "ring", "local_attention_radius": 9},
            "context_parallel 'ring' over chunks of 4 tokens",
        ),
        ({"attention_kernel": "cudnn"}, "attention_kernel 'cudnn' computes whole sequences"),
        ({"attention_kernel": "splash"}, "only when they are multiples of 128 tokens"),
        ({"attn_dropout": 0.1}, "set attn_dropout to 0"),
        (
            {"layout": "sequence:x,features_per_head:y", "mesh_shape": "x:4,y:2"},
            "features_per_head",
        ),
        (
            {
                "context_parallel": "ring",
                "mlm_training": True,
                "mlm_mask_id": 3,
                "moe_layers": [],
                "moe_params": None,
            },
            "set context_parallel to 'all_gather'",
        ),
    ],
    ids=["n_ctx", "ring window", "cudnn", "splash chunks", "dropout", "head dim", "ring mlm"],
)
def test_a_split_attention_cannot_run_is_one_clear_error(keys, message):
    cfg = model_config(**keys)
    with pytest.raises(ConfigError, match=r"layout|context_parallel") as error:
        check_layout(cfg, "cfg.json")
    assert message in str(error.value)
    assert "\n" not in str(error.value)


@pytest.mark.slow
def test_decoding_keeps_the_cache_split_along_the_sequence_and_equals_one_device(one_device):
    params, *_ = one_device
    prompts = [list(range(5, 42)), list(range(9, 29))]  # 37 and 20 tokens: neither divides
    reference = gpt_neo.generate(
        tiny_config(**MODEL), params, prompts, max_new_tokens=11, temperature=0
    )
    cfg = tiny_config(**MODEL, mesh_shape="x:4,y:2", layout="sequence:x,batch:y")
    mesh = gpt_neo.make_mesh(cfg)
    placed = jax.device_put(params, gpt_neo.models.gpt.param_shardings(cfg, mesh))
    assert gpt_neo.generate(cfg, placed, prompts, max_new_tokens=11, temperature=0) == reference

    decoder = sample.Decoder(cfg, sample.Sampling(0.0), 11, None, slot_multiple=4)
    tokens = jnp.zeros((2, 40), jnp.int32)  # the prompts, left-padded to a multiple of 4
    with jax.set_mesh(mesh):
        _, layers, *_ = jax.jit(decoder.prefill)(placed, tokens, jnp.asarray([37, 20]))
    keys, values = layers[0]
    assert keys.shape[-1] == 52  # 40 + 11 slots, rounded up to a multiple of 4
    assert keys.sharding.spec[3] == "x" and values.sharding.spec[2] == "x"


def test_the_command_line_refuses_it_before_compiling_with_exit_2(tmp_path, capsys):
    keys = {**SMALL_RUN, "mesh_shape": "x:8", "layout": "sequence:x", "n_ctx": 40}
    model = write_config(tmp_path / "split.json", keys)
    assert main(["--model", model, "--summary"]) == 2
    err = capsys.readouterr().err.strip()
    assert "layout splits 'sequence' 8 ways (mesh axes x)" in err
    assert "needs n_ctx to be a multiple of 16" in err and len(err.splitlines()) == 1

"""mesh_shape/layout/param_layout -> Mesh and rules; impossible layouts fail before anything
compiles, with one line naming the key and the fix."""

import jax
import pytest
from jax.sharding import PartitionSpec as P

import gpt_neo
from gpt_neo import axes
from gpt_neo.errors import ConfigError
from gpt_neo.mesh import activation_spec, padded_vocab, param_spec, rules
from tests.support.helpers import tiny_config


def test_mesh_shape_builds_named_mesh_over_all_devices():
    mesh = gpt_neo.make_mesh(tiny_config(mesh_shape="x:4,y:2"))
    assert dict(mesh.shape) == {"x": 4, "y": 2}
    assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in jax.devices())


def test_missing_mesh_shape_means_data_parallel_over_every_device():
    cfg = tiny_config()
    mesh = gpt_neo.make_mesh(cfg)
    assert dict(mesh.shape) == {"x": 8}
    assert activation_spec(cfg, axes.HIDDEN) == P("x", None, None)


def test_mesh_size_must_equal_device_count():
    with pytest.raises(ConfigError) as err:
        gpt_neo.make_mesh(tiny_config(mesh_shape="x:2,y:2"))
    assert "needs 4 devices but 8 cpu device(s)" in str(err.value)
    assert "xla_force_host_platform_device_count" in str(err.value)


def test_gpt_neo_layout_names_map_to_logical_axes():
    # The layout of GPT-Neo's released 1.3B model (its Colab notebook).
    cfg = tiny_config(
        mesh_shape="x:4,y:2", layout="intermediate_expanded:x,heads:x,memory_length:y,embd:y"
    )
    expected = {"mlp": ("x",), "heads": ("x",), "kv_seq": ("y",), "embd": ("y",)}
    expected["kv_heads"] = ("x",)  # key/value heads follow heads (one per query head here)
    assert rules(cfg).activations == rules(cfg).parameters == expected
    assert param_spec(cfg, axes.QKV) == P("y", "x", None)
    assert activation_spec(cfg, axes.KEYS_VALUES) == P(None, "y", "x", None)


def test_every_gpt_neo_dimension_name_is_accepted():
    for name, logical in axes.GPT_NEO_NAMES.items():
        cfg = tiny_config(mesh_shape="x:8", layout=f"{name}:x", train_batch_size=8)
        table = dict(rules(cfg).activations)
        assert table.pop(logical) == ("x",)
        # the rules derived from it: key/value heads follow heads, their positions the sequence
        derived = {axes.HEADS: {axes.KV_HEADS: ("x",)}, axes.SEQ: {axes.KV_SEQ: ("x",)}}
        assert table == derived.get(logical, {})


def test_param_layout_rules_parameters_on_top_of_layout():
    cfg = tiny_config(mesh_shape="x:4,y:2", layout="batch:x,heads:y", param_layout="embd:x")
    assert activation_spec(cfg, axes.HIDDEN) == P("x", None, None)  # activations: layout only
    assert activation_spec(cfg, axes.QUERIES) == P("x", None, "y", None)
    assert param_spec(cfg, axes.QKV) == P("x", "y", None)  # parameters: both
    assert param_spec(cfg, axes.MLP_IN_BIAS) == P(None)


def test_a_dimension_may_span_several_mesh_axes():
    cfg = tiny_config(mesh_shape="x:2,y:2,z:2", layout="batch:x+z,heads:y")
    assert activation_spec(cfg, axes.QUERIES) == P(("x", "z"), None, "y", None)
    mesh = gpt_neo.make_mesh(cfg)
    params = gpt_neo.init_params(cfg, 0, mesh)
    logits = gpt_neo.apply(cfg, params, jax.numpy.zeros((4, 8), jax.numpy.int32))
    assert logits.sharding.spec[0] == ("x", "z")


def test_unknown_mesh_axis_in_layout():
    with pytest.raises(ConfigError, match="mesh axis 'z', which the mesh does not define"):
        tiny_config(mesh_shape="x:4,y:2", layout="batch:z")


def test_unknown_layout_dimension_suggests():
    with pytest.raises(ConfigError, match=r"unknown tensor dimension 'head'.*Did you mean 'heads'"):
        tiny_config(mesh_shape="x:8", layout="head:x")


def test_dimension_not_divisible_by_its_mesh_axis():
    with pytest.raises(ConfigError, match=r"layout maps 'heads' \(size 8\) to mesh axes x \(16"):
        tiny_config(mesh_shape="x:16", layout="heads:x")
    with pytest.raises(ConfigError, match=r"'batch' \(size 6\)"):
        tiny_config(mesh_shape="x:4,y:2", layout="batch:x", train_batch_size=6)
    with pytest.raises(ConfigError, match=r"'batch' \(size 4\) to mesh axes x\+y \(8 pieces\)"):
        tiny_config(mesh_shape="x:4,y:2", layout="batch:x+y", train_batch_size=4)


def test_two_dims_of_one_tensor_on_one_mesh_axis():
    with pytest.raises(ConfigError) as err:
        tiny_config(mesh_shape="x:4,y:2", layout="batch:x,embd:x")
    assert "'batch' and 'embd'" in str(err.value) and "mesh axis 'x'" in str(err.value)
    with pytest.raises(ConfigError, match="'kv_seq' and 'heads'"):
        tiny_config(mesh_shape="x:4,y:2", layout="heads:y,memory_length:y")


def test_fsdp_shares_the_data_axis_between_activations_and_parameters():
    # `batch:x,embd:x` in one table splits the hidden activation twice over x; with the
    # weights' split in param_layout it is FSDP.
    cfg = tiny_config(mesh_shape="x:8", layout="batch:x", param_layout="embd:x")
    assert param_spec(cfg, axes.TOKEN_EMBEDDING) == P(None, "x")


def test_one_dim_on_two_mesh_axes_is_written_with_a_plus():
    with pytest.raises(ConfigError, match=r"maps 'batch' twice.*batch:x\+y"):
        tiny_config(mesh_shape="x:4,y:2", layout="batch:x,batch:y")
    with pytest.raises(ConfigError, match="names a mesh axis twice"):
        tiny_config(mesh_shape="x:4,y:2", layout="batch:x+x")


@pytest.mark.parametrize(
    "param_layout, message",
    [
        ("head:x", r"param_layout 'head:x': unknown tensor dimension 'head'.*Did you mean 'heads'"),
        ("embd:q", "param_layout 'embd:q' maps 'embd' to mesh axis 'q', which the mesh does not"),
        ("heads:x", r"param_layout maps 'heads' \(size 2\) to mesh axes x \(4 pieces\)"),
        ("embd:x,heads:x", "param_layout .* maps both 'embd' and 'heads' of tensor attn q"),
        ("mlp", "param_layout 'mlp': 'mlp' is not dim:mesh_axis"),
    ],
)
def test_bad_param_layouts_name_the_key_and_the_fix(param_layout, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config(n_head=2, mesh_shape="x:4,y:2", layout="batch:x", param_layout=param_layout)


def test_bad_param_layout_from_the_command_line_is_one_line_and_exit_2(tmp_path, capsys):
    from gpt_neo.cli.main import main

    code = main(["--model", "configs/demo.json", "--summary", "--set", "param_layout=embd:q"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "param_layout 'embd:q'" in err and "mesh_shape" in err


@pytest.mark.parametrize("bad", ["x4", "x:0", "x:2,x:4", "x:two", ""])
def test_malformed_mesh_shape(bad):
    with pytest.raises(ConfigError, match="mesh_shape"):
        tiny_config(mesh_shape=bad)


def test_apply_rejects_batch_not_divisible_by_batch_axis():
    cfg = tiny_config(mesh_shape="x:8")
    params = gpt_neo.init_params(cfg, 0, gpt_neo.make_mesh(cfg))
    with pytest.raises(ConfigError, match="batch size 4 is not divisible"):
        gpt_neo.apply(cfg, params, jax.numpy.zeros((4, 8), jax.numpy.int32))


# --- vocabulary padding ------------------------------------------------------------------


def test_gpt_neo_vocabulary_split_two_ways_pads_to_a_multiple_of_128():
    cfg = tiny_config(n_vocab=50257, mesh_shape="x:4,y:2", layout="batch:x,vocab:y")
    assert padded_vocab(cfg) == 50304  # Megatron's and GPT-Neo's own padded size
    assert padded_vocab(cfg.replace(layout="batch:x")) == 50257  # not split: not padded
    assert padded_vocab(tiny_config(n_vocab=50304, mesh_shape="x:8", layout="vocab:x")) == 50304


def test_padding_multiple_is_the_smallest_multiple_of_128_the_split_divides():
    assert padded_vocab(tiny_config(n_vocab=1001, mesh_shape="x:2,y:4", layout="vocab:y")) == 1024
    cfg = tiny_config(n_vocab=1001, mesh_shape="x:1,y:3", layout="vocab:y", n_head=1)
    assert padded_vocab(cfg) == 1152  # lcm(128, 3) = 384


def test_an_explicit_pad_multiple_pads_always_and_must_suit_the_split():
    assert padded_vocab(tiny_config(n_vocab=1001, vocab_pad_multiple=64)) == 1024
    with pytest.raises(ConfigError, match="Set vocab_pad_multiple to a multiple of 4"):
        tiny_config(n_vocab=1001, vocab_pad_multiple=2, mesh_shape="x:2,y:4", layout="vocab:y")


def test_a_parameter_only_vocab_split_pads_too():
    cfg = tiny_config(n_vocab=211, mesh_shape="x:4,y:2", layout="batch:x", param_layout="vocab:y")
    assert padded_vocab(cfg) == 256


def test_key_value_heads_follow_heads_where_they_divide_and_an_explicit_split_must_divide():
    gqa = dict(mesh_shape="x:2,y:4", layout="batch:x,heads:y", n_kv_head=2)
    assert rules(tiny_config(**gqa)).activations.get("kv_heads") is None  # 2 heads, 4 pieces
    assert rules(tiny_config(**{**gqa, "n_kv_head": 4})).activations["kv_heads"] == ("y",)
    with pytest.raises(ConfigError, match=r"does not divide n_kv_head.*Leave kv_heads out"):
        tiny_config(**{**gqa, "layout": "batch:x,heads:y,kv_heads:y"})

"""mesh_shape/layout -> Mesh and rules; impossible layouts fail before anything compiles."""

import jax
import pytest
from jax.sharding import PartitionSpec as P

import gpt_neo
from gpt_neo.config import ConfigError
from gpt_neo.mesh import GPT_NEO_DIMS, layout_rules, logical_spec
from tests.helpers import tiny_config


def test_mesh_shape_builds_named_mesh_over_all_devices():
    mesh = gpt_neo.make_mesh(tiny_config(mesh_shape="x:4,y:2"))
    assert dict(mesh.shape) == {"x": 4, "y": 2}
    assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in jax.devices())


def test_missing_mesh_shape_means_data_parallel_over_every_device():
    cfg = tiny_config()
    mesh = gpt_neo.make_mesh(cfg)
    assert dict(mesh.shape) == {"x": 8}
    assert logical_spec(cfg, ("batch", "seq", "embd")) == P("x", None, None)


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
    assert layout_rules(cfg) == {"mlp": "x", "heads": "x", "kv_seq": "y", "embd": "y"}
    assert logical_spec(cfg, ("embd", "heads", "kv")) == P("y", "x", None)
    assert logical_spec(cfg, ("batch", "kv_seq", "heads", "kv")) == P(None, "y", "x", None)


def test_every_gpt_neo_dimension_name_is_accepted():
    for name in GPT_NEO_DIMS:
        cfg = tiny_config(mesh_shape="x:8", layout=f"{name}:x", train_batch_size=8)
        assert list(layout_rules(cfg).values()) == ["x"]


def test_unknown_mesh_axis_in_layout():
    with pytest.raises(ConfigError, match="mesh axis 'z', which mesh_shape 'x:4,y:2' does not"):
        tiny_config(mesh_shape="x:4,y:2", layout="batch:z")


def test_unknown_layout_dimension_suggests():
    with pytest.raises(ConfigError, match=r"unknown tensor dimension 'head'.*Did you mean 'heads'"):
        tiny_config(mesh_shape="x:8", layout="head:x")


def test_dimension_not_divisible_by_its_mesh_axis():
    with pytest.raises(ConfigError, match=r"'heads' \(size 8\) to mesh axis 'x' of size 16"):
        tiny_config(mesh_shape="x:16", layout="heads:x")
    with pytest.raises(ConfigError, match=r"'batch' \(size 6\)"):
        tiny_config(mesh_shape="x:4,y:2", layout="batch:x", train_batch_size=6)


def test_two_dims_of_one_tensor_on_one_mesh_axis():
    with pytest.raises(ConfigError) as err:
        tiny_config(mesh_shape="x:4,y:2", layout="batch:x,embd:x")
    assert "'batch' and 'embd'" in str(err.value) and "mesh axis 'x'" in str(err.value)
    with pytest.raises(ConfigError, match="'kv_seq' and 'heads'"):
        tiny_config(mesh_shape="x:4,y:2", layout="heads:y,memory_length:y")


def test_one_dim_on_two_mesh_axes():
    with pytest.raises(ConfigError, match="maps 'batch' twice"):
        tiny_config(mesh_shape="x:4,y:2", layout="batch:x,batch:y")


@pytest.mark.parametrize("bad", ["x4", "x:0", "x:2,x:4", "x:two", ""])
def test_malformed_mesh_shape(bad):
    with pytest.raises(ConfigError, match="mesh_shape"):
        tiny_config(mesh_shape=bad)


def test_apply_rejects_batch_not_divisible_by_batch_axis():
    cfg = tiny_config(mesh_shape="x:8")
    params = gpt_neo.init_params(cfg, 0, gpt_neo.make_mesh(cfg))
    with pytest.raises(ConfigError, match="batch size 4 is not divisible"):
        gpt_neo.apply(cfg, params, jax.numpy.zeros((4, 8), jax.numpy.int32))

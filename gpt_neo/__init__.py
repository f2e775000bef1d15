"""gpt-neo: GPT-Neo's JSON-configured language models on JAX named-mesh sharding.

`import gpt_neo` imports neither JAX nor TensorFlow: the names below load on first use, so a
command line can choose the platform (`--tpu`, `--gpu_ids`) before JAX starts.
"""

import importlib
import os
import typing

os.environ.setdefault(
    "TF_CPP_MIN_LOG_LEVEL", "2"
)  # TensorFlow (data only) logs errors, not chatter

from gpt_neo.config import Config
from gpt_neo.errors import ConfigError, DataError, UserError

if typing.TYPE_CHECKING:  # what the lazy names below are, for type checkers and editors
    from gpt_neo.inference.apply import apply
    from gpt_neo.inference.sample import generate
    from gpt_neo.interop import hf
    from gpt_neo.mesh import make_mesh
    from gpt_neo.models.gpt import init_params
    from gpt_neo.planning.auto_layout import choose_layout

# name -> module that defines it, imported when the name is first used
_LAZY = {
    "make_mesh": "gpt_neo.mesh",
    "init_params": "gpt_neo.models.gpt",
    "apply": "gpt_neo.inference.apply",
    "generate": "gpt_neo.inference.sample",
    "choose_layout": "gpt_neo.planning.auto_layout",
}

__all__ = [
    "Config",
    "ConfigError",
    "DataError",
    "UserError",
    "apply",
    "choose_layout",
    "generate",
    "hf",
    "init_params",
    "load_config",
    "make_mesh",
]


def load_config(path_or_paths, overrides=None) -> Config:
    """Read, merge and validate GPT-Neo JSON config(s) (see `gpt_neo.config.load_config`), and
    check that `mesh_shape`, `layout` and `param_layout` fit the model's tensors. Raises
    `ConfigError`."""
    from gpt_neo import config, mesh  # mesh imports JAX: loaded on first use, not on import

    cfg = config.load_config(path_or_paths, overrides)
    mesh.check_layout(cfg, config.source_of(path_or_paths))
    return cfg


def __getattr__(name):
    if name == "hf":
        return importlib.import_module("gpt_neo.interop.hf")
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'gpt_neo' has no attribute {name!r}")

"""gpt-neo: GPT-Neo's JSON-configured language models on JAX named-mesh sharding."""

import os

os.environ.setdefault(
    "TF_CPP_MIN_LOG_LEVEL", "2"
)  # TensorFlow (data only) logs errors, not chatter

from gpt_neo.config import Config, ConfigError, load_config
from gpt_neo.mesh import make_mesh
from gpt_neo.models.gpt import apply, init_params

__all__ = [
    "Config",
    "ConfigError",
    "apply",
    "generate",
    "hf",
    "init_params",
    "load_config",
    "make_mesh",
]


def __getattr__(name):
    # `gpt_neo.hf` is imported on first use: it pulls in safetensors, which plain training
    # does not need.
    if name == "hf":
        import importlib

        return importlib.import_module("gpt_neo.hf")
    if name == "generate":
        from gpt_neo.sample import generate

        return generate
    raise AttributeError(f"module 'gpt_neo' has no attribute {name!r}")

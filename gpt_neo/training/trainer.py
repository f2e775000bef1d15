"""The trainer: for one config and mesh, the train state's shardings, its initialisation, the
jitted step, and the placement of each host's batch rows.

The train state is one pytree: `{"params", "opt_state", "step", "rng"}`; the input pipeline's
position is saved next to it in every checkpoint, so a restored run continues bit for bit.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from gpt_neo import axes
from gpt_neo.config import Config
from gpt_neo.data.batch import Batch
from gpt_neo.errors import ConfigError
from gpt_neo.mesh import activation_spec, batch_axes, data_parallel_size
from gpt_neo.models.gpt import abstract_params, init_params
from gpt_neo.training.memory import num_microbatches
from gpt_neo.training.optim import make_optimizer, state_shardings
from gpt_neo.training.step import train_step


class Trainer:
    """The jitted step and the shardings of everything it touches, for one config and mesh."""

    def __init__(self, cfg: Config, mesh: Mesh, *, batch_size: int | None = None):
        self.cfg, self.mesh = cfg, mesh
        batch_size = batch_size or cfg.train_batch_size
        if not batch_size:
            raise ConfigError("set train_batch_size in the config")
        self.batch_size: int = batch_size
        batch_spec = activation_spec(cfg, (axes.BATCH, None))
        self.data_parallel = data_parallel_size(cfg, mesh)
        if self.batch_size % self.data_parallel:
            raise ConfigError(
                f"train_batch_size {self.batch_size} is not divisible by the data-parallel size "
                f"{self.data_parallel} (mesh axes {'+'.join(batch_axes(cfg))})"
            )
        self.n_micro = num_microbatches(cfg, self.batch_size, self.data_parallel)
        self.optimizer = make_optimizer(cfg)
        self.batch_sharding = NamedSharding(mesh, batch_spec)
        self.replicated = NamedSharding(mesh, P())
        self.state_shardings = self._state_shardings()
        step = functools.partial(train_step, cfg, self.optimizer, self.n_micro)
        self.step = jax.jit(
            step,
            in_shardings=(self.state_shardings, self.batch_sharding),
            out_shardings=(self.state_shardings, self.replicated),
            donate_argnums=0,
        )

    def _state_shardings(self):
        params = abstract_params(self.cfg, self.mesh)
        return {
            "params": jax.tree.map(lambda p: p.sharding, params),
            "opt_state": state_shardings(self.optimizer, params, self.replicated),
            "step": self.replicated,
            "rng": self.replicated,
        }

    def abstract_state(self):
        """Shapes, dtypes and shardings of the state (the target of a checkpoint restore)."""
        params = abstract_params(self.cfg, self.mesh)
        shapes = {
            "params": params,
            "opt_state": jax.eval_shape(self.optimizer.init, params),
            "step": jax.ShapeDtypeStruct((), jnp.int32),
            "rng": jax.ShapeDtypeStruct((2,), jnp.uint32),
        }
        return jax.tree.map(
            lambda s, sharding: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
            shapes,
            self.state_shardings,
        )

    def init_state(self, seed: int):
        params = init_params(self.cfg, seed, self.mesh)
        opt_state = jax.jit(self.optimizer.init, out_shardings=self.state_shardings["opt_state"])(
            params
        )
        rng = jax.random.key_data(jax.random.key(seed ^ 0x5EED))
        return {
            "params": params,
            "opt_state": opt_state,
            "step": jax.device_put(jnp.int32(0), self.replicated),
            "rng": jax.device_put(rng.astype(jnp.uint32), self.replicated),
        }

    def place(self, host_batch: Batch | np.ndarray):
        """This host's rows -> global arrays sharded over the data-parallel axis (every field
        of a `Batch`)."""
        return jax.tree.map(
            lambda rows: jax.make_array_from_process_local_data(self.batch_sharding, rows),
            host_batch,
        )

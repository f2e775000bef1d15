"""GPT-Neo's MLP activation functions, by the names its configs use.

Each entry is `fn(x, p)` where `p` holds the activation's learnable scalars (empty for most).
GPT-Neo created those scalars under random variable names (unreproducible); here they are
parameters of the MLP named after their role, initialised to GPT-Neo's values. Two GPT-Neo
bugs are not copied: `tanhshrink` works, `elish` is ELiSH (GPT-Neo's positive branch computed
x / (1 + e^x) instead of x * sigmoid(x)), and `rrelu` uses a fixed slope of 0.5 (the mean of
GPT-Neo's per-graph-build uniform draw) instead of a new random slope at every program start.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

Activation = Callable[[jax.Array, dict], jax.Array]


def _gelu_tanh(x, p):
    return 0.5 * x * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def _arcsinh(x):
    return jnp.log(x + jnp.sqrt(1.0 + x**2))


def _elish(x, p):
    positive = x > 0
    ex = jnp.exp(jnp.where(positive, -jnp.abs(x), x))  # avoid overflow in the unused branch
    return jnp.where(positive, x * jax.nn.sigmoid(x), (ex - 1.0) / (1.0 / ex + 1.0))


def _positive(raw, offset):
    """GPT-Neo's `_pos_var`: softplus(variable) + offset."""
    return jax.nn.softplus(raw) + offset


def _aria(x, p):
    ramp = _positive(p["c"], 0.0) + p["d"] * jnp.exp(p["e"] * x) ** (1.0 / _positive(p["f"], 1.0))
    return x * (p["a"] + p["b"] / ramp)


ACTIVATIONS: dict[str, Activation] = {
    # mesh-tensorflow base functions
    "gelu": _gelu_tanh,
    "relu": lambda x, p: jax.nn.relu(x),
    "sigmoid": lambda x, p: jax.nn.sigmoid(x),
    "tanh": lambda x, p: jnp.tanh(x),
    "selu": lambda x, p: jax.nn.selu(x),
    "elu": lambda x, p: jax.nn.elu(x),
    "abs": lambda x, p: jnp.abs(x),
    "sin": lambda x, p: jnp.sin(x),
    "cos": lambda x, p: jnp.cos(x),
    "sign": lambda x, p: jnp.sign(x),
    "silu": lambda x, p: jax.nn.silu(x),
    "swiglu": lambda x, p: jax.nn.silu(x),  # silu as a gated MLP's gate (config: needs mlp_glu)
    "softplus": lambda x, p: jax.nn.softplus(x),
    # GPT-Neo's custom functions
    "lrelu001": lambda x, p: jax.nn.leaky_relu(x, 0.01),
    "lrelu020": lambda x, p: jax.nn.leaky_relu(x, 0.20),
    "id": lambda x, p: x,
    "triangle_relax": lambda x, p: (
        jnp.sin(x) - jnp.sin(3 * x) / 9 + jnp.sin(5 * x) / 25 - jnp.sin(7 * x) / 49
    ),
    "square_relax": lambda x, p: (
        jnp.cos(x) - jnp.cos(3 * x) / 3 + jnp.cos(5 * x) / 5 - jnp.cos(7 * x) / 7
    ),
    "spike": lambda x, p: 1.0 / (1.0 + x**2),
    "spike2": lambda x, p: jnp.exp(-(x**2)),
    "tanhshrink": lambda x, p: x - jnp.tanh(x),
    "softsign": lambda x, p: x / (jnp.abs(x) + 1.0),
    "softmax": lambda x, p: jax.nn.softmax(x, axis=-1),
    "logsoftmax": lambda x, p: jax.nn.log_softmax(x, axis=-1),
    "bipolarsigmoid": lambda x, p: jax.nn.sigmoid(x) * 2.0 - 1.0,
    "rrelu": lambda x, p: (0.5 * jnp.abs(x) + x) / 1.5,
    "elish": _elish,
    "arcsinh": lambda x, p: _arcsinh(x),
    "maxsig": lambda x, p: jnp.maximum(x, jax.nn.sigmoid(x)),
    "cosid": lambda x, p: jnp.cos(x) - x,
    "minsin": lambda x, p: jnp.minimum(x, jnp.sin(x)),
    "maxtanh": lambda x, p: jnp.maximum(x, jnp.tanh(x)),
    "mish": lambda x, p: x * jnp.tanh(jax.nn.softplus(x)),
    "tanhexp": lambda x, p: x * jnp.tanh(jnp.exp(x)),
    "lisht": lambda x, p: x * jnp.tanh(x),
    "seagull": lambda x, p: jnp.log(1.0 + x**2),
    "snake": lambda x, p: x + jnp.sin(x) ** 2,
    "roottanh": lambda x, p: (x**2 + 1.0) ** (1.0 / 3.0) * jnp.tanh(x),
    "softplusmone": lambda x, p: jax.nn.softplus(x) - 1.0,
    # learnable (scalars in `p`, see ACTIVATION_PARAMS)
    "aria": _aria,
    "prelu": lambda x, p: jnp.where(x >= 0, x, p["alpha"] * x),
    "parcsinh": lambda x, p: p["scale"] * _arcsinh(x * _positive(p["slope"], 1.0)),
    "psoftplus": lambda x, p: p["scale"] * jax.nn.softplus(x * p["slope"]) + p["shift"],
    "proottanh": lambda x, p: (
        (x ** _positive(p["power"], 2.0) + _positive(p["offset"], 1.0))
        ** (1.0 / _positive(p["root"], 3.0))
        * jnp.tanh(x)
    ),
}

# Initial values of the learnable scalars, as GPT-Neo's `_var(x, init)` calls set them
# (`_pos_var` raw variables start at 0, so they begin at softplus(0) + offset).
ACTIVATION_PARAMS: dict[str, dict[str, float]] = {
    "aria": {"a": 0.0, "b": 1.0, "c": 0.0, "d": 1.0, "e": -1.0, "f": 0.0},
    "prelu": {"alpha": 0.2},
    "parcsinh": {"scale": 1.0, "slope": 0.0},
    "psoftplus": {"scale": 1.0, "slope": 1.0, "shift": 0.0},
    "proottanh": {"power": 0.0, "offset": 0.0, "root": 0.0},
}

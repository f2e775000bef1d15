"""An independent NumPy GPT-Neo forward pass (float64), written from GPT-Neo's definitions.

It shares no code with the library: loops and explicit masks instead of einsums, blocks and
scans, so agreement with it checks the library's attention kernels, layer order and
activations, including the layer kinds Hugging Face does not have (linear, none).
"""

import numpy as np


def softplus(x):
    return np.logaddexp(0.0, x)


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def arcsinh(x):
    return np.log(x + np.sqrt(1 + x**2))


def _softmax(x, axis=-1):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


ACTIVATIONS = {
    "gelu": lambda x, p: 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3))),
    "relu": lambda x, p: np.maximum(x, 0),
    "sigmoid": lambda x, p: sigmoid(x),
    "tanh": lambda x, p: np.tanh(x),
    "selu": lambda x, p: (
        1.0507009873554805 * np.where(x > 0, x, 1.6732632423543772 * (np.exp(np.minimum(x, 0)) - 1))
    ),
    "elu": lambda x, p: np.where(x > 0, x, np.exp(np.minimum(x, 0)) - 1),
    "abs": lambda x, p: np.abs(x),
    "sin": lambda x, p: np.sin(x),
    "cos": lambda x, p: np.cos(x),
    "sign": lambda x, p: np.sign(x),
    "silu": lambda x, p: x * sigmoid(x),
    "softplus": lambda x, p: softplus(x),
    "lrelu001": lambda x, p: np.where(x >= 0, x, 0.01 * x),
    "lrelu020": lambda x, p: np.where(x >= 0, x, 0.2 * x),
    "id": lambda x, p: x,
    "triangle_relax": lambda x, p: sum(
        (-1) ** i * np.sin((2 * i + 1) * x) / (2 * i + 1) ** 2 for i in range(4)
    ),
    "square_relax": lambda x, p: sum(
        (-1) ** i * np.cos((2 * i + 1) * x) / (2 * i + 1) for i in range(4)
    ),
    "spike": lambda x, p: 1 / (1 + x**2),
    "spike2": lambda x, p: np.exp(-(x**2)),
    "tanhshrink": lambda x, p: x - np.tanh(x),
    "softsign": lambda x, p: x / (1 + np.abs(x)),
    "softmax": lambda x, p: _softmax(x),
    "logsoftmax": lambda x, p: np.log(_softmax(x)),
    "bipolarsigmoid": lambda x, p: 2 * sigmoid(x) - 1,
    "rrelu": lambda x, p: np.where(x >= 0, x, x / 3),  # slope 0.5: (0.5|x| + x) / 1.5
    "elish": lambda x, p: np.where(x > 0, x * sigmoid(x), (np.exp(x) - 1) * sigmoid(x)),
    "arcsinh": lambda x, p: np.arcsinh(x),
    "maxsig": lambda x, p: np.maximum(x, sigmoid(x)),
    "cosid": lambda x, p: np.cos(x) - x,
    "minsin": lambda x, p: np.minimum(x, np.sin(x)),
    "maxtanh": lambda x, p: np.maximum(x, np.tanh(x)),
    "mish": lambda x, p: x * np.tanh(softplus(x)),
    "tanhexp": lambda x, p: x * np.tanh(np.exp(x)),
    "lisht": lambda x, p: x * np.tanh(x),
    "seagull": lambda x, p: np.log1p(x**2),
    "snake": lambda x, p: x + np.sin(x) ** 2,
    "roottanh": lambda x, p: np.cbrt(x**2 + 1) * np.tanh(x),
    "softplusmone": lambda x, p: softplus(x) - 1,
    # learnable: GPT-Neo's formulas with its initial scalar values
    "aria": lambda x, p: (
        x
        * (
            p["a"]
            + p["b"]
            / (softplus(p["c"]) + p["d"] * np.exp(p["e"] * x) ** (1 / (softplus(p["f"]) + 1)))
        )
    ),
    "prelu": lambda x, p: np.where(x >= 0, x, p["alpha"] * x),
    "parcsinh": lambda x, p: p["scale"] * arcsinh(x * (softplus(p["slope"]) + 1)),
    "psoftplus": lambda x, p: p["scale"] * softplus(x * p["slope"]) + p["shift"],
    "proottanh": lambda x, p: (
        (x ** (softplus(p["power"]) + 2) + softplus(p["offset"]) + 1)
        ** (1 / (softplus(p["root"]) + 3))
        * np.tanh(x)
    ),
}


def activation(name, x, p):
    with np.errstate(invalid="ignore"):  # proottanh: fractional powers of negatives are NaN
        return ACTIVATIONS[name](x, p)


def layer_norm(x, p):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + 1e-5) * p["scale"] + p["bias"]


def softmax_attention(q, k, v, window=None):
    """q, k, v: [t, h, d]; loops over query positions."""
    t = q.shape[0]
    out = np.zeros_like(q)
    for i in range(t):
        lo = 0 if window is None else max(0, i - window + 1)
        scores = np.einsum("hd,khd->hk", q[i], k[lo : i + 1])
        out[i] = np.einsum("hk,khd->hd", _softmax(scores), v[lo : i + 1])
    return out


def causal_linear_attention(q, k, v, eps=1e-6):
    """GPT-Neo's definition literally: cumulative k (x) v outer products, per-feature normaliser."""
    q = _softmax(q)
    k = np.exp(k)
    context = np.cumsum(np.einsum("thd,the->thde", k, v), axis=0)
    context = context / (np.cumsum(k, axis=0)[..., None] + eps)
    return np.einsum("thd,thde->the", q, context)


def forward(cfg, params, tokens):
    """float64 logits [batch, seq, vocab]."""
    p = _to_float64(params)
    batch_logits = []
    for row in np.asarray(tokens):
        t = len(row)
        x = p["wte"][row] + p["wpe"][:t]
        for kind, b in zip(cfg.attention_types, p["blocks"], strict=True):
            if kind != "none":
                h = layer_norm(x, b["ln_1"])
                q, k, v = (np.einsum("te,ehd->thd", h, b["attn"][n]) for n in "qkv")
                if kind == "linear":
                    a = causal_linear_attention(q, k, v)
                else:
                    window = cfg.local_attention_radius if kind == "local" else None
                    a = softmax_attention(q, k, v, window)
                x = x + np.einsum("thd,hde->te", a, b["attn"]["o"]) + b["attn"]["o_bias"]
            h = layer_norm(x, b["ln_2"]) @ b["mlp"]["fc_kernel"] + b["mlp"]["fc_bias"]
            h = activation(cfg.activation_function, h, b["mlp"].get("act", {}))
            x = x + h @ b["mlp"]["proj_kernel"] + b["mlp"]["proj_bias"]
        batch_logits.append(layer_norm(x, p["ln_f"]) @ p["wte"].T)
    return np.stack(batch_logits)


def _to_float64(tree):
    if isinstance(tree, dict):
        return {k: _to_float64(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_to_float64(v) for v in tree]
    return np.asarray(tree, np.float64)

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
    "swiglu": lambda x, p: x * sigmoid(x),
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


def layer_norm(x, p, eps=1e-5):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * p["scale"] + p.get("bias", 0.0)


def rms_norm(x, scale, eps):
    return x / np.sqrt((x**2).mean(-1, keepdims=True) + eps) * scale


def norm(cfg, x, p):
    """The config's `norm` (ln_f, and the blocks' unless scalenorm or rezero)."""
    if cfg.norm == "rmsnorm":
        return rms_norm(x, p["scale"], cfg.norm_eps)
    return layer_norm(x, p, cfg.norm_eps)


def softmax_attention(q, k, v, window=None, scale=1.0):
    """q, k, v: [t, h, d]; loops over query positions."""
    t = q.shape[0]
    out = np.zeros_like(q)
    for i in range(t):
        lo = 0 if window is None else max(0, i - window + 1)
        scores = np.einsum("hd,khd->hk", q[i], k[lo : i + 1]) * scale
        out[i] = np.einsum("hk,khd->hd", _softmax(scores), v[lo : i + 1])
    return out


def causal_linear_attention(q, k, v, eps=1e-6):
    """GPT-Neo's `causal_linear_attention` literally: cumulative k (x) v outer products,
    normalised by D_inv = 1 / (q . (cumsum(k) + eps))."""
    q = _softmax(q)
    k = np.exp(k)
    context = np.cumsum(np.einsum("thd,the->thde", k, v), axis=0)
    d_inv = 1.0 / np.einsum("thd,thd->th", q, np.cumsum(k, axis=0) + eps)
    return np.einsum("thd,thde,th->the", q, context, d_inv)


def linear_attention(q, k, v):
    """GPT-Neo's non-causal `linear_attention`: softmax(q) over features, softmax(k) over
    the sequence, q (k^T v)."""
    return np.einsum("thd,hde->the", _softmax(q), np.einsum("thd,the->hde", _softmax(k, 0), v))


def bidirectional_attention(q, k, v, window=None, memory=None):
    """q, k, v: [t, h, d]; query i sees every key j (|i - j| < window) and the memory."""
    t = q.shape[0]
    out = np.zeros_like(q)
    for i in range(t):
        lo, hi = (0, t) if window is None else (max(0, i - window + 1), min(t, i + window))
        keys, values = k[lo:hi], v[lo:hi]
        if memory is not None:
            keys, values = np.concatenate([memory[0], keys]), np.concatenate([memory[1], values])
        out[i] = np.einsum("hk,khd->hd", _softmax(np.einsum("hd,khd->hk", q[i], keys)), values)
    return out


def memory_attention(q, k, v, memory):
    """Causal attention over [memory slots; keys before i], per query, as GPT-Neo's
    `num_mem_kv` with the memory always visible."""
    out = np.zeros_like(q)
    for i in range(q.shape[0]):
        keys = np.concatenate([memory[0], k[: i + 1]])
        values = np.concatenate([memory[1], v[: i + 1]])
        out[i] = np.einsum("hk,khd->hd", _softmax(np.einsum("hd,khd->hk", q[i], keys)), values)
    return out


def rotary(x, rotary_dims, base=10000.0):
    """x [t, h, d]: dimension pairs (i, i + r/2) of the first r turn by pos * base^(-2i/r)."""
    t = x.shape[0]
    half = rotary_dims // 2
    out = x.copy()
    for pos in range(t):
        for i in range(half):
            angle = pos * base ** (-2.0 * i / rotary_dims)
            a, b = x[pos, :, i], x[pos, :, i + half]
            out[pos, :, i] = a * np.cos(angle) - b * np.sin(angle)
            out[pos, :, i + half] = b * np.cos(angle) + a * np.sin(angle)
    return out


def positions_of(cfg, p, t):
    if cfg.rotary_emb:
        return 0.0
    if cfg.axial_pos_emb is not None:
        d2 = cfg.axial_pos_emb[1]
        return np.stack(
            [(p["axial_wpe_1"][i // d2] + p["axial_wpe_2"][i % d2]) / 2 for i in range(t)]
        )
    return p["wpe"][:t]


def pre_norm(cfg, x, p):
    if cfg.rezero:
        return x
    if cfg.scalenorm:
        return layer_norm(x, {"scale": p["scale"]}, cfg.norm_eps)
    return norm(cfg, x, p)


def mlp(cfg, x, m):
    h = x @ m["fc_kernel"] + m.get("fc_bias", 0.0)
    if cfg.mlp_glu:
        gate = x @ m["gate_kernel"] + m.get("gate_bias", 0.0)
        h = h * activation(cfg.activation_function, gate, {})
    else:
        h = activation(cfg.activation_function, h, m.get("act", {}))
    return h @ m["proj_kernel"] + m.get("proj_bias", 0.0)


def attend(cfg, kind, h, a):
    """One attention sub-block's output [t, embd] for normalised input h. Grouped-query
    attention: query head i reads key/value head i // group (Hugging Face's `repeat_kv`)."""
    q, k, v = (np.einsum("te,ehd->thd", h, a[n]) + a.get(f"{n}_bias", 0.0) for n in "qkv")
    group = cfg.n_head // cfg.n_kv_head
    k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
    if cfg.qk_norm:
        q = rms_norm(q, a["q_norm"]["scale"], cfg.norm_eps)
        k = rms_norm(k, a["k_norm"]["scale"], cfg.norm_eps)
    if cfg.rotary_emb:
        dims = int(cfg.head_dim * cfg.rotary_pct)
        q, k = rotary(q, dims, cfg.rotary_emb_base), rotary(k, dims, cfg.rotary_emb_base)
    memory = (a["mem_k"], a["mem_v"]) if kind == "global" and "mem_k" in a else None
    window = cfg.local_attention_radius if kind == "local" else None
    if kind == "linear":
        out = linear_attention(q, k, v) if cfg.mlm_training else causal_linear_attention(q, k, v)
    elif cfg.mlm_training:
        out = bidirectional_attention(q, k, v, window, memory)
    elif memory is not None:
        out = memory_attention(q, k, v, memory)
    else:
        scale = cfg.head_dim**-0.5 if cfg.scale_attn_weights else 1.0
        out = softmax_attention(q, k, v, window, scale)
    return np.einsum("thd,hde->te", out, a["o"]) + a.get("o_bias", 0.0)


def layer_weights(cfg, p, index):
    """Layer `index`'s weights, stored per layer or stacked: layer i is row i // n of stack
    i % n, for n stacks (the layout gpt_neo.models.stack documents)."""
    if "stacks" in p:
        stacks = p["stacks"]
        return _row(stacks[index % len(stacks)], index // len(stacks))
    return p["blocks"][0 if cfg.share_parameters else index]


def forward(cfg, params, tokens):
    """float64 logits [batch, seq, vocab], following GPT-Neo's `block()` line by line."""
    p = _to_float64(params)
    batch_logits = []
    for row in np.asarray(tokens):
        x = p["wte"][row] + positions_of(cfg, p, len(row))
        for index, kind in enumerate(cfg.attention_types):
            b = layer_weights(cfg, p, index)
            gate = b.get("rezero", {"attn": 1.0, "mlp": 1.0})
            mult = 0.5 if cfg.macaron else 1.0
            if cfg.macaron:
                x = x + 0.5 * mlp(cfg, x, b["mlp_macaron"])
            if kind != "none":
                x = x + gate["attn"] * attend(cfg, kind, pre_norm(cfg, x, b.get("ln_1")), b["attn"])
            elif cfg.gpt_neo_none_layers:
                x = x + gate["attn"] * x
            x = x + gate["mlp"] * mult * mlp(cfg, pre_norm(cfg, x, b.get("ln_2")), b["mlp"])
        if cfg.no_weight_tie:
            if cfg.gpt_neo_untied_head:
                logits = x @ p["head"]["kernel"].T + p["head"]["bias"]
            else:
                logits = norm(cfg, x, p["ln_f"]) @ p["head"]["kernel"].T
        else:
            logits = norm(cfg, x, p["ln_f"]) @ p["wte"].T
        batch_logits.append(logits)
    return np.stack(batch_logits)


def _row(tree, row):
    if isinstance(tree, dict):
        return {k: _row(v, row) for k, v in tree.items()}
    return tree[row]


def _to_float64(tree):
    if isinstance(tree, dict):
        return {k: _to_float64(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_to_float64(v) for v in tree]
    return np.asarray(tree, np.float64)

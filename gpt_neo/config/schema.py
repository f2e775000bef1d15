"""GPT-Neo JSON model configs -> one typed, frozen `Config`.

GPT-Neo read its JSON into a `defaultdict(lambda: None)`, so a typo silently became `None` and
`"rotary_emb": false` switched rotary embeddings *on*. Here every key is declared once, with its
type and default, and everything downstream trusts the validated `Config`:

- unknown keys are errors (with the closest known key suggested);
- values are type-checked (`true` is not an int, `"12"` is not an int);
- known keys whose feature is not built yet are errors when they would turn that feature on;
- GPT-Neo's aliases are accepted: `n_heads` -> `n_head`, `activation_fn` -> `activation_function`.

This module knows keys and values only; whether a `layout` fits the model's tensors is checked
by `gpt_neo.mesh.check_layout` (`gpt_neo.load_config` runs both).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from gpt_neo.config.moe import (
    MOE_ACTIVATIONS,
    MoeParams,
    moe_params_to_dict,
    parse_moe_layers,
    parse_moe_params,
)
from gpt_neo.errors import ConfigError

ATTENTION_TYPES = ("global", "local", "linear", "none")
PRECISIONS = ("float32", "bfloat16")
OPTIMIZERS = ("adam", "adafactor")
LR_DECAYS = ("cosine", "linear", "constant")
ATTENTION_KERNELS = ("auto", "xla", "cudnn", "splash")
INPUT_FNS = ("sequential_input", "generic_text")
# GPT-Neo's activation names; gpt_neo.models.activations implements each (a test holds them
# equal). Kept as a block of names: one per line would be 43 lines.
# fmt: off
ACTIVATION_FUNCTIONS = (
    "gelu", "relu", "sigmoid", "tanh", "selu", "elu", "abs", "sin", "cos", "sign", "silu",
    "softplus", "lrelu001", "lrelu020", "id", "triangle_relax", "square_relax", "spike",
    "spike2", "tanhshrink", "softsign", "softmax", "logsoftmax", "bipolarsigmoid", "rrelu",
    "elish", "arcsinh", "maxsig", "cosid", "minsin", "maxtanh", "mish", "tanhexp", "lisht",
    "seagull", "snake", "roottanh", "softplusmone", "aria", "prelu", "parcsinh", "psoftplus",
    "proottanh",
)
# fmt: on

# GPT-Neo spellings that mean the same key as ours.
ALIASES = {"n_heads": "n_head", "activation_fn": "activation_function"}

# GPT-Neo keys refused whenever they would switch something on, with the reason.
REFUSED = {
    "entmax_loss": "GPT-Neo's entmax loss took log(entmax(logits)) at the target, and entmax is "
    "sparse: a target outside its support gives an infinite loss and NaN gradients. Train with "
    "the softmax cross-entropy (the default)",
}

# GPT-Neo keys that have nothing to do here: accepted switched off, refused with the reason.
NOT_NEEDED = {
    "no_dataset": "a config without 'datasets' loads as it is here (training, --eval and "
    "--check_dataset ask for datasets when they need them)",
    "causal": "GPT-Neo derived it from mlm_training and overwrote the key; set mlm_training "
    "for a masked LM",
}

# GPT-Neo's optional switches, which its configs may spell `null` (its defaultdict's None): off.
NULL_MEANS_OFF = frozenset(
    {
        "rotary_emb",
        "mlp_glu",
        "scalenorm",
        "rezero",
        "macaron",
        "share_parameters",
        "no_weight_tie",
        "num_mem_kv",
        "mlm_training",
        "scale_by_depth",
        "scale_by_in",
        "recompute_grad",
    }
)

# GPT-Neo keys with a single meaningful value: that value is accepted, any other refused.
SINGLE_VALUE = {"model": ("GPT", "GPT-Neo only ever had the GPT model")}


@dataclass(frozen=True)
class DatasetEntry:
    """One entry of `datasets`: GPT-Neo's `[dataset_id, stitch, sampling_mode, weight]`."""

    dataset_id: str
    stitch: int | None = None
    sampling_mode: str | None = None
    weight: float | None = None


@dataclass(frozen=True)
class Config:
    """A validated GPT-Neo model config. Field names are GPT-Neo's JSON keys."""

    # --- architecture ---------------------------------------------------------------------
    n_embd: int
    """Model width d_model."""
    n_head: int
    """Attention heads; head dim = n_embd // n_head. GPT-Neo's README spelling `n_heads` works."""
    n_layer: int
    """Transformer blocks."""
    n_ctx: int
    """Sequence length, and rows of the learned position embedding."""
    n_vocab: int
    """Embedding rows (may be padded above the tokenizer's size, e.g. 50304)."""
    attention_types: tuple[str, ...] = ()
    """One of global/local/linear/none per layer. JSON takes GPT-Neo's shorthand
    `[[["global","local"],12]]` or a flat list; missing means all global."""
    local_attention_radius: int = 256
    """Window of `local` layers: query p sees keys (p - radius, p]."""
    activation_function: str = "gelu"
    """MLP activation by GPT-Neo name; `gelu` is the tanh approximation (HF `gelu_new`)."""
    scale_by_depth: bool = False
    """Multiply the MLP output projection's init std by 1/sqrt(n_layer)."""
    scale_by_in: bool = False
    """Multiply the MLP projections' init std by 1/sqrt(fan_in)."""
    embed_dropout: float = 0.0
    """Dropout on token + position embeddings (training only)."""
    attn_dropout: float = 0.0
    """Dropout on attention probabilities of `global` layers, as in GPT-Neo (training only)."""
    res_dropout: float = 0.0
    """Dropout on each residual branch's output (training only)."""
    precision: str = "float32"
    """`float32`, or `bfloat16` compute with float32 master parameters."""
    recompute_grad: bool = False
    """Rematerialise each block's activations in the backward pass (`jax.checkpoint`)."""
    attention_kernel: str = "auto"
    """Softmax-attention kernel: `auto` (cuDNN flash on GPU, splash on TPU where it applies,
    else XLA), or force one of `xla`, `cudnn`, `splash`. Not a GPT-Neo key."""
    moe_layers: tuple[int, ...] = ()
    """0-based indices of the layers whose MLP is a mixture of experts (GPT-Neo's meaning)."""
    moe_params: MoeParams | None = None
    """The MoE layers' hyper-parameters, by Mesh-TensorFlow 0.1.18's names
    (`gpt_neo.config.moe.MoeParams`); `{}` means its defaults. Required with `moe_layers`."""
    moe_activation: str = "relu"
    """Activation inside each expert, by Mesh-TensorFlow name (`gelu` is the tanh form)."""
    rotary_emb: bool = False
    """Rotary position embedding (RoPE, rotate-half) on queries and keys of every attention
    layer instead of a learned absolute position embedding (there is no `wpe` then). GPT-Neo
    switched it on with any value, `false` included; here only `true` does."""
    rotary_pct: float = 1.0
    """Fraction of each head's dimensions that rotary rotates (the first ones; the rest pass
    through), as GPT-NeoX's `rotary_pct` (0.25 in GPT-NeoX-20B). GPT-Neo rotated all of them.
    Not a GPT-Neo key."""
    rotary_emb_base: float = 10000.0
    """Rotary's base (theta): dimension pair i turns by position * base^(-2i / rotary dims).
    Not a GPT-Neo key (GPT-NeoX's name)."""
    axial_pos_emb: tuple[int, ...] | None = None
    """`[d1, d2]`: the position embedding of position p is (axial_wpe_1[p // d2] +
    axial_wpe_2[p % d2]) / 2, two tables of d1 and d2 rows instead of n_ctx (d1 * d2 >= n_ctx)."""
    mlp_glu: bool = False
    """Gated MLP: act(x W_gate + b_gate) * (x W_fc + b_fc), then the output projection, with
    `activation_function` as the gate (silu: SwiGLU, gelu: GeGLU). Hidden size stays 4 * n_embd,
    as in GPT-Neo (whose version crashed before building)."""
    no_weight_tie: bool = False
    """An output head of its own instead of reusing wte; ln_f still applies and the head has no
    bias (GPT-Neo's also skipped ln_f and added a bias: see `gpt_neo_untied_head`)."""
    gpt_neo_untied_head: bool = False
    """With `no_weight_tie`: GPT-Neo's exact untied head, which skipped ln_f and had an output
    bias. For imported GPT-Neo checkpoints; not a GPT-Neo key."""
    gpt_neo_none_layers: bool = False
    """A `none` layer adds the residual stream to itself (x = x + x) before its MLP, as
    GPT-Neo's block did (`a = x`); otherwise a `none` layer is MLP-only. For imported GPT-Neo
    checkpoints; not a GPT-Neo key."""
    scalenorm: bool = False
    """GPT-Neo's "scalenorm" before attention and MLP: a LayerNorm with one learned scalar gain
    and no bias (not Nguyen & Salazar's g * x / ||x||). ln_f stays a LayerNorm."""
    rezero: bool = False
    """ReZero: no norm before attention and MLP; each branch is multiplied by a learned scalar
    that starts at 0 (x + g * f(x)). ln_f still applies."""
    macaron: bool = False
    """Macaron: every block starts with an extra MLP without a norm, x + 0.5 * mlp(x), and its
    main MLP (or MoE) branch is halved too."""
    share_parameters: bool = False
    """All layers use one set of block parameters (ALBERT-style cross-layer sharing)."""
    num_mem_kv: int = 0
    """Learned memory key/value slots prepended to the keys and values of `global` layers,
    visible to every query (all-attention); not rotated by rotary."""
    mlm_training: bool = False
    """Train a masked language model (BERT-style) instead of a causal one: attention is
    bidirectional (global, local within +-radius, linear), the loss is on the selected positions
    only. GPT-Neo's version had inverted labels and crashed; this follows BERT."""
    mlm_mask_id: int | None = None
    """Token that replaces most selected positions (required with mlm_training)."""
    mlm_cls_token_id: int | None = None
    """Token prepended to every MLM example (never selected), or none."""
    mlm_mask_prob: float = 0.15
    """Fraction of (maskable) positions selected for the MLM loss."""
    mlm_same_token_prob: float = 0.10
    """Fraction of the selected positions left unchanged in the input."""
    mlm_random_token_prob: float = 0.10
    """Fraction of the selected positions replaced by a uniformly random token (GPT-Neo's code
    default was 0.0, its README's 0.10; BERT's is 0.10). The rest get mlm_mask_id."""
    mlm_mask_ignore_ids: tuple[int, ...] = ()
    """Tokens never selected (e.g. eos, cls); padding_id is never selected either."""

    # --- optimisation (consumed by training) ----------------------------------------------
    opt_name: str = "adam"
    """`adam` (AdamW) or `adafactor`."""
    lr: float = 6e-4
    """Peak learning rate."""
    lr_decay: str = "cosine"
    """`cosine`, `linear` (both to 10% of lr at lr_decay_end) or `constant`."""
    lr_decay_end: int | None = None
    """Decay horizon in steps; default train_steps."""
    warmup_steps: int = 0
    """Linear warmup steps from 0 to lr."""
    beta1: float = 0.9
    """Adam's first-moment decay."""
    beta2: float = 0.95
    """Adam's second-moment decay."""
    epsilon: float = 1e-8
    """Adam's denominator epsilon."""
    weight_decay: float = 0.0
    """Decoupled weight decay (not applied to biases and norm parameters)."""
    ada_epsilon1: float = 1e-30
    """Adafactor's epsilon added to the squared gradients."""
    ada_epsilon2: float = 1e-3
    """Adafactor's floor of the parameter scale its updates are relative to."""
    gradient_clipping: float = 1.0
    """Global-norm gradient clip."""
    z_loss: float = 1e-4
    """Coefficient of the logsumexp(logits)^2 auxiliary loss."""
    log_grads: bool = False
    """Log gradient norms per layer (and of the embeddings and ln_f) next to the global norm,
    in metrics.jsonl and TensorBoard as `grad_norm/<part>`. GPT-Neo logged one per variable."""
    tokens_per_mb_per_replica: int | None = None
    """Gradient-accumulation microbatch size, in tokens per data-parallel replica."""

    # --- run, data and evaluation ---------------------------------------------------------
    model_path: str | None = None
    """Checkpoint and log directory (local or gs://)."""
    keep_checkpoints: int = 5
    """How many of the newest checkpoints to keep under model_path. Not a GPT-Neo key."""
    mesh_shape: str | None = None
    """`"x:4,y:2"`: named mesh axes and their sizes; missing means all devices on one axis `x`.
    `"auto"`: chosen for the devices at hand, with `layout` and `param_layout` (see
    `gpt_neo.planning.auto_layout`)."""
    layout: str | None = None
    """`"batch:x,heads:y"`: dimension -> mesh axis rules for activations, and for parameters
    unless `param_layout` says otherwise; missing means `batch` on the first mesh axis. A
    dimension may be split over several mesh axes: `batch:x+z`. `"auto"`: chosen for the given
    mesh, with `param_layout`."""
    param_layout: str | None = None
    """Rules for parameters (and their gradients and optimizer state), same syntax as `layout`,
    applied on top of it: `"embd:x"` with `layout` `"batch:x"` shards every weight over the
    data-parallel axis (FSDP / ZeRO-3) while activations stay split by batch. Missing means
    parameters follow `layout`; `"auto"`: FSDP or not, chosen. Not a GPT-Neo key."""
    vocab_pad_multiple: int | None = None
    """Pad the embedding to a multiple of this many rows. Missing means: pad only when `vocab`
    is split over mesh axes that do not divide n_vocab, to the smallest multiple of 128 that
    they divide (50257 on 2 devices -> 50304). Padded rows are zero, their logits are masked
    out of the loss and sampling, and exports hold exactly n_vocab rows. Not a GPT-Neo key."""
    train_batch_size: int | None = None
    """Global batch, in sequences of n_ctx tokens."""
    train_steps: int | None = None
    """Total optimizer steps."""
    iterations: int | None = None
    """Steps per host loop between logging/syncs."""
    datasets: tuple[DatasetEntry, ...] = ()
    """Mixture of `[dataset_id, stitch, sampling_mode, weight]` (ids name dataset configs)."""
    input_fn: str = "sequential_input"
    """How a `datasets` entry that names no sampling mode is read, when its dataset config does
    not record how its records were made: `sequential_input` (GPT-Neo's default) reads records
    of exactly n_ctx + 1 tokens (`chunks`), `generic_text` samples `documents_random`. Unlike
    GPT-Neo's sequential_input, stitch, mode and weight are honoured with either."""
    input_streams: int | None = None
    """Independent input streams the global batch is drawn from (default: one per host). Fix
    it (e.g. 8) to get the same batches on any number of hosts that divides it. Not a GPT-Neo key."""
    input_threads: int | None = None
    """Threads tf.data may use to read and parse records, per dataset and input stream.
    Missing means 1 when the model runs on this host's CPU (the step needs every core) and a
    quarter of the cores otherwise (TPU/GPU hosts). Not a GPT-Neo key."""
    input_prefetch: int = 2
    """Batches placed on the devices ahead of the step that needs them (2: double
    buffering). Not a GPT-Neo key."""
    seed: int = 1
    """Seed for parameter init and data order."""
    shuffle_input_filenames: bool = True
    """Read each dataset's files in a new seeded order every epoch; false reads them in natural
    order (`name_2` before `name_10`). Examples are shuffled within a group of files either way."""
    eval_batch_size: int | None = None
    """Evaluation batch; default train_batch_size."""
    eval_steps: int = 0
    """Evaluation batches per evaluation; 0 disables it."""
    eval_tasks: tuple[str, ...] = ()
    """Tasks `--eval` runs when none are named on the command line: `lambada`, `wikitext`."""
    predict_batch_size: int = 1
    """Samples `--predict` draws from the prompt."""
    predict_steps: int = 0
    """Sample after each checkpoint when > 0."""
    predict_max_steps: int | None = None
    """Most new tokens per sample; default up to n_ctx."""
    remove_partial_sequences: bool = False
    """Strip the prompt from predictions."""
    padding_id: int | None = None
    """The token id that pads records and prompts: targets equal to it are left out of the
    training and eval loss, and prompts are padded with it. Missing means the data holds no
    padding (every target counts; GPT-Neo's causal loss counted padding too)."""
    eos_id: int | None = None
    """End-of-text token id (default from the dataset config)."""

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def d_mlp(self) -> int:
        """GPT-Neo's `intermediate_expanded`: 4 * n_embd."""
        return 4 * self.n_embd

    @property
    def moe(self) -> MoeParams:
        """The MoE hyper-parameters (defaults when the model has no MoE layer)."""
        return self.moe_params or MoeParams()

    def replace(self, **changes) -> Config:
        """A copy with `changes` applied and validated again."""
        return from_dict({**to_dict(self), **changes}, source="Config.replace")


REQUIRED = ("n_embd", "n_head", "n_layer", "n_ctx", "n_vocab")
# Keys that fix the parameters' shapes (a checkpoint fits only a config that agrees on them).
SHAPE_KEYS = (
    *REQUIRED,
    "attention_types",
    "activation_function",
    "moe_layers",
    "moe_params",
    "rotary_emb",
    "axial_pos_emb",
    "mlp_glu",
    "no_weight_tie",
    "gpt_neo_untied_head",
    "scalenorm",
    "rezero",
    "macaron",
    "share_parameters",
    "num_mem_kv",
)
_FIELDS = {f.name: f for f in dataclasses.fields(Config)}
_HINTS = typing.get_type_hints(Config)
KNOWN_KEYS = frozenset(_FIELDS).union(ALIASES, REFUSED, NOT_NEEDED, SINGLE_VALUE)


# --------------------------------------------------------------------------------------------
# Loading


def load_config(
    path_or_paths: str | os.PathLike | Sequence[str | os.PathLike],
    overrides: Mapping[str, object] | Sequence[str] | None = None,
) -> Config:
    """Read one or more GPT-Neo JSON configs, merge them in order (later wins), apply overrides.

    `overrides` is a mapping or a list of `"key=value"` strings (value parsed as JSON, else kept
    as a string); it applies last. Overriding `n_layer` alone keeps the file's repeating
    attention pattern (12 x [global, local] becomes 2 x [global, local] for n_layer=4). A bare
    name such as `gpt_neo_125M` is looked up as `configs/<name>.json`, like GPT-Neo's `--model`.
    Raises `ConfigError`. The layout is not checked against the model here (see the module
    docstring).
    """
    paths = _as_list(path_or_paths)
    if not paths:
        raise ConfigError("no config file given: pass at least one JSON config")
    merged: dict = {}
    for path in paths:
        merged.update(read_json_object(resolve_config_path(path)))
    changes = parse_overrides(overrides)
    merged.update(changes)
    if "n_layer" in changes and "attention_types" not in changes and "attention_types" in merged:
        # n_layer=4 on a file with [[["global","local"],12]]: keep the pattern, repeat it less
        kinds = expand_attention_types(merged["attention_types"], source_of(paths))
        pattern = repeating_pattern(kinds)
        n_layer = changes["n_layer"]
        if isinstance(n_layer, int) and n_layer > 0 and n_layer % len(pattern) == 0:
            merged["attention_types"] = [[list(pattern), n_layer // len(pattern)]]
    return from_dict(merged, source=source_of(paths))


def _as_list(path_or_paths) -> list:
    return [path_or_paths] if isinstance(path_or_paths, str | os.PathLike) else list(path_or_paths)


def source_of(path_or_paths) -> str:
    """How error messages name the config file(s): `a.json + b.json`."""
    return " + ".join(str(resolve_config_path(p)) for p in _as_list(path_or_paths))


def repeating_pattern(kinds: tuple[str, ...]) -> tuple[str, ...]:
    """The shortest pattern that `kinds` repeats: ("global","local")*12 -> ("global","local")."""
    n = len(kinds)
    for period in range(1, n + 1):
        if n % period == 0 and kinds == kinds[:period] * (n // period):
            return kinds[:period]
    return kinds


REPO_ROOT = Path(__file__).resolve().parents[2]  # gpt_neo/config/schema.py -> the checkout


def find_named_config(name: str, folder: str) -> Path | None:
    """`<folder>/<name>.json` (folder: `configs` or `configs/dataset_configs`) under the
    working directory, else under this checkout, else among the configs installed with the
    package (`gpt_neo.presets`: `configs/` as a wheel carries it)."""
    for base in (Path.cwd() / folder, REPO_ROOT / folder, _presets() / folder.partition("/")[2]):
        if (path := base / f"{name}.json").is_file():
            return path
    return None


def _presets() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("gpt_neo.presets")  # a data folder: no module to import
    if spec is None or not spec.submodule_search_locations:  # a checkout, not installed
        return REPO_ROOT / "configs"
    return Path(next(iter(spec.submodule_search_locations)))


def resolve_config_path(path: str | os.PathLike) -> Path:
    candidate = Path(path)
    if candidate.is_file():
        return candidate
    if candidate.suffix != ".json" and (named := find_named_config(str(candidate), "configs")):
        return named
    raise ConfigError(
        f"config file not found: {path}. Pass a path to a .json file or the name of a file "
        "in configs/ (for example --model gpt_neo_125M)."
    )


def read_json_object(path: Path) -> dict:
    """A JSON object from a UTF-8 file; any problem is a `ConfigError` naming the spot."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"{path}: byte {err.start} is not UTF-8; save the config as UTF-8 JSON"
        ) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(
            f"{path}: line {err.lineno}, column {err.colno}: malformed JSON ({err.msg}). "
            "Fix the JSON syntax there (a trailing comma or a missing quote is typical)."
        ) from None
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: a config must be a JSON object {{...}}, not {type(data).__name__}"
        )
    return data


def parse_overrides(overrides: Mapping[str, object] | Sequence[str] | None) -> dict:
    if overrides is None:
        return {}
    if isinstance(overrides, Mapping):
        return dict(overrides)
    parsed = {}
    for item in overrides:
        key, sep, raw = str(item).partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. n_layer=4)")
        try:
            parsed[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            parsed[key.strip()] = raw
    return parsed


def default_of(key: str):
    """A key's default as `to_dict` writes it (for configs saved before the key existed)."""
    default = _FIELDS[key].default
    return list(default) if isinstance(default, tuple) else default


def to_dict(cfg: Config) -> dict:
    """The config as plain JSON-able values (attention_types flat, datasets as 4-lists)."""
    out = {}
    for name in _FIELDS:
        value = getattr(cfg, name)
        if name == "datasets":
            value = [[d.dataset_id, d.stitch, d.sampling_mode, d.weight] for d in value]
        elif name == "moe_params" and value is not None:
            value = moe_params_to_dict(value)
        elif isinstance(value, tuple):
            value = list(value)
        out[name] = value
    return out


def from_dict(raw: Mapping[str, object], *, source: str = "<dict>") -> Config:
    """Validate a merged key -> value mapping into a `Config`. Raises `ConfigError`."""
    values = _canonical_keys(dict(raw), source)
    values = {k: v for k, v in values.items() if not (v is None and k in NULL_MEANS_OFF)}
    for key in REQUIRED:
        if values.get(key) is None:
            raise ConfigError(f"{source}: required key '{key}' is missing")
    kwargs = {key: _coerce(key, value, _HINTS[key], source) for key, value in values.items()}
    if "attention_types" in values:
        kwargs["attention_types"] = expand_attention_types(values["attention_types"], source)
    else:
        kwargs["attention_types"] = ("global",) * kwargs["n_layer"]
    if "datasets" in values:
        kwargs["datasets"] = _parse_datasets(values["datasets"], source)
    if "moe_layers" in values:
        kwargs["moe_layers"] = parse_moe_layers(values["moe_layers"], kwargs["n_layer"], source)
    if values.get("moe_params") is not None:
        kwargs["moe_params"] = parse_moe_params(values["moe_params"], source)
    if kwargs.get("lr_decay") is None and "lr_decay" in kwargs:
        kwargs["lr_decay"] = "constant"
    kwargs = {k: v for k, v in kwargs.items() if v is not None or _allows_none(k)}
    cfg = Config(**kwargs)
    _validate(cfg, source)
    return cfg


def _canonical_keys(values: dict, source: str) -> dict:
    out = {}
    for key, value in values.items():
        if key in REFUSED or key in NOT_NEEDED:
            if _is_switched_off(value):
                continue
            if key in NOT_NEEDED:
                raise ConfigError(
                    f"{source}: key '{key}' = {json.dumps(value)} is not needed: "
                    f"{NOT_NEEDED[key]}. Remove the key."
                )
            raise ConfigError(
                f"{source}: key '{key}' = {json.dumps(value)} is refused: {REFUSED[key]}. "
                "Remove the key (or set it to false/null)."
            )
        if key in SINGLE_VALUE:
            allowed, why = SINGLE_VALUE[key]
            if value != allowed:
                raise ConfigError(
                    f"{source}: key '{key}' = {json.dumps(value)}; only {json.dumps(allowed)} "
                    f"exists ({why}). Remove the key or set it to {json.dumps(allowed)}."
                )
            continue
        if key not in KNOWN_KEYS:
            close = difflib.get_close_matches(key, sorted(KNOWN_KEYS), n=1, cutoff=0.6)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"{source}: unknown key '{key}'.{hint}")
        canonical = ALIASES.get(key, key)
        if canonical in out and out[canonical] != value:
            raise ConfigError(
                f"{source}: '{key}' and '{canonical}' both given with different values "
                f"({json.dumps(value)} vs {json.dumps(out[canonical])}); keep one."
            )
        out[canonical] = value
    return out


def _is_switched_off(value) -> bool:
    return value is None or value is False or value == 0 or value in ([], {}, "")


def _allows_none(key: str) -> bool:
    return type(None) in typing.get_args(_HINTS[key])


def _type_name(tp) -> str:
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if tp in names:
        return names[tp]
    if args and typing.get_origin(tp) in (typing.Union, types.UnionType):
        return _type_name(args[0]) + " or null"
    if typing.get_origin(tp) is tuple and typing.get_args(tp)[0] is int:
        return "a list of integers"
    return "a list"


def _coerce(key: str, value, tp, source: str):
    """Check `value` against the field type; ints may stand for floats, not the reverse."""
    if key in ("attention_types", "datasets", "moe_layers", "moe_params"):
        return None  # parsed separately
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        if value is None:
            return None
        tp = next(a for a in args if a is not type(None))
    ok = False
    if tp is bool:
        ok = isinstance(value, bool) or (isinstance(value, int) and value in (0, 1))
        value = bool(value) if ok else value
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        if isinstance(value, float) and value.is_integer():
            ok, value = True, int(value)
    elif tp is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif tp is str:
        ok = isinstance(value, str)
    elif typing.get_origin(tp) is tuple:
        element = typing.get_args(tp)[0]
        ok = isinstance(value, list) and all(
            isinstance(v, element) and not isinstance(v, bool) for v in value
        )
        value = tuple(value) if ok else value
    if not ok:
        raise ConfigError(
            f"{source}: key '{key}' must be {_type_name(tp)}, got {json.dumps(value)} "
            f"({type(value).__name__})"
        )
    return value


def expand_attention_types(spec, source: str = "<config>") -> tuple[str, ...]:
    """GPT-Neo's `[[["global","local"],12]]` -> ("global","local",...); a flat list passes through."""
    bad = ConfigError(
        f'{source}: \'attention_types\' must be a list like [[["global", "local"], 12]] '
        f'or a flat list like ["global", "local", ...], got {json.dumps(spec)}'
    )
    if not isinstance(spec, list) or not spec:
        raise bad
    if all(isinstance(t, str) for t in spec):
        return tuple(spec)
    layers: list[str] = []
    for item in spec:
        if not (isinstance(item, list) and len(item) == 2):
            raise bad
        kinds, repeat = item
        if isinstance(kinds, str):
            kinds = [kinds]
        if not (isinstance(kinds, list) and all(isinstance(k, str) for k in kinds)):
            raise bad
        if not (isinstance(repeat, int) and not isinstance(repeat, bool) and repeat >= 0):
            raise bad
        layers.extend(kinds * repeat)
    return tuple(layers)


def _parse_datasets(spec, source: str) -> tuple[DatasetEntry, ...]:
    if not isinstance(spec, list):
        raise ConfigError(f"{source}: 'datasets' must be a list, got {json.dumps(spec)}")
    entries = []
    for item in spec:
        if isinstance(item, str):
            entries.append(DatasetEntry(item))
            continue
        if not (isinstance(item, list) and 1 <= len(item) <= 4 and isinstance(item[0], str)):
            raise ConfigError(
                f"{source}: each 'datasets' entry must be a dataset id or "
                f"[dataset_id, stitch, sampling_mode, weight], got {json.dumps(item)}"
            )
        dataset_id, stitch, mode, weight = [*item, None, None, None][:4]
        if stitch is not None and not (isinstance(stitch, int) and stitch > 0):
            raise ConfigError(
                f"{source}: dataset '{dataset_id}': stitch must be a positive integer or null"
            )
        if mode is not None and not isinstance(mode, str):
            raise ConfigError(
                f"{source}: dataset '{dataset_id}': sampling_mode must be a string or null"
            )
        if weight is not None and not (isinstance(weight, int | float) and weight > 0):
            raise ConfigError(
                f"{source}: dataset '{dataset_id}': weight must be a positive number or null"
            )
        entries.append(
            DatasetEntry(dataset_id, stitch, mode, None if weight is None else float(weight))
        )
    return tuple(entries)


def _one_of(source: str, key: str, value: str, allowed) -> None:
    if value not in allowed:
        close = difflib.get_close_matches(str(value), list(allowed), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ConfigError(
            f"{source}: unknown {key} '{value}'.{hint} Choose one of: {', '.join(allowed)}."
        )


AUTO = "auto"
LAYOUT_KEYS = ("mesh_shape", "layout", "param_layout")  # each names what the next one uses


def auto_keys(cfg: Config) -> tuple[str, ...]:
    """The keys `gpt_neo.planning.auto_layout` chooses: the layout keys set to "auto" and the unset
    ones after them, and `tokens_per_mb_per_replica` when it is unset too."""
    chosen: list[str] = []
    for key in LAYOUT_KEYS:
        value = getattr(cfg, key)
        if value == AUTO or (chosen and value is None):
            chosen.append(key)
    if chosen and cfg.tokens_per_mb_per_replica is None:
        chosen.append("tokens_per_mb_per_replica")
    return tuple(chosen)


def _validate_auto(cfg: Config, source: str) -> None:
    """A value after an "auto" one would name mesh axes or rules the search has not chosen."""
    auto = None
    for key in LAYOUT_KEYS:
        value = getattr(cfg, key)
        if value == AUTO:
            auto = auto or key
        elif auto and value is not None:
            raise ConfigError(
                f"{source}: {auto} is \"auto\" but {key} is '{value}', which depends on what "
                f'the search chooses. Set {key} to "auto" too (or remove it), or set {auto} '
                "yourself."
            )


def _validate(cfg: Config, source: str) -> None:
    _validate_auto(cfg, source)
    for key in ("n_embd", "n_head", "n_layer", "n_ctx", "n_vocab", "local_attention_radius"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"{source}: '{key}' must be at least 1, got {getattr(cfg, key)}")
    if cfg.n_embd % cfg.n_head:
        raise ConfigError(
            f"{source}: n_embd ({cfg.n_embd}) must be divisible by n_head ({cfg.n_head}); "
            f"head dim would be {cfg.n_embd / cfg.n_head:g}. Pick n_head from the divisors of n_embd."
        )
    if len(cfg.attention_types) != cfg.n_layer:
        raise ConfigError(
            f"{source}: attention_types expands to {len(cfg.attention_types)} layers but "
            f"n_layer is {cfg.n_layer}; make the repeat counts add up to n_layer."
        )
    for kind in set(cfg.attention_types):
        _one_of(source, "attention type", kind, ATTENTION_TYPES)
    _one_of(source, "activation_function", cfg.activation_function, ACTIVATION_FUNCTIONS)
    _one_of(source, "precision", cfg.precision, PRECISIONS)
    _one_of(source, "opt_name", cfg.opt_name.lower(), OPTIMIZERS)
    _one_of(source, "lr_decay", cfg.lr_decay, LR_DECAYS)
    _one_of(source, "attention_kernel", cfg.attention_kernel, ATTENTION_KERNELS)
    _one_of(source, "input_fn", cfg.input_fn, INPUT_FNS)
    _one_of(source, "moe_activation", cfg.moe_activation, MOE_ACTIVATIONS)
    if cfg.moe_layers and cfg.moe_params is None:
        raise ConfigError(
            f"{source}: moe_layers {list(cfg.moe_layers)} needs 'moe_params' (GPT-Neo crashed "
            'without it): give at least the expert count, e.g. "moe_params": '
            '{"moe_num_experts": 8, "moe_hidden_size": 1024}, or {} for Mesh-TensorFlow\'s '
            "defaults (16 experts of 4096 hidden units)."
        )
    if cfg.moe_params is not None and not cfg.moe_layers:
        raise ConfigError(
            f"{source}: 'moe_params' is set but 'moe_layers' lists no layer, so it would have no "
            "effect. Name the MoE layers in moe_layers (0-based), or remove moe_params."
        )
    _validate_positions(cfg, source)
    _validate_block_options(cfg, source)
    _validate_mlm(cfg, source)
    for key in ("embed_dropout", "attn_dropout", "res_dropout"):
        if not 0.0 <= getattr(cfg, key) < 1.0:
            raise ConfigError(f"{source}: '{key}' must be in [0, 1), got {getattr(cfg, key)}")
    for key in (
        "train_batch_size",
        "train_steps",
        "iterations",
        "eval_batch_size",
        "keep_checkpoints",
        "vocab_pad_multiple",
        "input_threads",
        "input_prefetch",
    ):
        value = getattr(cfg, key)
        if value is not None and value < 1:
            raise ConfigError(f"{source}: '{key}' must be at least 1, got {value}")
    for key in ("padding_id", "eos_id"):
        value = getattr(cfg, key)
        if value is not None and not 0 <= value < cfg.n_vocab:
            raise ConfigError(
                f"{source}: '{key}' {value} is outside the vocabulary [0, {cfg.n_vocab})"
            )
    if cfg.padding_id is not None and cfg.padding_id == cfg.eos_id:
        raise ConfigError(
            f"{source}: padding_id and eos_id are both {cfg.padding_id}; the loss leaves padding "
            "out, so every end-of-text target would be skipped. Use a token the data never holds "
            "for padding_id, or remove it."
        )


def require_causal(cfg: Config, what: str) -> None:
    """A ConfigError when `what` (generating, scoring continuations) needs a causal LM."""
    if cfg.mlm_training:
        raise ConfigError(
            f"{what} needs a causal language model, and this one is a masked LM (mlm_training: "
            "it sees both sides of every position). --eval reports its masked-token loss and "
            "accuracy on eval_path (eval_steps)."
        )


def rotary_dims(cfg: Config) -> int:
    """How many of each head's dimensions rotary rotates (0 without rotary)."""
    return int(cfg.head_dim * cfg.rotary_pct) if cfg.rotary_emb else 0


def _validate_positions(cfg: Config, source: str) -> None:
    if not cfg.rotary_emb and (cfg.rotary_pct != 1.0 or cfg.rotary_emb_base != 10000.0):
        raise ConfigError(
            f"{source}: rotary_pct/rotary_emb_base are set but rotary_emb is not true; set "
            '"rotary_emb": true or remove them.'
        )
    if cfg.rotary_emb:
        if not 0.0 < cfg.rotary_pct <= 1.0:
            raise ConfigError(
                f"{source}: rotary_pct must be in (0, 1] (the fraction of each head's "
                f"dimensions that rotary rotates), got {cfg.rotary_pct}"
            )
        dims = rotary_dims(cfg)
        if dims == 0 or dims % 2:
            raise ConfigError(
                f"{source}: rotary rotates dimensions in pairs, but rotary_pct {cfg.rotary_pct} "
                f"of head dim {cfg.head_dim} gives {dims}; pick rotary_pct so that "
                f"head_dim * rotary_pct is an even number >= 2 (e.g. {2 / cfg.head_dim:g} steps)"
            )
        if cfg.rotary_emb_base <= 1.0:
            raise ConfigError(f"{source}: rotary_emb_base must be > 1, got {cfg.rotary_emb_base}")
        if cfg.axial_pos_emb is not None:
            raise ConfigError(
                f"{source}: rotary_emb and axial_pos_emb are both set; rotary replaces the "
                "position embedding (GPT-Neo silently dropped the axial one). Keep one."
            )
    if cfg.axial_pos_emb is not None:
        shape = cfg.axial_pos_emb
        if len(shape) != 2 or min(shape) < 1 or shape[0] * shape[1] < cfg.n_ctx:
            raise ConfigError(
                f"{source}: axial_pos_emb must be [d1, d2] with d1 * d2 >= n_ctx ({cfg.n_ctx}) "
                f"so that every position has a row, got {list(shape)}"
            )


def _validate_block_options(cfg: Config, source: str) -> None:
    if cfg.gpt_neo_untied_head and not cfg.no_weight_tie:
        raise ConfigError(
            f"{source}: gpt_neo_untied_head describes an untied head; set no_weight_tie too, "
            "or remove it."
        )
    if cfg.gpt_neo_none_layers and "none" not in cfg.attention_types:
        raise ConfigError(
            f"{source}: gpt_neo_none_layers is set but attention_types has no 'none' layer; "
            "remove it."
        )
    if cfg.rezero and cfg.scalenorm:
        raise ConfigError(
            f"{source}: rezero and scalenorm are both set; rezero has no norm before its "
            "branches (GPT-Neo ignored scalenorm then). Keep one."
        )
    if cfg.num_mem_kv < 0:
        raise ConfigError(f"{source}: num_mem_kv must be >= 0, got {cfg.num_mem_kv}")
    if cfg.num_mem_kv and "global" not in cfg.attention_types:
        raise ConfigError(
            f"{source}: num_mem_kv adds memory slots to global layers, and attention_types has "
            "none; add a global layer or remove num_mem_kv."
        )
    if cfg.share_parameters and cfg.moe_layers:
        raise ConfigError(
            f"{source}: share_parameters with moe_layers is not supported (a shared block "
            "would have to hold both the MLP and the experts). Use one of them."
        )


MLM_KEYS = (
    "mlm_mask_id",
    "mlm_cls_token_id",
    "mlm_mask_prob",
    "mlm_same_token_prob",
    "mlm_random_token_prob",
    "mlm_mask_ignore_ids",
)


def _validate_mlm(cfg: Config, source: str) -> None:
    if not cfg.mlm_training:
        if changed := [k for k in MLM_KEYS if getattr(cfg, k) != _FIELDS[k].default]:
            raise ConfigError(
                f"{source}: {', '.join(changed)} set but mlm_training is not true; set "
                '"mlm_training": true or remove them.'
            )
        return
    if cfg.mlm_mask_id is None:
        raise ConfigError(
            f"{source}: mlm_training needs mlm_mask_id, the token that replaces masked "
            "positions (e.g. a [MASK] token of the tokenizer)"
        )
    ids = {"mlm_mask_id": cfg.mlm_mask_id, "mlm_cls_token_id": cfg.mlm_cls_token_id}
    ids |= {f"mlm_mask_ignore_ids[{i}]": t for i, t in enumerate(cfg.mlm_mask_ignore_ids)}
    for key, value in ids.items():
        if value is not None and not 0 <= value < cfg.n_vocab:
            raise ConfigError(
                f"{source}: {key} {value} is outside the vocabulary [0, {cfg.n_vocab})"
            )
    if not 0.0 < cfg.mlm_mask_prob <= 1.0:
        raise ConfigError(f"{source}: mlm_mask_prob must be in (0, 1], got {cfg.mlm_mask_prob}")
    same, random = cfg.mlm_same_token_prob, cfg.mlm_random_token_prob
    if min(same, random) < 0.0 or same + random > 1.0:
        raise ConfigError(
            f"{source}: mlm_same_token_prob ({same}) and mlm_random_token_prob ({random}) are "
            "fractions of the selected positions: each >= 0 and together <= 1 (the rest get "
            "mlm_mask_id)"
        )
    if cfg.predict_steps:
        raise ConfigError(
            f"{source}: predict_steps with mlm_training: a masked language model does not "
            "generate text left to right. Set predict_steps to 0."
        )

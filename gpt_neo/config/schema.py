"""Every key of a GPT-Neo model config, declared once: its type (allowed values as `Literal`),
default and meaning (the docstring under it, which docs/config.md shows), in five groups:
`Architecture`, `Optimization`, `Run`, `Data`, `Evaluation`. `gpt_neo.config.check.Config` joins
them into one frozen object; the JSON stays flat. Also here: GPT-Neo's other spellings, the keys
refused or not needed, and the keys that fix a checkpoint's shapes.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Literal

from gpt_neo.config.moe import MoeActivation, MoeParams
from gpt_neo.config.rope import RopeScaling
from gpt_neo.errors import ConfigError

AttentionType = Literal["global", "local", "linear", "none"]
Precision = Literal["float32", "bfloat16"]
LrDecay = Literal["cosine", "linear", "constant"]
AttentionKernel = Literal["auto", "xla", "cudnn", "splash"]
ContextParallel = Literal["all_gather", "ring"]
Norm = Literal["layernorm", "rmsnorm"]
InputFn = Literal["sequential_input", "generic_text"]
# GPT-Neo's activation names; gpt_neo.models.activations implements each (a test holds them
# equal). Kept as a block of names: one per line would be 43 lines.
# fmt: off
ActivationFunction = Literal[
    "gelu", "relu", "sigmoid", "tanh", "selu", "elu", "abs", "sin", "cos", "sign", "silu",
    "softplus", "lrelu001", "lrelu020", "id", "triangle_relax", "square_relax", "spike",
    "spike2", "tanhshrink", "softsign", "softmax", "logsoftmax", "bipolarsigmoid", "rrelu",
    "elish", "arcsinh", "maxsig", "cosid", "minsin", "maxtanh", "mish", "tanhexp", "lisht",
    "seagull", "snake", "roottanh", "softplusmone", "aria", "prelu", "parcsinh", "psoftplus",
    "proottanh", "swiglu",
]
# fmt: on
ATTENTION_TYPES = typing.get_args(AttentionType)
ACTIVATION_FUNCTIONS = typing.get_args(ActivationFunction)
OPTIMIZERS = ("adam", "adafactor")

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


@dataclass(frozen=True, kw_only=True)
class Architecture:
    """The model: its shape, its layers and how they compute."""

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
    head_dim: int = 0
    """Dimensions per attention head; 0 means n_embd // n_head. Set it when the heads are
    wider or narrower than n_embd / n_head (Qwen3: 128 with n_embd 1024 and 16 heads).
    Hugging Face: `head_dim`. Not a GPT-Neo key."""
    n_kv_head: int = 0
    """Key/value heads, shared by groups of n_head / n_kv_head query heads (grouped-query
    attention; 1 is multi-query); 0 means n_head (every query head has its own). Must divide
    n_head. Hugging Face: `num_key_value_heads`. Not a GPT-Neo key."""
    intermediate_size: int = 0
    """Width of the MLP's hidden layer (of each of its two input projections with `mlp_glu`);
    0 means 4 * n_embd, GPT-Neo's `intermediate_expanded`. Hugging Face: `intermediate_size`.
    Not a GPT-Neo key."""
    attention_types: tuple[AttentionType, ...] = ()
    """One of global/local/linear/none per layer. JSON takes GPT-Neo's shorthand
    `[[["global","local"],12]]` or a flat list; missing means all global."""
    local_attention_radius: int = 256
    """Window of `local` layers: query p sees keys (p - radius, p]."""
    activation_function: ActivationFunction = "gelu"
    """MLP activation by GPT-Neo name; `gelu` is the tanh approximation (HF `gelu_new`).
    `swiglu` is `silu` as the gate of a gated MLP (needs `mlp_glu`): Llama's
    down(silu(gate(x)) * up(x)) exactly."""
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
    precision: Precision = "float32"
    """`float32`, or `bfloat16` compute with float32 master parameters."""
    recompute_grad: bool = False
    """Rematerialise each block's activations in the backward pass (`jax.checkpoint`)."""
    scan_layers: bool | None = None
    """Run the layers as one `lax.scan` over parameters stored stacked (a leading layers axis;
    one stack per position of the pattern that `attention_types` and `moe_layers` repeat), so
    compile time stays flat in depth. Unset: on wherever the layers repeat a pattern at least
    twice (not with `share_parameters`, which has one block); `false` unrolls them in a Python
    loop. Checkpoints restore across either setting. Not a GPT-Neo key."""
    attention_kernel: AttentionKernel = "auto"
    """Softmax-attention kernel: `auto` (cuDNN flash on GPU, splash on TPU where it applies,
    else XLA), or force one of `xla`, `cudnn`, `splash`. With the sequence split (context
    parallelism) splash runs each block of the chunk walk. Not a GPT-Neo key."""
    moe_layers: tuple[int, ...] = ()
    """0-based indices of the layers whose MLP is a mixture of experts (GPT-Neo's meaning)."""
    moe_params: MoeParams | None = None
    """The MoE layers' hyper-parameters, by Mesh-TensorFlow 0.1.18's names
    (`gpt_neo.config.moe.MoeParams`); `{}` means its defaults. Required with `moe_layers`."""
    moe_activation: MoeActivation = "relu"
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
    rope_scaling: RopeScaling | None = None
    """Stretch rotary to contexts beyond the length a model was trained at, as Hugging Face's
    `rope_scaling` (`rope_parameters` in transformers 5) does, with its names:
    `{"rope_type": "linear", "factor": 4}` (positions divided by factor),
    `{"rope_type": "llama3", "factor": 8, "low_freq_factor": 1, "high_freq_factor": 4,
    "original_max_position_embeddings": 8192}` (Llama 3.1's per-frequency blend), or
    `{"rope_type": "yarn", "factor": 4, "original_max_position_embeddings": 32768}` (YaRN;
    also `beta_fast`, `beta_slow`, `mscale`, `mscale_all_dim`, `attention_factor`,
    `truncate`). Needs `rotary_emb`. Not a GPT-Neo key."""
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
    norm: Norm = "layernorm"
    """The norm before each block's attention and MLP and before the head: `layernorm`
    (GPT-Neo's), or `rmsnorm` (x / sqrt(mean(x^2) + eps) times a learned scale, no mean and no
    bias: Llama, Mistral, Qwen). Not a GPT-Neo key."""
    norm_eps: float = 1e-5
    """The epsilon under the norm's square root (GPT-Neo's LayerNorm: 1e-5). Hugging Face:
    `layer_norm_epsilon` / `layer_norm_eps`, `rms_norm_eps`. Not a GPT-Neo key."""
    bias: bool = True
    """Biases on every projection (attention output, MLP) and LayerNorm, as GPT-Neo has;
    false drops them all (Llama, Mistral, Qwen). Hugging Face: `attention_bias` and `mlp_bias`
    (both false). Not a GPT-Neo key."""
    qkv_bias: bool = False
    """Biases on the query, key and value projections (Qwen2; GPT-Neo has none there),
    whatever `bias` says. Not a GPT-Neo key."""
    qk_norm: bool = False
    """RMSNorm (with `norm_eps`) over each head's query and key, with a learned scale per head
    dimension shared by all heads, before rotary: Qwen3's QK-norm. Not a GPT-Neo key."""
    scale_attn_weights: bool = False
    """Multiply attention scores by 1/sqrt(head_dim), as Llama, Mistral, Qwen and GPT-2 do.
    GPT-Neo's attention is unscaled (its initializer folds the scale into the query weights,
    and its checkpoints expect that), hence the default. Hugging Face GPT-2's name. Not a
    GPT-Neo key."""
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

    def __post_init__(self):
        # 0 means "derived from the other keys" (`DERIVED`); left 0 where it cannot be derived,
        # which `rules` reports
        for key, derive in DERIVED.items():
            if getattr(self, key) == 0 and (value := derive(self)):
                object.__setattr__(self, key, value)

    @property
    def d_mlp(self) -> int:
        """The MLP's hidden width (GPT-Neo's `intermediate_expanded`): `intermediate_size`."""
        return self.intermediate_size

    @property
    def kv_groups(self) -> int:
        """Query heads per key/value head (1 without grouped-query attention)."""
        return self.n_head // self.n_kv_head

    @property
    def moe(self) -> MoeParams:
        """The MoE hyper-parameters (defaults when the model has no MoE layer)."""
        return self.moe_params or MoeParams()


# Keys whose 0 means a value derived from other keys (`Architecture.__post_init__`); a saved
# config writes 0 where the value is the derived one, so it follows those keys on `replace`.
DERIVED = {
    "head_dim": lambda a: a.n_embd // a.n_head if a.n_head and a.n_embd % a.n_head == 0 else 0,
    "n_kv_head": lambda a: a.n_head,
    "intermediate_size": lambda a: 4 * a.n_embd,
}


@dataclass(frozen=True, kw_only=True)
class Optimization:
    """The optimizer, its schedule and the loss terms (consumed by training)."""

    opt_name: str = "adam"
    """`adam` (AdamW) or `adafactor`, in any case (GPT-Neo compared it lower-cased; the
    spelling is kept, so it is not a `Literal`)."""
    lr: float = 6e-4
    """Peak learning rate."""
    lr_decay: LrDecay = "cosine"
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


@dataclass(frozen=True, kw_only=True)
class Run:
    """Where a run writes, how it spreads over the devices, and how long it trains."""

    model_path: str | None = None
    """Checkpoint and log directory (local or gs://)."""
    keep_checkpoints: int = 5
    """How many of the newest checkpoints to keep under model_path. Not a GPT-Neo key."""
    mesh_shape: str | None = None
    """`"x:4,y:2"`: named mesh axes and their sizes; missing means all devices on one axis `x`.
    `"auto"`: chosen for the devices at hand, with `layout` and `param_layout` (see
    `gpt_neo.planning.auto_layout`)."""
    dcn_axes: str | None = None
    """Mesh axes that cross TPU slices (multi-slice training), joined by `+`: `"slice"` with
    `mesh_shape` `"slice:2,x:4"` runs on 2 slices of 4 chips. The mesh places the devices so
    that these axes span the data-centre network (DCN) between slices and every other axis
    stays inside one slice, on its interconnect (ICI); the sizes of these axes multiply to the
    number of slices. Missing means one slice. Not a GPT-Neo key (docs/multi-slice.md)."""
    layout: str | None = None
    """`"batch:x,heads:y"`: dimension -> mesh axis rules for activations, and for parameters
    unless `param_layout` says otherwise; missing means `batch` on the first mesh axis (with
    `dcn_axes`: on those axes and the first other one, data parallel across slices). A
    dimension may be split over several mesh axes: `batch:x+z`. `"auto"`: chosen for the given
    mesh, with `param_layout`."""
    context_parallel: ContextParallel = "all_gather"
    """How attention reaches the keys of other devices when `layout` splits the sequence
    (`sequence:AXIS`, context parallelism): `all_gather` gathers every device's keys and
    values, `ring` passes them from device to device while it computes. Both give the same
    numbers (`gpt_neo.models.context`; docs/long-context.md says when to pick which). Not a
    GPT-Neo key."""
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
    seed: int = 1
    """Seed for parameter init and data order."""

    def require_model_path(self, purpose: str) -> str:
        """`model_path`, for a use that needs it (`purpose` says what goes there); a
        `ConfigError` when it is unset."""
        if not self.model_path:
            raise ConfigError(f"set model_path in the config ({purpose})")
        return self.model_path


@dataclass(frozen=True, kw_only=True)
class Data:
    """What the model reads: the dataset mixture and the input pipeline."""

    datasets: tuple[DatasetEntry, ...] = ()
    """Mixture of `[dataset_id, stitch, sampling_mode, weight]` (ids name dataset configs).
    Sampling modes: `documents_random`, `documents_fixed` (GPT-Neo's: documents joined with
    end-of-text, attention across the joins), `chunks` (records of n_ctx + 1 tokens) and
    `packed` (whole documents side by side, no attention across them; needs the dataset's
    `eos_id`; the default for `sft` records). See the training guide, "Data"."""
    input_fn: InputFn = "sequential_input"
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
    shuffle_input_filenames: bool = True
    """Read each dataset's files in a new seeded order every epoch; false reads them in natural
    order (`name_2` before `name_10`). Examples are shuffled within a group of files either way."""
    padding_id: int | None = None
    """The token id that pads records and prompts: targets equal to it are left out of the
    training and eval loss, and prompts are padded with it. Missing means the data holds no
    padding (every target counts; GPT-Neo's causal loss counted padding too)."""
    eos_id: int | None = None
    """End-of-text token id (default from the dataset config)."""


@dataclass(frozen=True, kw_only=True)
class Evaluation:
    """Evaluation during and after training, and sampling."""

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


# In the order the keys are documented and saved (docs/config.md, to_dict).
GROUPS = (Architecture, Optimization, Run, Data, Evaluation)
FIELDS = {f.name: f for group in GROUPS for f in dataclasses.fields(group)}


REQUIRED = ("n_embd", "n_head", "n_layer", "n_ctx", "n_vocab")
# Keys that fix the parameters' shapes (a checkpoint fits only a config that agrees on them).
SHAPE_KEYS = (
    *REQUIRED,
    "head_dim",
    "n_kv_head",
    "intermediate_size",
    "norm",
    "bias",
    "qkv_bias",
    "qk_norm",
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


def shape_keys(cfg) -> tuple[str, ...]:
    """The `SHAPE_KEYS` that fix this model's parameter shapes: n_ctx only where a learned
    position table has a row per position (not with rotary or axial positions)."""
    if cfg.rotary_emb or cfg.axial_pos_emb is not None:
        return tuple(k for k in SHAPE_KEYS if k != "n_ctx")
    return SHAPE_KEYS


KNOWN_KEYS = frozenset(FIELDS).union(ALIASES, REFUSED, NOT_NEEDED, SINGLE_VALUE)

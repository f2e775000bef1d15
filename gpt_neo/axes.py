"""Logical axis names: what each dimension of every parameter and large activation means.

Model code names dimensions with these and never with mesh axes; a config's `layout` maps the
names of activations to mesh axes and `param_layout` those of parameters (`gpt_neo.mesh`). The
tables below are the one place that says which tensors exist and how their dimensions are
named, so a layout can be checked against them without building the model.
"""

from __future__ import annotations

BATCH = "batch"  # examples of a batch
SEQ = "seq"  # positions of the sequence (queries)
KV_SEQ = "kv_seq"  # positions that keys and values come from
POS = "pos"  # rows of the position embedding
EMBD = "embd"  # the model width
HEADS = "heads"  # attention heads (query heads)
KV_HEADS = "kv_heads"  # key/value heads (fewer than query heads with grouped-query attention)
KV = "kv"  # the head dimension
MLP = "mlp"  # the MLP's hidden layer
VOCAB = "vocab"  # embedding rows and logits
EXPERTS = "experts"  # mixture-of-experts experts
EXPERT_MLP = "expert_mlp"  # an expert's hidden layer

# GPT-Neo's (Mesh-TensorFlow's) dimension names, as its layouts spell them -> ours.
GPT_NEO_NAMES = {
    "batch": BATCH,
    "sequence": SEQ,
    "memory_length": KV_SEQ,
    "embed_sequence": POS,
    "embd": EMBD,
    "heads": HEADS,
    "features_per_head": KV,
    "intermediate_expanded": MLP,
    "vocab": VOCAB,
    "experts": EXPERTS,
    "expert_hidden": EXPERT_MLP,
}
# Not in GPT-Neo (which had one kind of head). A layout that does not name it splits key/value
# heads like `heads` where that divides n_kv_head, else keeps them whole (`gpt_neo.mesh.rules`).
LOGICAL = frozenset(GPT_NEO_NAMES.values()) | {KV_HEADS}

# --- parameters ------------------------------------------------------------------------------
TOKEN_EMBEDDING = (VOCAB, EMBD)
POSITION_EMBEDDING = (POS, EMBD)
NORM = (EMBD,)  # LayerNorm scale and bias
QKV = (EMBD, HEADS, KV)  # the query projection (and key/value ones without grouping)
KV_PROJ = (EMBD, KV_HEADS, KV)  # key and value projections
QKV_BIAS = (HEADS, KV)  # q bias (qkv_bias)
KV_BIAS = (KV_HEADS, KV)  # k and v biases (qkv_bias)
HEAD_NORM = (KV,)  # qk_norm's scales
OUT = (HEADS, KV, EMBD)  # attention output projection
OUT_BIAS = (EMBD,)
MLP_IN = (EMBD, MLP)
MLP_IN_BIAS = (MLP,)
MLP_OUT = (MLP, EMBD)
MLP_OUT_BIAS = (EMBD,)
SCALAR = ()  # learnable activation parameters
ROUTER = (EMBD, None)  # the MoE router: every device scores every expert
EXPERT_IN = (EXPERTS, EMBD, EXPERT_MLP)  # each expert's wi
EXPERT_OUT = (EXPERTS, EXPERT_MLP, EMBD)  # each expert's wo

PARAMETERS = {
    "wte": TOKEN_EMBEDDING,
    "wpe": POSITION_EMBEDDING,
    "layer norms": NORM,
    "attn q": QKV,
    "attn k/v": KV_PROJ,
    "attn q bias": QKV_BIAS,
    "attn k/v bias": KV_BIAS,
    "attn q/k norm": HEAD_NORM,
    "attn o": OUT,
    "attn o_bias": OUT_BIAS,
    "mlp fc_kernel": MLP_IN,
    "mlp fc_bias": MLP_IN_BIAS,
    "mlp proj_kernel": MLP_OUT,
    "mlp proj_bias": MLP_OUT_BIAS,
    "activation scalars": SCALAR,
    "moe router": ROUTER,
    "moe wi": EXPERT_IN,
    "moe wo": EXPERT_OUT,
}

# --- activations -----------------------------------------------------------------------------
TOKENS = (BATCH, SEQ)
HIDDEN = (BATCH, SEQ, EMBD)  # the residual stream
QUERIES = (BATCH, SEQ, HEADS, KV)
KEYS_VALUES = (BATCH, KV_SEQ, HEADS, KV)  # one key/value per query head
GROUPED_KEYS_VALUES = (BATCH, KV_SEQ, KV_HEADS, KV)  # as projected, before grouping
MLP_HIDDEN = (BATCH, SEQ, MLP)
LOGITS = (BATCH, SEQ, VOCAB)
# MoE tokens in routing groups [groups, group size, embd]. (The experts' inputs [experts, groups,
# capacity, embd] split groups over the batch axes that `experts` does not use, so they are
# pinned in models/moe.py rather than named here: `batch:x,experts:x` is legal.)
GROUPS = (BATCH, None, EMBD)
# The decoding cache, laid out for the matmuls that read it every step (see models/attention).
CACHED_KEYS = (BATCH, KV_HEADS, KV, KV_SEQ)
CACHED_VALUES = (BATCH, KV_HEADS, KV_SEQ, KV)

ACTIVATIONS = {
    "tokens": TOKENS,
    "hidden": HIDDEN,
    "queries": QUERIES,
    "keys/values": KEYS_VALUES,
    "grouped keys/values": GROUPED_KEYS_VALUES,
    "mlp hidden": MLP_HIDDEN,
    "logits": LOGITS,
    "moe groups": GROUPS,
    "cached keys": CACHED_KEYS,
    "cached values": CACHED_VALUES,
}

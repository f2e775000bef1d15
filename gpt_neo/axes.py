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
HEADS = "heads"  # attention heads
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
LOGICAL = frozenset(GPT_NEO_NAMES.values())

# --- parameters ------------------------------------------------------------------------------
TOKEN_EMBEDDING = (VOCAB, EMBD)
POSITION_EMBEDDING = (POS, EMBD)
NORM = (EMBD,)  # LayerNorm scale and bias
QKV = (EMBD, HEADS, KV)  # q, k, v projections
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
    "attn q/k/v": QKV,
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
KEYS_VALUES = (BATCH, KV_SEQ, HEADS, KV)
MLP_HIDDEN = (BATCH, SEQ, MLP)
LOGITS = (BATCH, SEQ, VOCAB)
# MoE tokens in routing groups [groups, group size, embd]. (The experts' inputs [experts, groups,
# capacity, embd] split groups over the batch axes that `experts` does not use, so they are
# pinned in models/moe.py rather than named here: `batch:x,experts:x` is legal.)
GROUPS = (BATCH, None, EMBD)
# The decoding cache, laid out for the matmuls that read it every step (see models/attention).
CACHED_KEYS = (BATCH, HEADS, KV, KV_SEQ)
CACHED_VALUES = (BATCH, HEADS, KV_SEQ, KV)

ACTIVATIONS = {
    "tokens": TOKENS,
    "hidden": HIDDEN,
    "queries": QUERIES,
    "keys/values": KEYS_VALUES,
    "mlp hidden": MLP_HIDDEN,
    "logits": LOGITS,
    "moe groups": GROUPS,
    "cached keys": CACHED_KEYS,
    "cached values": CACHED_VALUES,
}

"""Model shapes the benchmarks share, as GPT-Neo config keys."""

# A 6-layer d512 model: the size the demo model had first, large enough that matmuls dominate.
DEMO_SIZE = {
    "n_layer": 6,
    "n_embd": 512,
    "n_head": 8,
    "n_ctx": 512,
    "n_vocab": 8192,
    "attention_types": ["global", "local"] * 3,
    "local_attention_radius": 128,
}

"""Shared test helpers: paths, a tiny config, random Hugging Face GPT-Neo models."""

from pathlib import Path

import numpy as np

from gpt_neo.config import from_dict

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
GPT_NEO_CONFIGS = SHARED / "fixtures" / "gpt-neo-configs"


def tiny_config(**overrides):
    """A small model with every layer kind; override any key."""
    keys = {
        "n_embd": 64,
        "n_head": 8,
        "n_layer": 4,
        "n_ctx": 32,
        "n_vocab": 128,
        "attention_types": ["global", "local", "linear", "none"],
        "local_attention_radius": 8,
    }
    return from_dict({**keys, **overrides}, source="tiny_config")


def random_tokens(cfg, batch=8, length=None, seed=0):
    length = cfg.n_ctx if length is None else length
    return np.random.default_rng(seed).integers(0, cfg.n_vocab, (batch, length)).astype(np.int32)


def random_hf_model(folder, *, seed=0, safetensors=True, **config):
    """Save a random-weight GPTNeoForCausalLM (no download) with every weight perturbed,
    so that LayerNorm gains and biases are not at their trivial init values."""
    import torch
    from transformers import GPTNeoConfig, GPTNeoForCausalLM

    torch.manual_seed(seed)
    model = GPTNeoForCausalLM(GPTNeoConfig(**config)).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    if safetensors:
        model.save_pretrained(folder)
    else:  # the legacy format older checkpoints ship; transformers 5 no longer writes it
        model.config.save_pretrained(folder)
        torch.save(model.state_dict(), Path(folder) / "pytorch_model.bin")
    return model


def hf_logits(model, tokens):
    import torch

    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(tokens), dtype=torch.long)).logits.numpy()


SAMPLE_TEXTS = [
    "def f(x):\n    return x + 1\n",
    "  leading spaces and trailing  \n\n",
    "Unicode: naïve café — “quotes” ﬁ ligature, full-width ２０２６, emoji 🚀, tab\tend",
    "A literal <|endoftext|> inside a document stays text.",
    "Ünïcödé " * 20,
]


def train_tokenizer_file(folder, texts=SAMPLE_TEXTS, vocab_size=400):
    """A small byte-level BPE trained on the fly; returns its tokenizer.json path."""
    from gpt_neo.encoders import TRAINED_TOKENIZER_NAME, train_byte_level_bpe

    tokenizer = train_byte_level_bpe(texts * 20, vocab_size)
    path = Path(folder) / TRAINED_TOKENIZER_NAME
    tokenizer.save(str(path))
    return path

"""Training speed on one GPU: our train step at the 125M and 1.3B shapes (T = 2048, bfloat16,
cuDNN flash attention), with full remat and without, as tokens/s and MFU against the chip's
dense bfloat16 peak (`gpt_neo.hardware`); beside each shape, the same training step of Hugging
Face's `GPTNeoForCausalLM` in PyTorch (bfloat16 autocast, AdamW; SDPA attention where
transformers gives GPT-Neo one, else its eager attention, which is what `transformers` 5 has)
on the same GPU, as the peer ratio. For a lent GPU machine (bench/gpu_check.sh runs it): nothing here
imports TensorFlow, batches are random token ids made in NumPy.

    python bench/gpu_mfu.py [--sizes 125M 1.3B] [--steps 10] [--no_torch]

Each side: one step to compile (or warm up), then `--steps` timed steps; the step's loss is
read back at the end only. MFU counts 6N + 12LHQT FLOPs per token (PaLM's convention, N
without the position embedding), the figure the training loop reports.
"""

import argparse
import os
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.85")  # leave PyTorch some room

import jax
import numpy as np

from gpt_neo.config import from_dict
from gpt_neo.hardware import chip
from gpt_neo.mesh import make_mesh
from gpt_neo.models.gpt import flops_per_token
from gpt_neo.training.metrics import FLOP_CONVENTION
from gpt_neo.training.trainer import Trainer

GPT_NEO = {"n_vocab": 50257, "n_ctx": 2048, "local_attention_radius": 256}
SIZES = {  # GPT-Neo's released shapes; sequences per step that fit 80 GB with and without remat
    "125M": ({**GPT_NEO, "n_embd": 768, "n_head": 12, "n_layer": 12}, {True: 16, False: 16}),
    "1.3B": ({**GPT_NEO, "n_embd": 2048, "n_head": 16, "n_layer": 24}, {True: 8, False: 4}),
}


def config(size: str, remat: bool):
    shape, batches = SIZES[size]
    return from_dict(
        {
            **shape,
            "attention_types": [[["global", "local"], shape["n_layer"] // 2]],
            "precision": "bfloat16",
            "attention_kernel": "cudnn",
            "recompute_grad": remat,
            "train_batch_size": batches[remat],
            "mesh_shape": "x:1",
            "lr": 1e-4,
            "weight_decay": 0.1,
        }
    )


def ours(cfg, steps: int) -> float:
    """Seconds per step of our jitted train step."""
    trainer = Trainer(cfg, make_mesh(cfg, devices=jax.devices()[:1]))
    state = trainer.init_state(0)
    rows = np.random.default_rng(0).integers(0, cfg.n_vocab, (cfg.train_batch_size, cfg.n_ctx + 1))
    with jax.set_mesh(trainer.mesh):
        batch = trainer.place(rows.astype(np.int32))
        state, metrics = trainer.step(state, batch)
        jax.block_until_ready(metrics)
        start = time.perf_counter()
        for _ in range(steps):
            state, metrics = trainer.step(state, batch)
        loss = float(metrics["loss"])
    seconds = (time.perf_counter() - start) / steps
    assert np.isfinite(loss), f"loss {loss}"
    return seconds


def pytorch(cfg, steps: int) -> float:
    """Seconds per step of Hugging Face's GPTNeoForCausalLM + torch AdamW, bf16 autocast."""
    import torch
    from transformers import GPTNeoConfig, GPTNeoForCausalLM

    from gpt_neo.interop.hf import hf_config

    # transformers' GPT-Neo has no SDPA path (`_supports_sdpa` is False): eager attention then
    implementation = "sdpa" if GPTNeoForCausalLM._supports_sdpa else "eager"
    model = GPTNeoForCausalLM(GPTNeoConfig(**hf_config(cfg), attn_implementation=implementation))
    model = model.cuda().train()
    if cfg.recompute_grad:
        model.gradient_checkpointing_enable()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    rows = np.random.default_rng(0).integers(0, cfg.n_vocab, (cfg.train_batch_size, cfg.n_ctx + 1))
    ids = torch.as_tensor(rows, dtype=torch.long, device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids[:, :-1], labels=ids[:, :-1]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        loss = step()
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / steps
    assert torch.isfinite(loss).item()
    return seconds  # the model and optimizer go with this frame


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", choices=list(SIZES), default=list(SIZES))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--no_torch", action="store_true", help="skip the PyTorch peer")
    args = parser.parse_args()
    device = jax.devices()[0]
    known = chip(device.device_kind)
    peak = known.peak_flops if known else None
    print(
        f"{device.device_kind}, jax {jax.__version__}; bf16 peak {peak and peak / 1e12:.0f} TFLOP/s"
    )
    print(
        "| shape | remat | batch | ours tokens/s | ours MFU | PyTorch tokens/s | PyTorch MFU | ours/PyTorch |"
    )
    print("|" + "---|" * 8)
    for size in args.sizes:
        for remat in (True, False):
            cfg = config(size, remat)
            tokens = cfg.train_batch_size * cfg.n_ctx
            flops = flops_per_token(cfg, FLOP_CONVENTION)
            mine = tokens / ours(cfg, args.steps)
            theirs = None if args.no_torch else tokens / pytorch(cfg, args.steps)
            if theirs is not None:
                import torch

                torch.cuda.empty_cache()  # its memory back for our next shape

            def mfu(rate, flops=flops):
                return "-" if rate is None or peak is None else f"{100 * rate * flops / peak:.1f}%"

            print(
                f"| {size} | {'full' if remat else 'none'} | {cfg.train_batch_size} | {mine:,.0f} | "
                f"{mfu(mine)} | {'-' if theirs is None else f'{theirs:,.0f}'} | {mfu(theirs)} | "
                f"{'-' if theirs is None else f'{mine / theirs:.2f}x'} |",
                flush=True,
            )


if __name__ == "__main__":
    main()

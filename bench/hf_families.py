"""Ours against transformers' PyTorch on the CPU, a Qwen3-style model: train step, decoding.

The same weights on both sides (a `Qwen3ForCausalLM` at random init, imported into ours): a
training step, and greedy decoding at batch 1, in one process.

    python bench/hf_families.py [--rounds 3] [--steps 3] [--batch 8] [--n_ctx 256]
                                [--new_tokens 128] [--threads N]

The model: transformers' Qwen3 at random init (seed 0, float32), hidden 512, 8 layers, 8 query
heads of 64 and 2 key/value heads (grouped-query attention), QK-norm, SwiGLU MLP of 1536, RMSNorm,
vocabulary 8192, tied embeddings: about 28M parameters. Ours gets the same weights from the
saved folder with `gpt_neo.interop.hf.import_hf` (docs/model-families.md), and
the first step's loss of both sides is printed to show they compute the same model.

Training: forward, backward and AdamW update (lr 3e-4, weight decay 0.1, gradient clipping
1.0) on one batch of `--batch` rows of `--n_ctx` tokens, float32, no dropout, no
recomputation. Ours is the project's jitted train step (`Trainer.step`, layers scanned as by
default); theirs is eager PyTorch (`model(input_ids).logits`, cross-entropy on the next token,
`loss.backward()`, `clip_grad_norm_`, `torch.optim.AdamW`). A warm-up step on each side
(ours compiles there), then `--rounds` rounds of `--steps` steps, the sides alternating, each
side's best round kept (noise only ever slows a side).

Decoding: one 32-token prompt, `--new_tokens` new tokens, greedy. Ours is
`gpt_neo.generate(..., temperature=0.0)` (one warm-up call compiles the decoder, so compile
time is excluded); theirs is `model.generate(do_sample=False, use_cache=True)` with
`min_new_tokens` equal so both make every token. Same alternation, best of `--rounds`. The
two greedy outputs are compared token for token.

Threads: JAX's CPU client runs its matmuls on every core this process may use; PyTorch is
given the same count (`torch.set_num_threads`, `--threads` to change it).

Targets: ours trains at least as fast per token as PyTorch, and decodes at least 2x `generate`.
"""

import argparse
import os
import shutil
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # a CPU figure unless asked: no TPU probing
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax
import jax.numpy as jnp
import numpy as np

import gpt_neo
from gpt_neo.data.batch import Batch
from gpt_neo.models.gpt import param_count
from gpt_neo.training.trainer import Trainer

QWEN3 = {
    "vocab_size": 8192,
    "hidden_size": 512,
    "intermediate_size": 1536,
    "num_hidden_layers": 8,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1_000_000.0,
    "tie_word_embeddings": True,
    "attention_dropout": 0.0,
    "bos_token_id": None,
    "eos_token_id": None,
    "pad_token_id": None,
}
TRAINING = {  # run keys of ours: the same step PyTorch takes
    "precision": "float32",
    "recompute_grad": False,
    "opt_name": "adam",
    "lr": 3e-4,
    "lr_decay": "constant",
    "warmup_steps": 0,
    "beta1": 0.9,
    "beta2": 0.95,
    "epsilon": 1e-8,
    "weight_decay": 0.1,
    "gradient_clipping": 1.0,
    "mesh_shape": "x:1",
    "layout": "batch:x",
}
PROMPT_TOKENS = 32


def theirs_model(n_ctx: int):
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    config = Qwen3Config(**QWEN3, max_position_embeddings=n_ctx)
    return Qwen3ForCausalLM(config).float()


def ours_from(folder: str, batch: int):
    """(cfg, params) from the saved folder: `import_hf` and the training keys."""
    from gpt_neo.interop.hf import import_hf

    cfg, params = import_hf(folder, overrides={**TRAINING, "train_batch_size": batch})
    return cfg, params


# --------------------------------------------------------------------------------------------
# Training


def ours_training(cfg, params, tokens: np.ndarray):
    """A function that runs `n` train steps and returns the last loss; the first call compiles."""
    trainer = Trainer(cfg, gpt_neo.make_mesh(cfg))
    shardings = trainer.state_shardings
    with jax.set_mesh(trainer.mesh):
        params = jax.device_put(params, shardings["params"])
        opt_state = jax.jit(trainer.optimizer.init, out_shardings=shardings["opt_state"])(params)
        state = {
            "params": params,
            "opt_state": opt_state,
            "step": jax.device_put(jnp.int32(0), trainer.replicated),
            "rng": jax.device_put(jax.random.key_data(jax.random.key(0)), trainer.replicated),
        }
        batch = trainer.place(Batch(tokens))
    box = [state]

    def run(n: int) -> float:
        with jax.set_mesh(trainer.mesh):
            state = box[0]
            for _ in range(n):
                state, metrics = trainer.step(state, batch)
            box[0] = state
            return float(jax.block_until_ready(metrics)["loss"])

    return run


def theirs_training(model, tokens: np.ndarray):
    import torch
    import torch.nn.functional as F

    model.train()
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=3e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1
    )
    x = torch.tensor(tokens[:, :-1], dtype=torch.long)
    y = torch.tensor(tokens[:, 1:], dtype=torch.long)

    def run(n: int) -> float:
        for _ in range(n):
            logits = model(input_ids=x, use_cache=False).logits
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
        return loss.item()

    return run


def alternate(sides: dict, rounds: int, work) -> dict[str, float]:
    """Each side's best seconds per call of `work(run)` over `rounds` alternating rounds."""
    best = dict.fromkeys(sides, np.inf)
    for _ in range(rounds):
        for name, run in sides.items():
            start = time.perf_counter()
            work(run)
            best[name] = min(best[name], time.perf_counter() - start)
    return best


# --------------------------------------------------------------------------------------------
# Decoding


def ours_decoding(cfg, params, prompt: list[int], new_tokens: int):
    def run() -> list[int]:
        [out] = gpt_neo.generate(
            cfg, params, [prompt], max_new_tokens=new_tokens, temperature=0.0, eos_id=-1
        )
        return out

    return run


def theirs_decoding(model, prompt: list[int], new_tokens: int):
    import torch

    model.eval()
    ids = torch.tensor([prompt])

    def run() -> list[int]:
        with torch.no_grad():
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                use_cache=True,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                pad_token_id=0,
                eos_token_id=None,
            )
        return out[0, len(prompt) :].tolist()

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="alternating timed rounds per side")
    parser.add_argument("--steps", type=int, default=3, help="train steps per timed round")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--n_ctx", type=int, default=256)
    parser.add_argument("--new_tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    args = parser.parse_args()

    import torch
    import transformers

    torch.set_num_threads(args.threads)
    transformers.utils.logging.disable_progress_bar()
    model = theirs_model(args.n_ctx)
    folder = tempfile.mkdtemp()  # the weights both sides start from; removed at the end
    model.save_pretrained(folder)
    cfg, params = ours_from(folder, args.batch)
    n_theirs = sum(p.numel() for p in model.parameters())
    print(
        f"Qwen3-style model: {cfg.n_layer} layers, n_embd {cfg.n_embd}, {cfg.n_head} heads x "
        f"{cfg.head_dim} ({cfg.n_kv_head} key/value heads), MLP {cfg.d_mlp}, vocab {cfg.n_vocab}; "
        f"{param_count(cfg):,} parameters (transformers counts {n_theirs:,}), float32"
    )
    print(
        f"CPU: {jax.device_count()} JAX device, {len(os.sched_getaffinity(0))} cores for this "
        f"process; JAX uses all of them, torch.set_num_threads({torch.get_num_threads()}); "
        f"jax {jax.__version__}, torch {torch.__version__}, transformers {transformers.__version__}"
    )

    # training
    tokens = np.random.default_rng(0).integers(0, cfg.n_vocab, (args.batch, cfg.n_ctx + 1))
    tokens = tokens.astype(np.int32)
    sides = {
        "ours": ours_training(cfg, params, tokens),
        "torch": theirs_training(model, tokens),
    }
    first = {name: run(1) for name, run in sides.items()}  # warm-up; ours compiles
    print(
        f"first step's loss: ours {first['ours']:.5f}, torch {first['torch']:.5f} (same weights, "
        f"same batch; ln vocab {np.log(cfg.n_vocab):.3f})"
    )
    seconds = alternate(sides, args.rounds, lambda run: run(args.steps))
    per_round = args.steps * args.batch * cfg.n_ctx
    train = {name: per_round / s for name, s in seconds.items()}
    train_ratio = train["ours"] / train["torch"]
    print(
        f"training, batch {args.batch} x {cfg.n_ctx}, forward + backward + AdamW, best of "
        f"{args.rounds} rounds of {args.steps} steps:"
    )
    for name in sides:
        print(
            f"  {name:>5}: {train[name]:8,.0f} tok/s "
            f"({1e3 * seconds[name] / args.steps:.0f} ms/step)"
        )
    print(f"  ours / torch: {train_ratio:.2f}x")

    # decoding
    prompt = np.random.default_rng(1).integers(0, cfg.n_vocab, PROMPT_TOKENS).tolist()
    # training moved the weights apart by float rounding: decode from the saved ones on both
    model = type(model).from_pretrained(folder).float()
    cfg, params = ours_from(folder, args.batch)
    shutil.rmtree(folder)
    decoders = {
        "ours": ours_decoding(cfg, params, prompt, args.new_tokens),
        "torch": theirs_decoding(model, prompt, args.new_tokens),
    }
    outputs = {name: run() for name, run in decoders.items()}  # warm-up; ours compiles
    seconds = alternate(decoders, args.rounds, lambda run: run())
    decode = {name: args.new_tokens / s for name, s in seconds.items()}
    decode_ratio = decode["ours"] / decode["torch"]
    print(
        f"decoding, batch 1, {PROMPT_TOKENS}-token prompt, {args.new_tokens} new tokens, "
        f"greedy, best of {args.rounds}:"
    )
    for name in decoders:
        print(f"  {name:>5}: {decode[name]:8,.0f} tok/s")
    print(f"  ours / torch: {decode_ratio:.2f}x")
    a, b = outputs["ours"], outputs["torch"]
    if a == b:
        print(f"greedy tokens: equal ({len(a)} of {len(b)})")
    else:
        at = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), len(a))
        print(
            f"greedy tokens: DIFFER from new token {at} on (ours {a[at : at + 5]}..., "
            f"torch {b[at : at + 5]}...); {len(a)} and {len(b)} tokens"
        )

    verdicts = [
        ("training tok/s at least torch's", train_ratio >= 1.0),
        ("decoding at least 2x torch generate", decode_ratio >= 2.0),
        ("greedy tokens equal", a == b),
    ]
    for what, ok in verdicts:
        print(f"target {what}: {'met' if ok else 'MISSED'}")


if __name__ == "__main__":
    main()

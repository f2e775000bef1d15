"""The train step's own cost: `main.py` end to end and the project's jitted step, each against
an independent minimal jitted step (the model's forward pass, cross-entropy, optax's global-norm
clip and AdamW: nothing else) on the same shapes, in one invocation.

    python bench/step_cost.py [--steps 150] [--rounds 3] [--devices 1]

The config (a small CPU model, where a step's fixed costs show): 2 layers, d128, 4 heads,
n_ctx 128, vocab 4096, batch 8, float32, all-global attention, records of 257 tokens of which
the first 129 are used. `main.py` logs every 10 steps and saves a checkpoint every 50; its
rate is taken between steps 20 and 140 from metrics.jsonl's clock. The two jitted steps run
in one process on one batch already placed, alternating 10-step intervals over `--rounds`
rounds; each side's best round is kept. Printed: tokens/s of each, main.py / minimal (target
at least 0.90) and step / minimal.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from train_end_to_end import (
    BATCH,
    LOG_EVERY,
    REPO,
    end_to_end,
    environment,
    model_config,
    write_dataset,
)

SHAPE = {"n_layer": 2, "n_embd": 128, "n_head": 4, "n_ctx": 128, "n_vocab": 4096}
RECORD_TOKENS = 257
CHECKPOINT_EVERY = 50
FROM_STEP, TO_STEP = 20, 140

# Run in a fresh process: the device count is fixed when JAX starts.
STEPS_SIDE_BY_SIDE = """
import json, sys, time
import jax, jax.numpy as jnp, numpy as np, optax
import gpt_neo
from gpt_neo.models.gpt import forward
from gpt_neo.training.trainer import Trainer

cfg = gpt_neo.load_config(sys.argv[1])
rounds, steps = int(sys.argv[2]), int(sys.argv[3])
trainer = Trainer(cfg, gpt_neo.make_mesh(cfg))
tokens = np.random.default_rng(0).integers(0, cfg.n_vocab, (cfg.train_batch_size, cfg.n_ctx + 1))
optimizer = optax.chain(
    optax.clip_by_global_norm(cfg.gradient_clipping),
    optax.adamw(cfg.lr, b1=cfg.beta1, b2=cfg.beta2, eps=cfg.epsilon, weight_decay=cfg.weight_decay),
)

def loss(params, batch):
    logits = forward(cfg, params, batch[:, :-1]).logits[..., : cfg.n_vocab]
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()

@jax.jit
def minimal(state, batch):
    params, opt_state = state
    value, grads = jax.value_and_grad(loss)(params, batch)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), {"loss": value}

with jax.set_mesh(trainer.mesh):
    batch = trainer.place(tokens.astype(np.int32))
    project = trainer.init_state(0)
    params = jax.tree.map(jnp.copy, project["params"])  # the project's step donates its own
    bare = (params, optimizer.init(params))
    sides = {"step": [project, trainer.step], "minimal": [bare, minimal]}
    best = {}
    for _ in range(rounds):
        for name, side in sides.items():
            state, step = side
            state, metrics = step(state, batch)  # compiled in the first round
            jax.block_until_ready(metrics)
            start = time.perf_counter()
            for _ in range(steps):
                state, metrics = step(state, batch)
            jax.block_until_ready(metrics)
            side[0] = state
            best[name] = min(best.get(name, 1e9), time.perf_counter() - start)
print(json.dumps(best))
"""


def jitted_steps(model: str, devices: int, rounds: int) -> dict[str, float]:
    """Seconds of TO_STEP - FROM_STEP steps of each jitted step, best of `rounds`."""
    out = subprocess.run(
        [sys.executable, "-c", STEPS_SIDE_BY_SIDE, model, str(rounds), str(TO_STEP - FROM_STEP)],
        env=environment(devices),
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    if out.returncode:
        raise SystemExit(f"the jitted steps failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=150, help="main.py's training steps")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--devices", type=int, default=1)
    args = parser.parse_args()
    tokens = (TO_STEP - FROM_STEP) * BATCH * SHAPE["n_ctx"]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        dataset = write_dataset(folder / "data", SHAPE["n_ctx"], RECORD_TOKENS)
        model = model_config(folder, SHAPE, args.devices, args.steps, dataset, weight_decay=0.1)
        e2e = None
        for _ in range(args.rounds):
            intervals = end_to_end(model, args.devices)
            first = FROM_STEP // LOG_EVERY - 1  # interval i runs from step 10 * (i + 1)
            seconds = sum(intervals[first : first + (TO_STEP - FROM_STEP) // LOG_EVERY])
            e2e = seconds if e2e is None else min(e2e, seconds)
        steps = jitted_steps(model, args.devices, args.rounds)
    rates = {"main.py": tokens / e2e, **{k: tokens / v for k, v in steps.items()}}
    print(
        f"{os.cpu_count()} cores, {args.devices} device(s): 2 layers d128 n_ctx 128 vocab 4096 "
        f"batch {BATCH} fp32; tokens/s between steps {FROM_STEP} and {TO_STEP}"
    )
    print(f"{'minimal step':<14} {rates['minimal']:>10,.0f}")
    print(f"{'project step':<14} {rates['step']:>10,.0f}  {rates['step'] / rates['minimal']:.2f}x")
    print(
        f"{'main.py':<14} {rates['main.py']:>10,.0f}  {rates['main.py'] / rates['minimal']:.2f}x "
        "(target >= 0.90)"
    )


if __name__ == "__main__":
    main()

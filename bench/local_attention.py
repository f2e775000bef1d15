"""Local (sliding-window) attention: blocked O(T * window) kernel vs the dense O(T^2) mask.

Prints the time of each at growing sequence lengths and their ratio, measured in one process
(absolute seconds depend on the machine; the ratio and its growth are what to read).

    python bench/local_attention.py [--window 256] [--heads 8] [--head-dim 64]
"""

import argparse
import time

import jax
import jax.numpy as jnp

from gpt_neo.models.attention import blocked_local_attention, dense_attention


def seconds_per_call(fn, *args, repeats=5):
    fn(*args).block_until_ready()  # compile
    start = time.perf_counter()
    for _ in range(repeats):
        fn(*args).block_until_ready()
    return (time.perf_counter() - start) / repeats


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    args = parser.parse_args()
    dense = jax.jit(lambda q, k, v: dense_attention(q, k, v, window=args.window))
    blocked = jax.jit(lambda q, k, v: blocked_local_attention(q, k, v, window=args.window))
    print(
        f"backend {jax.default_backend()}, window {args.window}, {args.heads} heads x {args.head_dim}"
    )
    print(f"{'T':>6} {'dense ms':>10} {'blocked ms':>11} {'dense/blocked':>14}")
    for t in args.lengths:
        keys = jax.random.split(jax.random.key(t), 3)
        q, k, v = (
            jax.random.normal(key, (1, t, args.heads, args.head_dim), jnp.float32) for key in keys
        )
        d, b = seconds_per_call(dense, q, k, v), seconds_per_call(blocked, q, k, v)
        print(f"{t:>6} {d * 1e3:>10.1f} {b * 1e3:>11.1f} {d / b:>14.2f}")


if __name__ == "__main__":
    main()

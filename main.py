"""GPT-Neo command line: python main.py --model cfg.json [--set key=value ...] --summary"""

from __future__ import annotations

import argparse
import sys
import time


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Train and inspect GPT-Neo models on JAX (TPU, GPU or CPU).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Bad configs exit with code 2 and one message naming the problem.",
    )
    parser.add_argument(
        "--model",
        nargs="+",
        required=True,
        metavar="CONFIG",
        help="model config JSON file(s), or names of files in configs/; several merge in "
        "order, later files win",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="extend",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key (value parsed as JSON, else a string); repeatable, "
        "applied after all --model files",
    )
    parser.add_argument(
        "--check_dataset",
        action="store_true",
        help="print decoded samples and the token-id range of each dataset; exit 1 if an id is "
        ">= n_vocab",
    )
    parser.add_argument(
        "--check_records",
        type=int,
        default=10_000,
        metavar="N",
        help="--check_dataset reads the first N records of each dataset (0: all)",
    )
    parser.add_argument(
        "--summary",
        action="store_true",
        help="print parameter count, FLOPs/token, per-device memory and parameter shardings, "
        "then run one forward pass on random tokens if the devices match mesh_shape",
    )
    return parser.parse_args(argv)


def forward_check(cfg) -> None:
    """One forward pass over random tokens on the configured mesh, with its loss."""
    import jax
    import numpy as np

    import gpt_neo
    from gpt_neo.mesh import layout_rules, mesh_axes

    sizes = mesh_axes(cfg) or {"x": jax.device_count()}
    needed = int(np.prod(list(sizes.values())))
    if needed != jax.device_count():
        print(
            f"forward pass skipped: mesh_shape needs {needed} devices, {jax.device_count()} "
            f"{jax.default_backend()} device(s) present"
        )
        return
    mesh = gpt_neo.make_mesh(cfg)
    batch = sizes.get(layout_rules(cfg).get("batch"), 1)
    tokens = np.random.default_rng(0).integers(0, cfg.n_vocab, (batch, cfg.n_ctx))
    start = time.perf_counter()
    params = gpt_neo.init_params(cfg, seed=cfg.seed, mesh=mesh)
    logits = gpt_neo.apply(cfg, params, tokens)
    logits.block_until_ready()
    seconds = time.perf_counter() - start
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    loss = -float(np.mean(np.take_along_axis(np.asarray(logp), tokens[:, 1:, None], axis=-1)))
    print(
        f"forward pass on {mesh.size} {jax.default_backend()} devices {dict(mesh.shape)}: "
        f"logits {tuple(logits.shape)} {logits.dtype}, sharded {logits.sharding.spec}; "
        f"loss at init {loss:.3f} (ln n_vocab = {np.log(cfg.n_vocab):.3f}); "
        f"init+compile+run {seconds:.1f}s"
    )


def main(argv=None) -> int:
    args = parse_args(argv)
    from gpt_neo.config import ConfigError, load_config

    try:
        cfg = load_config(args.model, overrides=args.overrides)
        if args.check_dataset:
            from gpt_neo.inputs import check_datasets

            if not cfg.datasets:
                raise ConfigError("the model config lists no 'datasets' to check")
            return 0 if check_datasets(cfg, max_records=args.check_records) else 1
        if not args.summary:
            print(
                "nothing to do: training is not available yet; pass --summary or --check_dataset",
                file=sys.stderr,
            )
            return 2
        from gpt_neo.summary import print_summary

        print_summary(cfg)
        forward_check(cfg)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

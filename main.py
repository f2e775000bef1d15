"""GPT-Neo command line.

    python main.py --model cfg.json                  # train (resumes from model_path)
    python main.py --model cfg.json --summary        # parameters, FLOPs, memory, shardings
    python main.py --model cfg.json --check_dataset  # decoded samples, token-id range
    python main.py --model cfg.json --predict [--prompt file.txt] [--interactive]
    python main.py --model cfg.json --eval [--lambada_path f.jsonl] [--wikitext_path f.txt]
    python main.py --model cfg.json --export OUT_DIR # a Hugging Face GPTNeoForCausalLM folder

Exit codes: 0 done, 1 --check_dataset found a problem, 2 bad input (config, data, paths),
3 training diverged (non-finite loss; the last checkpoint is kept), 75 preempted by SIGTERM
(a checkpoint was written: run the same command again to resume).
"""

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
        "--steps_per_checkpoint",
        type=int,
        default=5000,
        metavar="N",
        help="save a checkpoint (and evaluate, if eval_steps > 0) every N steps",
    )
    parser.add_argument(
        "--new", action="store_true", help="delete model_path first (asks to confirm)"
    )
    parser.add_argument("--yes", action="store_true", help="with --new: do not ask")
    parser.add_argument(
        "--sacred_id",
        default="nosacred",
        help="a name for this run, kept in its sacred record (GPT-Neo's run_experiment.py id)",
    )
    parser.add_argument(
        "--sacred_mongo_url",
        metavar="URL",
        help="record the run in this MongoDB with sacred's MongoObserver (default: files under "
        "model_path/sacred)",
    )
    parser.add_argument("--tpu", metavar="NAME", help="run on this TPU VM's chips")
    parser.add_argument(
        "--gpu_ids", nargs="+", metavar="ID", help="run on these GPUs (0 1 ... or device:GPU:0 ...)"
    )
    parser.add_argument(
        "--skip_corrupt_records",
        action="store_true",
        help="skip damaged TFRecords (reported) instead of stopping",
    )
    parser.add_argument(
        "--coordinator_address", metavar="HOST:PORT", help="multi-process: process 0's address"
    )
    parser.add_argument(
        "--num_processes", type=int, metavar="N", help="multi-process: how many processes"
    )
    parser.add_argument(
        "--process_id", type=int, metavar="I", help="multi-process: this process's index"
    )
    parser.add_argument(
        "--summary",
        action="store_true",
        help="print parameter count, FLOPs/token, per-device memory and parameter shardings, "
        "then run one forward pass on random tokens if the devices match mesh_shape",
    )
    modes = parser.add_argument_group(
        "sampling, evaluation and export (from the latest checkpoint)"
    )
    modes.add_argument(
        "--predict",
        action="store_true",
        help="sample predict_batch_size continuations of the prompt; print them and write "
        "model_path/predictions_<step>.txt",
    )
    modes.add_argument(
        "--prompt",
        metavar="FILE",
        help="text file holding the prompt (default: GPT-Neo's unicorn prompt); a prompt longer "
        "than n_ctx - 1 tokens keeps its end",
    )
    modes.add_argument(
        "--interactive",
        action="store_true",
        help="read prompts from stdin, one per line, and stream the continuations (implies "
        "--predict)",
    )
    modes.add_argument(
        "--temperature", type=float, default=0.9, help="0 is greedy (default 0.9, as GPT-Neo)"
    )
    modes.add_argument("--top_k", type=int, default=0, help="keep the k likeliest tokens (0: off)")
    modes.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling mass (1.0: off)")
    modes.add_argument(
        "--max_new_tokens",
        type=int,
        metavar="N",
        help="new tokens per sample (default predict_max_steps, else up to n_ctx)",
    )
    modes.add_argument("--seed", type=int, default=0, help="sampling seed")
    modes.add_argument(
        "--eval",
        action="store_true",
        help="eval loss/perplexity on eval_path (eval_steps batches) and the tasks named by "
        "--eval_tasks or the config's eval_tasks; prints a table, writes model_path/eval_<step>.json",
    )
    modes.add_argument(
        "--eval_tasks",
        nargs="+",
        choices=("lambada", "wikitext"),
        help="tasks to run (default: the config's eval_tasks, plus any whose file is given)",
    )
    modes.add_argument("--lambada_path", metavar="FILE", help='LAMBADA jsonl of {"text": ...}')
    modes.add_argument(
        "--lambada_last_token",
        action="store_true",
        help="score LAMBADA's last token only (GPT-Neo's way) instead of the last word",
    )
    modes.add_argument("--wikitext_path", metavar="FILE", help="text file for word perplexity")
    modes.add_argument(
        "--export",
        metavar="OUT_DIR",
        help="write a Hugging Face GPTNeoForCausalLM folder (safetensors, config.json, tokenizer)",
    )
    modes.add_argument("--force", action="store_true", help="with --export: overwrite OUT_DIR")
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


def delete_model_path(model_path: str, assume_yes: bool) -> None:
    from gpt_neo.tfrecords import tf

    t = tf()
    if not t.io.gfile.exists(model_path):
        return
    if not assume_yes:
        answer = input(f"--new: delete everything in {model_path}? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            raise SystemExit("not deleted; nothing done")
    t.io.gfile.rmtree(model_path)
    print(f"deleted {model_path}")


def run_training(cfg, args) -> int:
    from gpt_neo import launch
    from gpt_neo.checkpoint import Checkpointer
    from gpt_neo.config import ConfigError
    from gpt_neo.inputs import InputPipeline
    from gpt_neo.mesh import make_mesh
    from gpt_neo.metrics import Metrics, with_run_record
    from gpt_neo.train import EXIT_DIVERGED, TrainingDiverged, train

    if not cfg.model_path:
        raise ConfigError("set model_path in the config (where checkpoints and logs go)")
    if args.steps_per_checkpoint < 1:
        raise ConfigError("--steps_per_checkpoint must be at least 1")
    launch.initialize_distributed(args.coordinator_address, args.num_processes, args.process_id)
    if args.new:
        delete_model_path(cfg.model_path, args.yes)
    mesh = make_mesh(cfg)
    pipeline = InputPipeline(cfg, skip_corrupt=args.skip_corrupt_records)
    checkpointer = Checkpointer(cfg.model_path, cfg.keep_checkpoints)

    def body(run):
        metrics = Metrics(cfg, cfg.model_path, run=run)
        return train(
            cfg,
            mesh,
            steps_per_checkpoint=args.steps_per_checkpoint,
            checkpointer=checkpointer,
            metrics=metrics,
            pipeline=pipeline,
        )

    try:
        return with_run_record(
            cfg, cfg.model_path, body, sacred_id=args.sacred_id, mongo_url=args.sacred_mongo_url
        )
    except TrainingDiverged as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_DIVERGED
    finally:
        checkpointer.close()


def main(argv=None) -> int:
    args = parse_args(argv)
    from gpt_neo import launch

    launch.select_platform(args.tpu, args.gpu_ids)
    from gpt_neo.config import ConfigError, load_config

    try:
        cfg = load_config(args.model, overrides=args.overrides)
        if args.check_dataset:
            from gpt_neo.inputs import check_datasets

            if not cfg.datasets:
                raise ConfigError("the model config lists no 'datasets' to check")
            return 0 if check_datasets(cfg, max_records=args.check_records) else 1
        if args.summary:
            from gpt_neo.summary import print_summary

            print_summary(cfg)
            forward_check(cfg)
            return 0
        if args.predict or args.interactive or args.eval or args.export:
            from gpt_neo import modes

            if args.predict or args.interactive:
                return modes.predict(cfg, args)
            if args.eval:
                return modes.evaluate(cfg, args)
            return modes.export(cfg, args)
        return run_training(cfg, args)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

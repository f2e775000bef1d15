"""GPT-Neo's command line: `python main.py --model cfg.json [...]`.

    python main.py --model cfg.json                  # train (resumes from model_path)
    python main.py --model cfg.json --summary        # parameters, FLOPs, memory, shardings
    python main.py --model cfg.json --check_dataset  # decoded samples, token-id range
    python main.py --model cfg.json --predict [--prompt file.txt] [--interactive]
    python main.py --model cfg.json --eval [--lambada_path f.jsonl] [--wikitext_path f.txt]
    python main.py --model cfg.json --export OUT_DIR # a Hugging Face GPTNeoForCausalLM folder
    python main.py --model cfg.json --tpu NAME --zone Z --accelerator_type v4-32  # a TPU pod

Exit codes: 0 done, 1 --check_dataset found a problem, 2 bad input (config, data, paths, a
platform that is not here), 3 training diverged (non-finite loss; the last checkpoint is kept),
75 preempted by SIGTERM (a checkpoint was written: run the same command again to resume).
The pod launcher adds 1 (a retry budget ran out) and 130 (Ctrl-C; the workers saved first).

This module imports neither JAX nor TensorFlow at the top: `--tpu` and `--gpu_ids` choose the
platform first, and only then is the rest of the library imported.
"""

from __future__ import annotations

import argparse
import sys

from gpt_neo.cli import add_overrides_flag, exit_code_of
from gpt_neo.cli.pod import add_pod_flags, launch_pod, launching
from gpt_neo.launch import platform


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
    add_overrides_flag(parser, "a config key, after all --model files")
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
    parser.add_argument(
        "--tpu",
        metavar="NAME",
        help="run on this TPU VM's chips; with --zone/--accelerator_type (below), launch on "
        "every worker of the TPU slice NAME from this machine",
    )
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
        "--compilation_cache",
        metavar="DIR",
        help="JAX's persistent compilation cache, so a restarted run skips compiling (default "
        "model_path/compilation_cache; 'off' disables it)",
    )
    parser.add_argument(
        "--summary",
        action="store_true",
        help="print parameter count, FLOPs/token, per-device memory and parameter shardings, "
        "then run one forward pass on random tokens if the devices match mesh_shape",
    )
    parser.add_argument(
        "--summary_image",
        metavar="FILE",
        help="with --summary: also draw the mesh and how each parameter is split over it, to "
        "FILE (.png or .svg, local or gs://)",
    )
    parser.add_argument(
        "--topology",
        metavar="T",
        help="with --summary: compile the train step for this TPU slice (v5e:2x2, v4:2x2x2, "
        "v5p:2x2x4, v6e:4x4, ...) on this machine and print the compiler's per-device memory "
        "and FLOPs (needs libtpu: pip install '.[tpu]')",
    )
    parser.add_argument(
        "--num_slices", type=int, default=1, metavar="N", help="with --topology: N such slices"
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
    add_pod_flags(parser)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    return exit_code_of(_run, parse_args(argv))


def _run(args: argparse.Namespace) -> int:
    if launching(args):  # from a workstation: no accelerator is used here
        return launch_pod(args)
    platform.select_platform(args.tpu, args.gpu_ids)
    if training(args):  # before anything starts a JAX backend
        platform.initialize_distributed(
            args.coordinator_address, args.num_processes, args.process_id
        )
    platform.require_platform(args.tpu, args.gpu_ids)
    from gpt_neo.cli import commands  # imports JAX: only now that the platform is chosen

    cfg = commands.load(args)
    commands.enable_compilation_cache(cfg, args)
    # "auto" layouts: training compiles the winner first (then hits the compilation cache);
    # the other modes only rank (--summary --topology compiles for the slice instead)
    cfg = commands.choose_layout(cfg, args, confirm=training(args))
    if args.check_dataset:
        return commands.check_dataset(cfg, args)
    if args.summary:
        return commands.summary(cfg, args)
    if args.predict or args.interactive:
        return commands.predict(cfg, args)
    if args.eval:
        return commands.evaluate(cfg, args)
    if args.export:
        return commands.export(cfg, args)
    return commands.train(cfg, args)


def training(args: argparse.Namespace) -> bool:
    return not (
        args.check_dataset
        or args.summary
        or args.predict
        or args.interactive
        or args.eval
        or args.export
    )


if __name__ == "__main__":
    sys.exit(main())

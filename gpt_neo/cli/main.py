"""GPT-Neo's command line, as GPT-Neo had it: `python main.py --model cfg.json [MODE] [...]`.
The same modes are the verbs of `gpt-neo` (`gpt_neo/cli/verbs.py`); both run through
`gpt_neo/cli/run.py`.

    python main.py --model cfg.json                  # train (resumes from model_path)
    python main.py --model cfg.json --summary        # parameters, FLOPs, memory, shardings
    python main.py --model cfg.json --check_dataset  # decoded samples, token-id range
    python main.py --model cfg.json --predict [--prompt file.txt] [--interactive]
    python main.py --model cfg.json --eval [--lambada_path f.jsonl] [--wikitext_path f.txt]
    python main.py --model cfg.json --export OUT_DIR # a Hugging Face folder (GPT-Neo, Llama...)
    python main.py --model cfg.json --tpu NAME --zone Z --accelerator_type v4-32  # a TPU pod

The mode flags exclude each other (two of them: exit 2, naming both). `--tpu NAME` alone runs
on this TPU VM's chips; with any of --zone, --accelerator_type, --project, --queued it launches
on every worker of the slice NAME (`gpt-neo launch`).
"""

from __future__ import annotations

import argparse
import sys

from gpt_neo.cli import exit_code_of, flags, run, version_line
from gpt_neo.cli.pod import add_pod_flags, launch_pod, launching

# main.py's mode flags and the modes they select (no flag: train)
MODE_FLAGS = {
    "check_dataset": "check-data",
    "summary": "summary",
    "predict": "sample",
    "interactive": "sample",
    "eval": "eval",
    "export": "export",
}

EPILOG = """\
examples:
  python main.py --model configs/demo.json                       # train; resumes from model_path
  python main.py --model gpt_neo_125M --summary --topology v5e:2x2
  python main.py --model cfg.json --predict --prompt prompt.txt --temperature 0.7
  python main.py --model cfg.json --eval --lambada_path lambada.jsonl

The same modes are verbs of one command: gpt-neo train | summary | check-data | sample | eval |
export | launch | import | data | init  (gpt-neo --help).
Exit codes: 0 done, 1 --check_dataset found a problem, 2 bad input (one error: line naming the
problem), 3 diverged, 4 out of space, 75 preempted (run the same command again to resume)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="main.py",
        description="Train and inspect GPT-Neo models on JAX (TPU, GPU or CPU): GPT-Neo's "
        "command line.",
        formatter_class=flags.HelpFormatter,
        epilog=EPILOG,
    )
    parser.add_argument("--version", action="version", version=version_line())
    flags.config(parser)
    modes = parser.add_argument_group("modes (one at most; none: train)")
    modes.add_argument(
        "--check_dataset",
        action="store_true",
        help="print decoded samples and the token-id range of each dataset; exit 1 if an id is "
        ">= n_vocab (gpt-neo check-data)",
    )
    modes.add_argument(
        "--summary",
        action="store_true",
        help="print parameter count, FLOPs/token, per-device memory and parameter shardings, "
        "then run one forward pass if the devices match mesh_shape (gpt-neo summary)",
    )
    modes.add_argument(
        "--predict",
        action="store_true",
        help="sample predict_batch_size continuations of the prompt; print them and write "
        "model_path/predictions_<step>.txt (gpt-neo sample)",
    )
    modes.add_argument(
        "--eval",
        action="store_true",
        help="eval loss/perplexity on eval_path and the tasks named by --eval_tasks or the "
        "config; prints a table, writes model_path/eval_<step>.json (gpt-neo eval)",
    )
    modes.add_argument(
        "--export",
        metavar="OUT_DIR",
        help="write a Hugging Face folder (safetensors, config.json, tokenizer): GPT-Neo, "
        "GPT-NeoX, Llama, Mistral, Qwen2 or Qwen3 (gpt-neo export)",
    )
    flags.platform(parser)
    flags.processes(parser)
    flags.training(parser)
    flags.check_data(parser)
    flags.summary(parser)
    flags.sampling(parser)
    flags.evaluation(parser)
    flags.export(parser)
    add_pod_flags(parser)
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    chosen = [f"--{flag}" for flag in MODE_FLAGS if getattr(args, flag)]
    if len({MODE_FLAGS[flag[2:]] for flag in chosen}) > 1:  # --predict --interactive: one mode
        parser.error(f"{' and '.join(chosen)} are different modes: give one at a time")
    if launching(args) and chosen:
        parser.error(
            f"the pod launcher runs training; {' '.join(chosen)} runs on one machine: drop "
            "--zone/--accelerator_type and run it on a worker (gcloud compute tpus tpu-vm ssh)"
        )
    return args


def mode_of(args: argparse.Namespace) -> str:
    """The mode main.py's flags select."""
    return next((mode for flag, mode in MODE_FLAGS.items() if getattr(args, flag)), "train")


def main(argv=None) -> int:
    return exit_code_of(_run, parse_args(argv))


def _run(args: argparse.Namespace) -> int:
    if launching(args):  # from a workstation: no accelerator is used here
        return launch_pod(args)
    return run.run(mode_of(args), args)


if __name__ == "__main__":
    sys.exit(main())

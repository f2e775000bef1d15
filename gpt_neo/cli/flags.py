"""The flags of the model commands, one function per group, shared by `gpt-neo VERB` (each verb
takes the groups it needs) and `python main.py` (GPT-Neo's flat command line, every group).
One spelling per concept: a flag means the same wherever it appears.

Nothing here imports JAX, so `--help` stays instant."""

from __future__ import annotations

import argparse


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's and epilog's line breaks (their examples) and shows each flag's
    default, unless it is empty (None, False, []) or the help already names one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        # identity, not `in`: 0 == False, and a default of 0 is worth showing
        empty = default is None or default is False or default is argparse.SUPPRESS
        if "default" in text or empty or default == []:
            return text
        return f"{text} (default: %(default)s)"


def import_command(module, argv) -> argparse.Namespace:
    """`python -m gpt_neo.cli.<hf|mesh_tf> import ...`, the old spelling of `gpt-neo import
    <kind>`: `module`'s DESCRIPTION, EPILOG and add_arguments under an `import` subcommand."""
    parser = argparse.ArgumentParser(
        prog=f"python -m {module.__spec__.name}",  # as run: __name__ is __main__ under -m
        description=module.DESCRIPTION,
        formatter_class=HelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    module.add_arguments(
        commands.add_parser(
            "import",
            help=module.DESCRIPTION,
            description=module.DESCRIPTION,
            epilog=module.EPILOG,
            formatter_class=HelpFormatter,
        )
    )
    return parser.parse_args(argv)


def config(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("the model")
    group.add_argument(
        "--model",
        nargs="+",
        required=True,
        metavar="CONFIG",
        help="model config JSON file(s), or names of the bundled presets (gpt_neo_125M, demo, "
        "...); several merge in order, later files win",
    )
    overrides(group, "a config key, after all --model files")


def overrides(parser, what: str = "a config key") -> None:
    """`--set KEY=VALUE ...` (old spelling `--override`), collected into `args.overrides`
    (values parsed as JSON)."""
    parser.add_argument(
        "--set",
        "--override",
        dest="overrides",
        action="extend",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help=f"override {what} (value parsed as JSON, else a string); repeatable",
    )


def platform(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("where it runs (default: whatever JAX finds; CPU otherwise)")
    group.add_argument(
        "--tpu",
        metavar="NAME",
        help="run on this TPU VM's own chips (NAME is GPT-Neo's TPU name; launching on every "
        "worker of a pod slice is `gpt-neo launch`)",
    )
    group.add_argument(
        "--gpu_ids", nargs="+", metavar="ID", help="run on these GPUs (0 1 ... or device:GPU:0 ...)"
    )


def processes(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "several processes (automatic on TPU pods and under SLURM; else all three)"
    )
    group.add_argument("--coordinator_address", metavar="HOST:PORT", help="process 0's address")
    group.add_argument("--num_processes", type=int, metavar="N", help="how many processes")
    group.add_argument("--process_id", type=int, metavar="I", help="this process's index")


def training(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("training")
    group.add_argument(
        "--steps_per_checkpoint",
        type=int,
        default=5000,
        metavar="N",
        help="save a checkpoint (and evaluate, if eval_steps > 0) every N steps",
    )
    group.add_argument("--new", action="store_true", help="delete model_path first (asks first)")
    group.add_argument("--yes", action="store_true", help="with --new: do not ask")
    group.add_argument(
        "--skip_corrupt_records",
        action="store_true",
        help="skip damaged TFRecords (each one reported) instead of stopping",
    )
    group.add_argument(
        "--compilation_cache",
        metavar="DIR",
        help="JAX's persistent compilation cache, so a restarted run skips compiling (default: "
        "$GPT_NEO_COMPILATION_CACHE if set, else model_path/compilation_cache; 'off' disables "
        "it)",
    )
    group.add_argument(
        "--sacred_id",
        default="nosacred",
        metavar="ID",
        help="a name for this run, kept in its sacred record (GPT-Neo's run_experiment.py id)",
    )
    group.add_argument(
        "--sacred_mongo_url",
        metavar="URL",
        help="record the run in this MongoDB (default: files under model_path/sacred)",
    )


def summary(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("summary")
    group.add_argument(
        "--topology",
        metavar="T",
        help="compile the train step for this TPU slice (v5e:2x2, v4:2x2x2, v5p:2x2x4, "
        "v6e:4x4, ...) here, without a TPU, and print the compiler's per-device memory and "
        "FLOPs (needs libtpu: pip install '.[tpu]')",
    )
    group.add_argument(
        "--num_slices",
        type=int,
        default=1,
        metavar="N",
        help="N slices: with --topology, compile for N such slices; with --tpu NAME "
        "--accelerator_type T, create N slices as one queued resource (nodes NAME-0 ...) and "
        "run on all of them",
    )
    group.add_argument(
        "--summary_image",
        metavar="FILE",
        help="also draw the mesh and how each parameter is split over it (.png or .svg, local "
        "or gs://)",
    )


def check_data(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("checking the data")
    group.add_argument(
        "--check_records",
        type=int,
        default=10_000,
        metavar="N",
        help="read the first N records of each dataset (0: all)",
    )


def sampling(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("sampling (from the newest checkpoint)")
    group.add_argument(
        "--prompt",
        metavar="FILE",
        help="text file holding the prompt (default: GPT-Neo's unicorn prompt); a prompt longer "
        "than n_ctx - 1 tokens keeps its end",
    )
    group.add_argument(
        "--interactive",
        action="store_true",
        help="read prompts from stdin, one per line, and stream the continuations",
    )
    group.add_argument(
        "--temperature", type=float, default=0.9, metavar="T", help="0 is greedy; GPT-Neo's 0.9"
    )
    group.add_argument(
        "--top_k", type=int, default=0, metavar="K", help="keep the k likeliest tokens (0: off)"
    )
    group.add_argument(
        "--top_p", type=float, default=1.0, metavar="P", help="nucleus sampling mass (1.0: off)"
    )
    group.add_argument(
        "--max_new_tokens",
        type=int,
        metavar="N",
        help="new tokens per sample (default: predict_max_steps, else up to n_ctx)",
    )
    group.add_argument("--seed", type=int, default=0, metavar="S", help="sampling seed")


def evaluation(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("evaluation (of the newest checkpoint)")
    group.add_argument(
        "--eval_tasks",
        nargs="+",
        choices=("lambada", "wikitext"),
        help="tasks to run (default: the config's eval_tasks, plus any whose file is given)",
    )
    group.add_argument("--lambada_path", metavar="FILE", help='LAMBADA jsonl of {"text": ...}')
    group.add_argument(
        "--lambada_last_token",
        action="store_true",
        help="score LAMBADA's last token only (GPT-Neo's way) instead of the last word",
    )
    group.add_argument("--wikitext_path", metavar="FILE", help="text file for word perplexity")


def export(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--force", action="store_true", help="overwrite the folder if it exists")
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="the exported weights' dtype (bfloat16: half the size, rounded to nearest even)",
    )

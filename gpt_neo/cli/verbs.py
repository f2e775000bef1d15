"""`gpt-neo VERB ...`: the one command, each verb with its own flags (GPT-Neo's names, one
spelling per concept: gpt_neo/cli/flags.py). `python main.py --model ...` is the same modes
behind GPT-Neo's flags (gpt_neo/cli/main.py).

Parsing imports neither JAX nor TensorFlow, so `--help` of any verb is instant; each verb
imports what it needs when it runs."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from gpt_neo.cli import (
    demo_corpus,
    exit_code_of,
    flags,
    hf,
    init_config,
    mesh_tf,
    run,
    tfrecords,
    tokenizer,
    version_line,
)
from gpt_neo.cli.pod import add_pod_flags, launch_pod
from gpt_neo.launch import platform

DESCRIPTION = """\
Train, inspect, sample and evaluate GPT-style models on JAX (TPU, GPU or CPU), from GPT-Neo's
JSON configs. Each verb has its own --help."""

EPILOG = """\
a first run, from nothing but a folder of text:
  gpt-neo init --dataset mytext --like demo --data my_text_folder/
  gpt-neo train --model configs/mytext.json
  gpt-neo sample --model configs/mytext.json --prompt prompt.txt

GPT-Neo's `python main.py --model cfg.json [--predict|--eval|...]` runs the same modes.
Exit codes: 0 done, 1 check-data found a problem, 2 bad input (one error: line naming the
problem and the fix), 3 diverged, 4 out of space, 75 preempted (run the same command again)."""

# verb -> (one-line help, examples)
MODEL_VERBS = {
    "train": (
        "train; resumes from the newest checkpoint in model_path",
        "gpt-neo train --model configs/demo.json\n"
        "gpt-neo train --model cfg.json --steps_per_checkpoint 1000 --tpu my-tpu\n"
        "gpt-neo train --model base.json finetune.json --set lr=1e-4 train_steps=2000",
    ),
    "summary": (
        "parameters, FLOPs per token, per-device memory, shardings; --topology compiles for a "
        "TPU slice here",
        "gpt-neo summary --model gpt_neo_1.3B\n"
        "gpt-neo summary --model gpt_neo_2.7B --set mesh_shape=auto --topology v5e:2x2",
    ),
    "check-data": (
        "decoded samples and the token-id range of each dataset (exit 1 on an id >= n_vocab)",
        "gpt-neo check-data --model configs/demo.json --check_records 0",
    ),
    "sample": (
        "sample continuations from the newest checkpoint (GPT-Neo's --predict)",
        "gpt-neo sample --model cfg.json --prompt prompt.txt --temperature 0.7 --top_p 0.9\n"
        "gpt-neo sample --model cfg.json --interactive",
    ),
    "eval": (
        "eval loss on eval_path, LAMBADA and wikitext perplexity, of the newest checkpoint",
        "gpt-neo eval --model cfg.json --lambada_path lambada.jsonl --wikitext_path wiki.txt",
    ),
    "export": (
        "write the newest checkpoint as a Hugging Face folder (GPT-Neo, GPT-NeoX, Llama, "
        "Mistral, Qwen2 or Qwen3, whichever expresses the config)",
        "gpt-neo export --model cfg.json --output_dir hf_out/",
    ),
}

# each model verb's flag groups (flags.py), after --model and --set
MODEL_FLAGS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], ...]] = {
    "train": (flags.platform, flags.training, flags.processes),
    "summary": (flags.platform, flags.summary),
    "check-data": (flags.check_data,),
    "sample": (flags.platform, flags.sampling),
    "eval": (flags.platform, flags.evaluation),
    "export": (flags.platform, flags.export),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gpt-neo", description=DESCRIPTION, epilog=EPILOG, formatter_class=flags.HelpFormatter
    )
    parser.add_argument("--version", action="version", version=version_line())
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    for verb, (summary, examples) in MODEL_VERBS.items():
        command = _verb(verbs, verb, summary, f"examples:\n{_indent(examples)}")
        if verb == "export":
            command.add_argument(
                "--output_dir",
                dest="export",
                required=True,
                metavar="DIR",
                help="the folder to write",
            )
        flags.config(command)
        for add_group in MODEL_FLAGS[verb]:
            add_group(command)
        command.set_defaults(handler=lambda args, mode=verb: run.run(mode, args))

    launch = _verb(
        verbs,
        "launch",
        "train on every worker of a TPU pod slice, from a workstation (creates it, recovers "
        "from preemption)",
        "example:\n  gpt-neo launch --model gpt_neo_1.3B --tpu my-pod --zone us-central2-b \\\n"
        "      --accelerator_type v4-32 --spot --steps_per_checkpoint 500",
    )
    flags.config(launch)
    launch.add_argument("--tpu", required=True, metavar="NAME", help="the TPU slice's name")
    flags.training(launch)
    add_pod_flags(launch)
    launch.set_defaults(handler=launch_pod)

    imports = _verb(verbs, "import", "turn another library's model into a checkpoint of ours")
    kinds = imports.add_subparsers(dest="kind", required=True, metavar="KIND")
    for kind, module, summary in (
        ("hf", hf, "a local Hugging Face GPT-Neo folder (and its tokenizer)"),
        ("mesh-tf", mesh_tf, "a checkpoint of the original GPT-Neo (Mesh-TensorFlow)"),
    ):
        command = _verb(kinds, kind, summary, module.EPILOG, description=module.DESCRIPTION)
        module.add_arguments(command)
        command.set_defaults(handler=module.run)

    data = _verb(verbs, "data", "make a tokenizer and TFRecords from text (or the demo dataset)")
    tools = data.add_subparsers(dest="tool", required=True, metavar="TOOL")
    for tool, module in (("tokenizer", tokenizer), ("tfrecords", tfrecords), ("demo", demo_corpus)):
        command = _verb(
            tools, tool, module.DESCRIPTION, module.EPILOG, description=module.DESCRIPTION
        )
        module.add_arguments(command)
        command.set_defaults(handler=module.run)

    init = _verb(
        verbs,
        "init",
        "write a model config for your dataset, shaped like a preset (with --data: make the "
        "dataset from text first)",
        init_config.EPILOG,
        description=init_config.DESCRIPTION,
    )
    init_config.add_arguments(init)
    init.set_defaults(handler=init_config.run)
    return parser


def _verb(
    verbs, name: str, summary: str, epilog: str | None = None, *, description: str | None = None
) -> argparse.ArgumentParser:
    return verbs.add_parser(
        name,
        help=summary,
        description=description or summary[0].upper() + summary[1:] + ".",
        epilog=epilog,
        formatter_class=flags.HelpFormatter,
    )


def _indent(text: str) -> str:
    return "\n".join(f"  {line}" for line in text.splitlines())


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.verb not in MODEL_VERBS:  # model verbs choose it from their flags (`run.run`)
        platform.select_platform(None, None)  # no accelerator here: the CPU, without probing
    return exit_code_of(args.handler, args)


if __name__ == "__main__":
    sys.exit(main())

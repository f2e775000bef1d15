"""`gpt-neo import hf HF_DIR --model_path DIR [--model run.json]` (old spelling: `python -m
gpt_neo.cli.hf import ...`): a local Hugging Face folder (GPT-Neo, Llama, Mistral, Qwen2, Qwen3)
-> a step-0 checkpoint that `gpt-neo train` continues, and the folder's tokenizer (its chat
template and generation settings too), kept so `gpt-neo sample` works at once and an export
writes it back."""

from __future__ import annotations

import argparse
import sys

from gpt_neo.cli import exit_code_of, flags

DESCRIPTION = (
    "Turn a local Hugging Face folder (GPTNeoForCausalLM, LlamaForCausalLM, MistralForCausalLM, "
    "Qwen2ForCausalLM or Qwen3ForCausalLM; safetensors in float32, bfloat16 or float16) into a "
    "checkpoint (step 0) and a model config that gpt-neo train, sample, eval and export read. "
    "Nothing is downloaded."
)
EPILOG = """\
examples:
  gpt-neo import hf ./gpt-neo-125M --model_path runs/neo125M
  gpt-neo sample --model runs/neo125M/config.json --prompt prompt.txt
  gpt-neo import hf ./gpt-neo-125M --model_path runs/ft --model finetune.json  # + run keys
  gpt-neo train --model runs/ft/config.json
  gpt-neo import hf ./Qwen3-0.6B --model_path runs/qwen3  # Llama, Mistral, Qwen2 alike"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("hf_dir", help="a local Hugging Face model folder (nothing is downloaded)")
    parser.add_argument(
        "--model_path", required=True, metavar="DIR", help="an empty directory: where it goes"
    )
    parser.add_argument(
        "--model",
        nargs="+",
        metavar="CONFIG",
        help="config file(s) for the run keys (datasets, batch size, optimizer, ...); the "
        "architecture always comes from the HF folder. Without datasets, the folder's "
        "tokenizer becomes the model's",
    )
    flags.overrides(parser, "a run key")


def run(args: argparse.Namespace) -> int:
    from gpt_neo.config import parse_overrides  # imports JAX: not for --help
    from gpt_neo.config.load import merged_keys
    from gpt_neo.interop.hf import import_to_checkpoint

    # run keys alone (the architecture comes from the folder): checked with it, not before
    keys = merged_keys(args.model) if args.model else {}
    keys |= parse_overrides(args.overrides)
    done = import_to_checkpoint(args.hf_dir, args.model_path, keys)
    print(f"imported {args.hf_dir} as step 0 in {args.model_path}")
    if done.tokenizer:
        print(f"kept its tokenizer: {done.tokenizer}")
    print(
        f"next:\n    gpt-neo sample --model {done.config}\n    gpt-neo train --model {done.config}"
    )
    return 0


def main(argv=None) -> int:
    return exit_code_of(run, flags.import_command(sys.modules[__name__], argv))


if __name__ == "__main__":
    sys.exit(main())

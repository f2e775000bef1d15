"""MaxText's ahead-of-time compile of a GPT-3-style train step for a TPU v5e:2x2 slice, as a
reference point for our own `--summary --topology v5e:2x2` numbers.

MaxText lives in a side virtual environment of its own (it needs Python >= 3.12 and pins a jax
newer than ours), so this script only starts that environment's Python in a subprocess: it uses
nothing but the standard library and imports no MaxText code here.

Creating the side environment (what worked with MaxText 0.2.5, jax 0.12.0.1, libtpu 0.0.52;
MaxText 0.2.x declares Requires-Python >=3.12, so a Python 3.11 venv finds no version at all):

    python3.12 -m venv /work/maxtext-side/venv
    /work/maxtext-side/venv/bin/pip install --upgrade pip
    /work/maxtext-side/venv/bin/pip install 'maxtext[tpu]==0.2.5'

The `tpu` extra brings jax, jaxlib, flax, optax and libtpu (plain `maxtext` has no
dependencies at all). No TPU is needed: libtpu compiles for the slice on this CPU machine.

Usage:

    python bench/maxtext_side.py --maxtext_python /work/maxtext-side/venv/bin/python \\
        --size 125M --layout dp --no-scan

prints one JSON dict: per-device `arguments`, `temporaries` and `outputs` in bytes (and
`aliased`: the part of the outputs living in donated argument buffers), `flops` per device
and step from XLA's cost analysis, `seconds`, the wall time of MaxText's `jit_and_compile`
(trace, lower and compile; not the config parsing before it), and the `jax` and `libtpu`
versions that compiled it. Another bench script can call `maxtext_compile(python, size,
layout, scan)` for the same dict, and `run_side` to run its own compile with the same compiler
(bench/tpu_compile.py does: memory depends on the libtpu version as much as on the program).

The model is MaxText's `gpt3` decoder block (learned positions, LayerNorm with bias, GELU,
fused QKV, tied input/output embedding) with the settings of MaxText's own gpt3-*.yml model
configs, except the optimizer: plain `adamw` instead of their `adam_pax`. Global batch 32 x
2048 tokens (8 sequences per device), bfloat16 activations, float32 weights, full remat,
attention `autoselected` (the splash/flash kernel on TPU, whose FLOPs XLA's cost analysis
does not count).
"""

import argparse
import json
import os
import subprocess
import sys

# The shapes compared, as MaxText config keys.
SIZES = {
    "125M": {
        "base_emb_dim": 768,
        "base_num_query_heads": 12,
        "base_num_kv_heads": 12,
        "head_dim": 64,
        "base_mlp_dim": 3072,
        "base_num_decoder_layers": 12,
    },
    "1.3B": {
        "base_emb_dim": 2048,
        "base_num_query_heads": 16,
        "base_num_kv_heads": 16,
        "head_dim": 128,
        "base_mlp_dim": 8192,
        "base_num_decoder_layers": 24,
    },
}

# How the 4 chips of the v5e:2x2 slice are used.
LAYOUTS = {
    "dp": {"ici_data_parallelism": 4, "ici_fsdp_parallelism": 1},
    "fsdp": {"ici_data_parallelism": 1, "ici_fsdp_parallelism": 4},
}

# Everything else, the same for every size and layout.
COMMON = {
    "compile_topology": "v5e-4",  # MaxText's name for v5e:2x2
    "compile_topology_num_slices": 1,
    "run_name": "maxtext_side",
    "base_output_directory": "/tmp/maxtext_side",
    "dataset_type": "synthetic",
    "enable_checkpointing": False,
    # the gpt3 decoder, as in MaxText's configs/models/gpt3-*.yml
    "decoder_block": "gpt3",
    "vocab_size": 50304,
    "max_target_length": 2048,
    "trainable_position_size": 2048,
    "mlp_activations": "[gelu]",
    "logits_via_embedding": True,
    "normalize_embedding_logits": False,
    "logits_dot_in_fp32": False,
    "normalization_layer_epsilon": 1e-5,
    "use_iota_embed": True,
    "fused_qkv": True,
    "enable_dropout": False,
    # the training step
    "opt_type": "adamw",
    "per_device_batch_size": 8,
    "dtype": "bfloat16",
    "weight_dtype": "float32",
    "remat_policy": "full",
}

ENV = {
    "TPU_SKIP_MDS_QUERY": "1",
    "ALLOW_MULTIPLE_LIBTPU_LOAD": "1",
    # MaxText 0.2.5 pins a libtpu older than its jax: the Mosaic kernels' debug locations (a
    # newer custom-call field) make libtpu reject splash attention ("no such field:
    # 'debug_locations'"), which MaxText picks at head_dim 128 (1.3B)
    "JAX_MOSAIC_UNZIP_DEBUG_LOCATIONS": "false",
}

MARKER = "MAXTEXT_SIDE_RESULT "

# Run by the side environment's Python: MaxText's own train_compile.main, with its
# jit_and_compile wrapped to time it and to read the compiled program's analyses.
WRAPPER = f"""
import json, os, sys, time
from absl import app
import maxtext.configs
from maxtext.trainers.pre_train import train_compile

from importlib.metadata import version
result = {{"jax": version("jax"), "libtpu": version("libtpu")}}
jit_and_compile = train_compile.jit_and_compile

def timed_jit_and_compile(*args, **kwargs):
    start = time.perf_counter()
    compiled = jit_and_compile(*args, **kwargs)
    result["seconds"] = time.perf_counter() - start
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    if isinstance(cost, list):
        cost = cost[0]
    result.update(
        arguments=memory.argument_size_in_bytes,
        temporaries=memory.temp_size_in_bytes,
        outputs=memory.output_size_in_bytes,
        aliased=memory.alias_size_in_bytes,
        flops=float(cost["flops"]),
    )
    return compiled

train_compile.jit_and_compile = timed_jit_and_compile
base_yml = os.path.join(os.path.dirname(maxtext.configs.__file__), "base.yml")
try:
    app.run(train_compile.main, argv=["train_compile", base_yml, *sys.argv[1:]])
except SystemExit as stop:
    if stop.code:
        raise
print({MARKER!r} + json.dumps(result), flush=True)
"""


def _value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def maxtext_args(size: str, layout: str, scan: bool, overrides: dict | None = None) -> list[str]:
    """MaxText's `key=value` command-line overrides for one compile."""
    config = {**COMMON, **SIZES[size], **LAYOUTS[layout], "scan_layers": scan, **(overrides or {})}
    return [f"{key}={_value(value)}" for key, value in config.items()]


def run_side(
    python: str, args: list[str], *, env: dict | None = None, timeout: float = 1800
) -> dict:
    """Run `python args...` with the side environment's settings (and `env`) and return the
    JSON dict it printed behind `MARKER`. Raises RuntimeError with the tail of its output when
    it printed none (a failed compile)."""
    inherited = dict(os.environ)
    # jax points this at the libtpu it loaded: a caller's libtpu, not the side environment's
    # (an older one there rejects the newer jax's Mosaic kernels)
    inherited.pop("TPU_LIBRARY_PATH", None)
    process = subprocess.run(
        [python, *args],
        env={**inherited, **ENV, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    for line in reversed(process.stdout.splitlines()):
        if line.startswith(MARKER):
            return json.loads(line[len(MARKER) :])
    tail = (process.stdout + process.stderr)[-4000:]
    raise RuntimeError(f"the compile failed (exit {process.returncode}):\n{tail}")


def maxtext_compile(
    python: str,
    size: str,
    layout: str,
    scan: bool,
    *,
    overrides: dict | None = None,
    timeout: float = 1800,
) -> dict:
    """Compile MaxText's train step for v5e:2x2 with the side environment's `python`.

    Returns per-device bytes (`arguments`, `temporaries`, `outputs`, `aliased`), `flops` per
    device and step, `seconds` spent in MaxText's jit_and_compile, and the `jax` and `libtpu`
    versions that compiled it. Raises RuntimeError with the tail of MaxText's output when the
    compile fails.
    """
    if size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}, not {size!r}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {sorted(LAYOUTS)}, not {layout!r}")
    args = ["-c", WRAPPER, *maxtext_args(size, layout, scan, overrides)]
    return run_side(python, args, timeout=timeout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--maxtext_python", required=True, help="the side venv's bin/python")
    parser.add_argument("--size", choices=sorted(SIZES), default="125M")
    parser.add_argument("--layout", choices=sorted(LAYOUTS), default="dp")
    parser.add_argument("--scan", action=argparse.BooleanOptionalAction, default=False)
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="another MaxText override, e.g. attention=dot_product (repeatable)",
    )
    args = parser.parse_args()
    overrides = dict(item.split("=", 1) for item in args.set)
    try:
        result = maxtext_compile(
            args.maxtext_python, args.size, args.layout, args.scan, overrides=overrides
        )
    except RuntimeError as error:
        sys.exit(str(error))
    print(json.dumps(result))


if __name__ == "__main__":
    main()

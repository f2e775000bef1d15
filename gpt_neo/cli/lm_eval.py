"""`python -m gpt_neo.cli.lm_eval run --model gpt-neo-jax --model_args config=...`: the LM
Evaluation Harness's own command line, with this library's model registered
(`gpt_neo.interop.lm_eval`), for lm-eval versions without plugin discovery."""

from __future__ import annotations

import sys

import gpt_neo.interop.lm_eval  # noqa: F401 (registers the gpt-neo-jax model with lm-eval)


def main(argv=None) -> int:
    import multiprocessing

    from lm_eval.__main__ import cli_evaluate

    # lm-eval's stderr bootstrap runs a multiprocessing Pool; forking a process that has
    # started JAX's threads can deadlock, so its workers start fresh instead.
    multiprocessing.set_start_method("spawn", force=True)
    sys.argv = ["lm_eval", *(sys.argv[1:] if argv is None else argv)]
    cli_evaluate()
    return 0


if __name__ == "__main__":
    sys.exit(main())

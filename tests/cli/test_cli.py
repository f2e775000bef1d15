"""The command lines: bad input is one `error:` line and exit code 2, and the platform flags
take effect before JAX starts."""

import pytest

from tests.support.helpers import start_main


@pytest.mark.process
@pytest.mark.parametrize(
    "flags, message",
    [
        (["--tpu", "mytpu"], "error: --tpu mytpu: JAX finds no TPU on this machine"),
        (["--gpu_ids", "0", "1"], "error: --gpu_ids 0 1: JAX finds no CUDA on this machine"),
        (["--gpu_ids", "device:GPU:0"], "error: --gpu_ids device:GPU:0: JAX finds no CUDA"),
    ],
)
def test_a_platform_that_is_not_here_is_one_line_and_exit_2(flags, message):
    # Before, --tpu ran on the CPU and exited 0: jax was imported before the flag was applied.
    process = start_main("--model", "configs/demo.json", *flags, "--summary")
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 2, output
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(message), output
    assert "leave out --" in lines[0] and "forward pass" not in output


@pytest.mark.process
def test_bad_config_is_one_line_and_exit_2():
    process = start_main("--model", "configs/demo.json", "--set", "n_head=7", "--summary")
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 2
    assert output.strip().splitlines() == [
        "error: configs/demo.json: n_embd (256) must be divisible by n_head (7); head dim would "
        "be 36.5714. Pick n_head from the divisors of n_embd, or set head_dim."
    ]

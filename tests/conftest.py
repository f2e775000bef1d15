"""Test setup: 8 simulated CPU devices (set before jax is imported) and shared helpers."""

import os

from tests.support.gcs_emulator import TF_IMPORT_TIME_ENV

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# TensorFlow reads its GCS retry settings at import: gs:// tests fail fast instead of retrying
os.environ.update({k: v for k, v in TF_IMPORT_TIME_ENV.items() if k not in os.environ})

import jax
import pytest


def pytest_sessionstart(session):
    from tests.support.helpers import SHARED

    if not (SHARED / "fixtures").is_dir():
        raise pytest.UsageError(
            f"the shared test data is not at {SHARED}: clone the repo beside the project's "
            "shared/ folder, or set GPT_NEO_SHARED to it"
        )


@pytest.fixture(scope="session", autouse=True)
def _eight_devices():
    assert jax.device_count() == 8, "tests need 8 simulated CPU devices; jax was imported too early"

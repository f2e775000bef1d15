"""Test setup: 8 simulated CPU devices (set before jax is imported; XLA:CPU compiling fast,
`tests.support.devices.FAST_COMPILE`), and the fast lane.

`make test-fast` runs the unit tests only: not those marked `process` (they start processes:
main.py, pods, notebooks, builds), `emulator` (the GCS emulator or the fake gcloud; added here
to every test that uses one) or `tpu` (compiles for a TPU slice with libtpu). With
GPT_NEO_TEST_FAST=1, a test that starts a process or a TPU compile anyway fails, naming the
marker it lacks, so the lane stays what it says.

Tests marked `gpu` are skipped here; with GPT_NEO_TEST_GPU=1 (bench/gpu_check.sh, on a machine
with a GPU) JAX keeps its GPU and only those run, without the simulated CPU devices."""

import os

from tests.support.devices import GPU, cpu_flags
from tests.support.gcs_emulator import TF_IMPORT_TIME_ENV

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + ("" if GPU else f" {cpu_flags(8)}")
).strip()
os.environ.setdefault("JAX_PLATFORMS", "" if GPU else "cpu")  # "": every platform JAX finds
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# TensorFlow reads its GCS retry settings at import: gs:// tests fail fast instead of retrying
os.environ.update({k: v for k, v in TF_IMPORT_TIME_ENV.items() if k not in os.environ})

import subprocess

import jax
import pytest

from gpt_neo import compilation_cache

FAST = os.environ.get("GPT_NEO_TEST_FAST") == "1"
EMULATOR_FIXTURES = {"gcs", "fake", "gcloud"}  # tests/support's GCS emulator and fake gcloud
PROCESS_FIXTURES = {"trained", "trained_mlm"}  # models trained through main.py (sacred probes)


HEAVY = ("process", "emulator", "tpu", "slow")


def pytest_collection_modifyitems(config, items):
    not_here = pytest.mark.skip(reason="needs a GPU: bench/gpu_check.sh runs it on one")
    _heavy_modules_first(items)
    for item in items:
        if ("gpu" in item.keywords) != GPU:
            item.add_marker(not_here if not GPU else pytest.mark.skip(reason="CPU test"))
        fixtures = set(getattr(item, "fixturenames", ()))
        if EMULATOR_FIXTURES & fixtures:
            item.add_marker(pytest.mark.emulator)
        if PROCESS_FIXTURES & fixtures:
            item.add_marker(pytest.mark.process)


def _heavy_modules_first(items) -> None:
    """Modules with slow tests first, each module kept whole (its fixtures are made once): the
    two workers then end on quick tests together instead of one waiting on a long one."""
    heavy = {
        item.module.__name__
        for item in items
        if any(marker in item.keywords for marker in HEAVY) and item.module is not None
    }
    items.sort(key=lambda item: getattr(item.module, "__name__", "") not in heavy)


@pytest.fixture(scope="session", autouse=True)
def _shared_compilations(tmp_path_factory, worker_id):
    """One persistent XLA cache for the whole run, shared by its pytest-xdist workers: the
    tests compile the same small programs (a tiny model's init, forward and step) over and
    over, and a cache hit costs a fraction of a compile. The processes the tests start (main.py,
    pods, docs pages) share another one, through GPT_NEO_COMPILATION_CACHE, with the command
    line's own threshold (programs of a second or more); tests of the cache's default place
    unset it."""
    base = tmp_path_factory.getbasetemp()
    folder = (base.parent if worker_id != "master" else base) / "xla-cache"
    folder.mkdir(exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    processes = folder.parent / "xla-cache-processes"
    processes.mkdir(exist_ok=True)
    os.environ.setdefault(compilation_cache.ENV, str(processes))
    yield


@pytest.fixture(scope="session", autouse=True)
def _fast_lane_guard():
    """In the fast lane, starting a process or compiling for a TPU fails the test (session
    wide, so that module fixtures are guarded too)."""
    if not FAST:
        yield
        return

    def refuse(marker: str, what: str):
        def refused(*args, **kwargs):
            pytest.fail(f"this test {what}: mark it @pytest.mark.{marker}")

        return refused

    from jax.experimental import topologies

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(subprocess.Popen, "__init__", refuse("process", "starts a process"))
        patch.setattr(topologies, "get_topology_desc", refuse("tpu", "compiles for a TPU slice"))
        yield


@pytest.fixture(scope="session", autouse=True)
def _eight_devices():
    if GPU:
        assert jax.default_backend() == "gpu", "GPT_NEO_TEST_GPU=1 but JAX sees no GPU"
        return
    assert jax.device_count() == 8, "tests need 8 simulated CPU devices; jax was imported too early"

"""Each gs:// client the project uses works against the emulator and sees the others' writes:
TensorFlow's gfile and TFRecords (through the loopback TLS proxy), google-cloud-storage,
tensorstore, and orbax's CheckpointManager (paths through etils -> tf.io.gfile, arrays through
tensorstore)."""

import os
import socket
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.support.gcs_emulator import (  # noqa: F401
    TEST_BUCKET,
    GcsEmulator,
    gcs,
    set_tf_import_time_env,
)

set_tf_import_time_env()  # TF's fail-fast retries: effective only if TF is not imported yet
from gpt_neo.storage import tf as tensorflow  # noqa: E402

tf = tensorflow()  # through gpt_neo.storage, as the library imports it

ROOT = f"gs://{TEST_BUCKET}"


@pytest.fixture(autouse=True)
def _no_escape(gcs):  # noqa: F811
    """During every test here the proxy refused nothing, i.e. no client tried to reach
    anything but the two storage hosts through it."""
    before = len(gcs.proxy_refused)
    yield
    assert gcs.proxy_refused[before:] == []


def _payload(n: int, seed: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def test_tf_gfile_small_file_roundtrip(gcs):  # noqa: F811
    base = f"{ROOT}/gfile-small"
    tf.io.gfile.makedirs(base)
    path = f"{base}/a.txt"
    assert not tf.io.gfile.exists(path)
    with tf.io.gfile.GFile(path, "wb") as f:
        f.write(b"hello gcs \xff\x00")
    assert tf.io.gfile.exists(path)
    with tf.io.gfile.GFile(path, "rb") as f:
        assert f.read() == b"hello gcs \xff\x00"
    assert gcs.read_object(path) == b"hello gcs \xff\x00"  # really stored in the emulator

    with tf.io.gfile.GFile(f"{base}/b.txt", "w") as f:
        f.write("second")
    assert sorted(tf.io.gfile.glob(f"{base}/*.txt")) == [path, f"{base}/b.txt"]

    tf.io.gfile.rename(path, f"{base}/c.txt")
    assert not tf.io.gfile.exists(path)
    with tf.io.gfile.GFile(f"{base}/c.txt", "rb") as f:
        assert f.read() == b"hello gcs \xff\x00"
    # makedirs left a placeholder object for the "directory", as on real GCS
    assert gcs.list_objects(f"{base}/") == [f"{base}/", f"{base}/b.txt", f"{base}/c.txt"]


def test_tf_gfile_large_file_ranged_read(gcs):  # noqa: F811
    """9 MiB: more than one upload chunk; a seek + read is a ranged GET through the proxy."""
    path = f"{ROOT}/gfile-large/big.bin"
    data = _payload(9 << 20, seed=1)
    with tf.io.gfile.GFile(path, "wb") as f:
        f.write(data)
    assert tf.io.gfile.stat(path).length == len(data)
    with tf.io.gfile.GFile(path, "rb") as f:
        f.seek(5_000_011)
        assert f.read(1000) == data[5_000_011:5_001_011]
        f.seek(777)
        assert f.read(3) == data[777:780]
    with tf.io.gfile.GFile(path, "rb") as f:
        assert f.read() == data
    assert gcs.read_object(path) == data


def test_tfrecords_write_and_read_back(gcs):  # noqa: F811
    path = f"{ROOT}/x/data.tfrecord"
    records = [_payload(int(n), seed=i) for i, n in enumerate(np.linspace(0, 5000, 300))]
    with tf.io.TFRecordWriter(path) as w:
        for r in records:
            w.write(r)
    files = tf.data.Dataset.list_files(f"{ROOT}/x/*.tfrecord", shuffle=False)
    got = [r.numpy() for r in tf.data.TFRecordDataset(files)]
    assert got == records
    assert gcs.list_objects(f"{ROOT}/x/") == [path]


def test_google_cloud_storage_shares_objects_with_tf(gcs):  # noqa: F811
    from google.api_core.exceptions import PreconditionFailed
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    # The plain constructor, as orbax calls it: with STORAGE_EMULATOR_HOST set,
    # google-cloud-storage 3.x talks to that URL with anonymous credentials.
    client = storage.Client()
    assert isinstance(client._credentials, AnonymousCredentials)
    bucket = client.bucket(TEST_BUCKET)

    tf_written = f"{ROOT}/interop/from-tf.bin"
    data = _payload(300_000, seed=2)
    with tf.io.gfile.GFile(tf_written, "wb") as f:
        f.write(data)
    assert bucket.blob("interop/from-tf.bin").download_as_bytes() == data
    assert (
        bucket.blob("interop/from-tf.bin").download_as_bytes(start=1000, end=1999)
        == (data[1000:2000])
    )

    blob = bucket.blob("interop/from-gcs.txt")
    blob.upload_from_string(b"written by google-cloud-storage", if_generation_match=0)
    with tf.io.gfile.GFile(f"{ROOT}/interop/from-gcs.txt", "rb") as f:
        assert f.read() == b"written by google-cloud-storage"
    with pytest.raises(PreconditionFailed):  # "create only if absent" is enforced
        blob.upload_from_string(b"second write", if_generation_match=0)
    assert gcs.read_object(f"{ROOT}/interop/from-gcs.txt") == b"written by google-cloud-storage"
    assert [b.name for b in client.list_blobs(TEST_BUCKET, prefix="interop/")] == [
        "interop/from-gcs.txt",
        "interop/from-tf.bin",
    ]


def test_tensorstore_reads_what_tf_wrote(gcs):  # noqa: F811
    import tensorstore as ts

    with tf.io.gfile.GFile(f"{ROOT}/ts/k1", "wb") as f:
        f.write(b"0123456789" * 50)
    kv = ts.KvStore.open({"driver": "gcs", "bucket": TEST_BUCKET, "path": "ts/"}).result()
    assert kv.read("k1").result().value == b"0123456789" * 50
    kv.write("k2", b"from tensorstore").result()
    with tf.io.gfile.GFile(f"{ROOT}/ts/k2", "rb") as f:
        assert f.read() == b"from tensorstore"
    assert sorted(kv.list().result()) == [b"k1", b"k2"]


def test_orbax_checkpoint_manager_on_gcs(gcs):  # noqa: F811
    """As gpt_neo.training.checkpoint.checkpointer uses it: async saves of a sharded pytree plus JSON, max_to_keep."""
    import orbax.checkpoint as ocp
    from etils import epath
    from etils.epath import backend as epath_backend
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    directory = f"{ROOT}/ckpt"
    # With TensorFlow installed (and EPATH_USE_TF unset) etils serves gs:// with tf.io.gfile,
    # i.e. through the proxy; no gcsfs needed.
    assert epath.Path(directory)._backend is epath_backend.tf_backend

    mesh = Mesh(np.array(jax.devices()), ("data",))
    sharded = NamedSharding(mesh, PartitionSpec("data"))

    def state(step: int) -> dict:
        return {
            "w": jax.device_put(
                jnp.arange(64 * 16, dtype=jnp.float32).reshape(64, 16) * step, sharded
            ),
            "b": jnp.full((5,), step, dtype=jnp.bfloat16) / 3,
            "step": jnp.asarray(step, dtype=jnp.int32),
        }

    options = ocp.CheckpointManagerOptions(
        max_to_keep=2, enable_async_checkpointing=True, create=True, cleanup_tmp_directories=True
    )
    handlers = {"state": ocp.PyTreeCheckpointHandler(), "data": ocp.JsonCheckpointHandler()}
    start = time.perf_counter()
    with ocp.CheckpointManager(directory, options=options, item_handlers=handlers) as mngr:
        for step in (1, 2, 3):
            mngr.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.PyTreeSave(state(step)), data=ocp.args.JsonSave({"seen": step})
                ),
            )
        mngr.wait_until_finished()
    saved_s = time.perf_counter() - start

    # A fresh manager, as a resumed run would open it.
    with ocp.CheckpointManager(directory, options=options, item_handlers=handlers) as mngr:
        assert mngr.all_steps() == [2, 3]  # step 1 deleted from the bucket by max_to_keep
        assert mngr.latest_step() == 3
        want = state(3)
        target = jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), want
        )
        restored = mngr.restore(
            3,
            args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(
                    target, restore_args=ocp.checkpoint_utils.construct_restore_args(target)
                ),
                data=ocp.args.JsonRestore(),
            ),
        )
    restored_s = time.perf_counter() - start - saved_s
    print(f"orbax on gs:// (TF paths): 3 saves {saved_s:.1f} s, reopen+restore {restored_s:.1f} s")

    assert restored["data"] == {"seen": 3}
    got = restored["state"]
    assert got["w"].sharding == sharded
    for key in want:
        assert got[key].dtype == want[key].dtype
        np.testing.assert_array_equal(np.asarray(got[key]), np.asarray(want[key]))
    names = gcs.list_objects(f"{directory}/")
    assert not [n for n in names if n.startswith(f"{directory}/1/")]
    assert any(n.startswith(f"{directory}/3/state/") for n in names)


def test_subprocess_gets_the_emulator_through_subprocess_env(gcs):  # noqa: F811
    """As a `python main.py ...` run would: a child process with `subprocess_env()` reads what
    this process wrote and writes TFRecords and a file that this process reads back."""
    secret = _payload(70_000, seed=3)
    with tf.io.gfile.GFile(f"{ROOT}/sub/from-parent.bin", "wb") as f:
        f.write(secret)
    child = textwrap.dedent(f"""
        import tensorflow as tf
        with tf.io.gfile.GFile("{ROOT}/sub/from-parent.bin", "rb") as f:
            print(f.read().hex())
        with tf.io.TFRecordWriter("{ROOT}/sub/data.tfrecord") as w:
            for i in range(50):
                w.write(b"record %d " % i * i)
        with tf.io.gfile.GFile("{ROOT}/sub/from-child.txt", "w") as f:
            f.write("written by the child")
    """)
    env = gcs.subprocess_env()
    assert "GOOGLE_APPLICATION_CREDENTIALS" not in env
    out = subprocess.run(
        [sys.executable, "-c", child], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert bytes.fromhex(out.stdout.strip().splitlines()[-1]) == secret
    got = [r.numpy() for r in tf.data.TFRecordDataset(f"{ROOT}/sub/data.tfrecord")]
    assert got == [b"record %d " % i * i for i in range(50)]
    with tf.io.gfile.GFile(f"{ROOT}/sub/from-child.txt") as f:
        assert f.read() == "written by the child"


def test_google_auth_finds_no_credentials(gcs):  # noqa: F811
    """Nothing can authenticate to real Google from the tests: no ADC, no gcloud config, the
    metadata server is a dead loopback port. (So e.g. etils' zonal-bucket probe, which builds a
    storage_control_v2 client when that package is installed, fails before any network call.)"""
    import google.auth
    from google.auth.exceptions import DefaultCredentialsError

    start = time.perf_counter()
    with pytest.raises(DefaultCredentialsError):
        google.auth.default()
    assert time.perf_counter() - start < 5


def _refused(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(2)
        return s.connect_ex(("127.0.0.1", port)) != 0


def test_emulator_stops_cleanly_and_proxy_refuses_other_hosts():
    """A separate emulator: its proxy serves only the storage hosts, and stopping it leaves no
    listener, process or temp files behind."""
    with GcsEmulator() as em:
        ports, pid, ca = (em.port, em.proxy_port), em.pid, em.env["CURL_CA_BUNDLE"]
        for request in (
            b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n",
            b"CONNECT www.googleapis.com:80 HTTP/1.1\r\nHost: www.googleapis.com:80\r\n\r\n",
            b"GET http://example.com/ HTTP/1.1\r\nHost: example.com\r\n\r\n",
        ):
            with socket.create_connection(("127.0.0.1", em.proxy_port), timeout=5) as s:
                s.sendall(request)
                assert s.recv(100).startswith(b"HTTP/1.1 403 ")
        assert len(em.proxy_refused) == 3
        assert os.path.exists(ca)
    assert all(_refused(p) for p in ports)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert not os.path.exists(ca)


def test_tfrecords_with_a_held_out_split_are_written_to_gs(gcs, tmp_path):  # noqa: F811
    from gpt_neo.data.tfrecords import TFRecordJob, create_tfrecords, eval_glob

    texts = tmp_path / "texts"
    texts.mkdir()
    for k in range(40):
        (texts / f"{k:02d}.txt").write_text(f"document {k} " * 5)
    job = TFRecordJob(
        name="held", output_dir=f"{ROOT}/held", encoder="byte", separator=(256,), eval_fraction=0.25
    )
    result = create_tfrecords(job, sorted(texts.iterdir()), show_progress=False)
    assert result.eval_files and all(
        p.startswith(f"{ROOT}/held/eval/held_") for p, _ in result.eval_files
    )
    assert sorted(tf.io.gfile.glob(eval_glob(job))) == sorted(p for p, _ in result.eval_files)
    assert sum(n for _, n in result.files) + sum(n for _, n in result.eval_files) == 40
    assert not [name for name in gcs.list_objects(f"{ROOT}/held/") if name.endswith(".tmp")]

"""Files on local disk or `gs://`, through one door: TensorFlow's `tf.io.gfile`.

tf.data already streams TFRecords from both, so the same filesystem layer serves every other
path a user names (metrics, plots, run records, predictions, eval results, exports,
manifests, a deleted `model_path`): nothing here uses a bare `open`, and `gs://` works
wherever a local path does. (Checkpoints go through orbax, which has its own `gs://` client.)
"""

from __future__ import annotations

import errno
import os
import sys

# TensorFlow imports Keras's optimizers eagerly when Keras is installed (it is: a TensorFlow
# dependency), 2-3 s of every start for a library nothing here uses (tf.data, tf.io and
# tf.train.Example only). TensorFlow skips that import when it fails, and a None entry in
# sys.modules makes it fail at once; the entry goes right after, so `import keras` still works.
_KERAS_EAGER_IMPORT = "keras.src.optimizers"


def tf():
    """TensorFlow, for data and files only: it never sees an accelerator (JAX owns those).
    Imported on first use: it is heavy, and model code never needs it."""
    if "tensorflow" not in sys.modules and "keras" not in sys.modules:
        # oneDNN's custom kernels speed up TensorFlow's CPU math, which nothing here runs (files
        # and parsing only); switched on, TensorFlow announces them on every start
        os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
        sys.modules[_KERAS_EAGER_IMPORT] = None  # pyright: ignore[reportArgumentType] (see above)
        try:
            import tensorflow
        finally:
            if sys.modules.get(_KERAS_EAGER_IMPORT, "") is None:
                del sys.modules[_KERAS_EAGER_IMPORT]
    import tensorflow

    tensorflow.config.set_visible_devices([], "GPU")
    return tensorflow


def is_remote(path: str) -> bool:
    return "://" in str(path)


def join(folder: str, *names: str) -> str:
    """`folder/name`, for local paths and URLs alike (os.path.join would mangle neither, but
    says nothing about `gs://`)."""
    return "/".join([str(folder).rstrip("/"), *names])


def exists(path: str) -> bool:
    return tf().io.gfile.exists(path)


def makedirs(path: str) -> None:
    tf().io.gfile.makedirs(path)


def listdir(path: str) -> list[str]:
    """Names in a folder (none when it does not exist)."""
    gfile = tf().io.gfile
    return [name.rstrip("/") for name in gfile.listdir(path)] if gfile.isdir(path) else []


def read_text(path: str) -> str:
    with tf().io.gfile.GFile(path) as handle:
        return handle.read()


def read_bytes(path: str) -> bytes:
    with tf().io.gfile.GFile(path, "rb") as handle:
        return handle.read()


def write_text_atomic(path: str, text: str) -> None:
    """Write `path` whole or not at all: a temporary file, then a rename."""
    write_bytes_atomic(path, text.encode())


def write_bytes_atomic(path: str, data: bytes) -> None:
    t = tf()
    tmp = path + ".tmp"
    with t.io.gfile.GFile(tmp, "wb") as handle:
        handle.write(data)
    t.io.gfile.rename(tmp, path, overwrite=True)


def append_text(path: str, text: str) -> None:
    """Add `text` to the end of `path` (created if absent). On `gs://`, where objects cannot
    grow, TensorFlow rewrites the object: fine for logs of a few MB."""
    with tf().io.gfile.GFile(path, "a") as handle:
        handle.write(text)


def copy(source: str, destination: str) -> None:
    """Copy one file (either side local or `gs://`), overwriting."""
    tf().io.gfile.copy(source, destination, overwrite=True)


def copy_tree(local_dir: str, destination: str) -> None:
    """Copy a local folder's files into `destination` (local or `gs://`), overwriting."""
    for root, _, files in os.walk(local_dir):
        target = join(destination, os.path.relpath(root, local_dir)).removesuffix("/.")
        makedirs(target)
        for name in files:
            copy(os.path.join(root, name), join(target, name))


def delete_tree(path: str) -> None:
    """Delete a folder and everything in it, or one file."""
    gfile = tf().io.gfile
    if gfile.isdir(path):
        gfile.rmtree(path)
    else:
        gfile.remove(path)


def move_tree(source: str, destination: str) -> None:
    """Move a folder (a rename on local disk; object by object on `gs://`, which has no
    folders to rename)."""
    if not is_remote(source):
        os.makedirs(os.path.dirname(destination), exist_ok=True)
        os.replace(source, destination)
        return
    gfile = tf().io.gfile
    for root, _, files in gfile.walk(source):
        target = join(destination, root[len(source) :].strip("/")).rstrip("/")
        makedirs(target)
        for name in files:
            gfile.rename(join(root, name), join(target, name), overwrite=True)
    delete_tree(source)


_SPACE_ERRNOS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "the disk quota is used up",
    errno.EFBIG: "a file-size limit (ulimit -f) was reached",
}
# TensorFlow, tensorstore and GCS report lack of space as text in errors of their own
_SPACE_MESSAGES = {
    "no space left": _SPACE_ERRNOS[errno.ENOSPC],
    "disk quota exceeded": _SPACE_ERRNOS[errno.EDQUOT],
    "file too large": _SPACE_ERRNOS[errno.EFBIG],
    "quota exceeded": "the storage quota is used up",
}


def space_problem(err: BaseException | str | None) -> str | None:
    """Why a write failed for lack of space (a full disk, a quota, a file-size limit), in a
    few words; None when it did not fail for that. `err` may be an error's text."""
    while err is not None:
        if isinstance(err, OSError) and err.errno in _SPACE_ERRNOS:
            return _SPACE_ERRNOS[err.errno]
        text = str(err).lower()
        for message, reason in _SPACE_MESSAGES.items():
            if message in text:
                return reason
        err = getattr(err, "__cause__", None) or getattr(err, "__context__", None)
    return None


def is_out_of_space(err: BaseException | str | None) -> bool:
    return space_problem(err) is not None

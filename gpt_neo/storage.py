"""Files on local disk or `gs://`, through one door: TensorFlow's `tf.io.gfile`.

tf.data already streams TFRecords from both, so the same filesystem layer serves every other
path a user names (predictions, eval results, manifests, a deleted `model_path`): nothing
here uses a bare `open`, and `gs://` works wherever a local path does.
"""

from __future__ import annotations


def tf():
    """TensorFlow, for data and files only: it never sees an accelerator (JAX owns those).
    Imported on first use: it is heavy, and model code never needs it."""
    import tensorflow

    tensorflow.config.set_visible_devices([], "GPU")
    return tensorflow


def exists(path: str) -> bool:
    return tf().io.gfile.exists(path)


def read_text(path: str) -> str:
    with tf().io.gfile.GFile(path) as handle:
        return handle.read()


def write_text_atomic(path: str, text: str) -> None:
    """Write `path` whole or not at all: a temporary file, then a rename."""
    t = tf()
    tmp = path + ".tmp"
    with t.io.gfile.GFile(tmp, "w") as handle:
        handle.write(text)
    t.io.gfile.rename(tmp, path, overwrite=True)


def delete_tree(path: str) -> None:
    tf().io.gfile.rmtree(path)

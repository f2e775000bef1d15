"""The storage layer serves local paths and filesystem URLs alike (TensorFlow's in-memory
`ram://` stands in for `gs://`: both go through tf.io.gfile)."""

import pytest

from gpt_neo import storage


@pytest.mark.parametrize("root", ["local", "ram://storage-test"])
def test_write_read_and_delete_whole_trees(tmp_path, root):
    base = str(tmp_path) if root == "local" else root
    path = f"{base}/run/predictions_3.txt"
    storage.tf().io.gfile.makedirs(f"{base}/run")
    assert not storage.exists(path)
    storage.write_text_atomic(path, "first")
    storage.write_text_atomic(path, "sample ü\n")  # replaces whole
    assert storage.read_text(path) == "sample ü\n"
    assert not storage.exists(path + ".tmp")
    storage.delete_tree(f"{base}/run")
    assert not storage.exists(path)

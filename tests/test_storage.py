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


@pytest.mark.parametrize("root", ["local", "ram://storage-move"])
def test_move_tree_moves_every_file_and_leaves_nothing_behind(tmp_path, root):
    """How a damaged checkpoint is set aside (gpt_neo.training.checkpoint.checkpointer): a rename locally, object
    by object through gfile elsewhere."""
    base = str(tmp_path) if root == "local" else root
    storage.makedirs(f"{base}/checkpoints/9/state/d")
    storage.write_text_atomic(f"{base}/checkpoints/9/state/d/a", "array bytes")
    storage.write_text_atomic(f"{base}/checkpoints/9/meta", "{}")
    storage.move_tree(f"{base}/checkpoints/9", f"{base}/damaged/9-x")
    assert not storage.exists(f"{base}/checkpoints/9")
    assert storage.read_text(f"{base}/damaged/9-x/state/d/a") == "array bytes"
    assert storage.read_text(f"{base}/damaged/9-x/meta") == "{}"

"""Checkpoints under `model_path`: orbax saves and restores (`checkpointer`), their checksums
(`manifest`), and one writer per `model_path` (`run_lock`)."""

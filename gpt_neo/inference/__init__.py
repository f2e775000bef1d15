"""Using a trained model: sampling with a KV cache, `--predict`, and evaluation tasks."""

"""Test support: shared helpers (tiny configs, datasets, processes), the fake `gcloud` and the GCS emulator."""

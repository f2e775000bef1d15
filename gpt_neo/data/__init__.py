"""From text to batches: tokenizers, raw text archives, TFRecords, dataset configs, and the
resumable input pipeline that feeds training (records, mixing, device placement), with the
`--check_dataset` report."""

"""The tokenize pipeline: WebDataset shards -> Ray Data (CPU read/decode actors, encoder actor
pool) -> a Parquet token corpus, exactly once and resumable (`pipeline`), with its model stage
(`encode`)."""

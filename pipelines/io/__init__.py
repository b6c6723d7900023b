"""The I/O layer every pipeline shares: fsspec storage with retries and atomic commits
(`storage`), WebDataset shard reading (`shards`, `read`), image decoding (`decode`), input shard
ids (`shard_ids`), the token corpus on storage (`corpus`), every table's schema (`schemas`) and
the one-writer lease (`lease`). Nothing here imports torch."""

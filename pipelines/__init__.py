"""dualtok's pipelines: Ray Data and Ray Train programs over object storage (installed as
`dualtok.pipelines`). One sub-package per pipeline, over one shared I/O layer:

    io/         storage (any fsspec URI), shard reading, decoding, the corpus format, schemas, leases
    tokenize/   WebDataset shards -> Parquet token corpus, exactly once
    train/      one training stage on Ray Train -> a bundle
    audit/      a corpus sample re-rendered and scored -> tables + HTML report; corpus statistics
    shards/     folders and path lists -> WebDataset shards; the bundled sample photos
    sequences/  a corpus -> LLM training sequences (the streaming loader)
    actors.py   what every model stage shares: bundle source, actor-pool resources, device
    cluster.py  where a job's Ray cluster is
    config.py   the typed-config parser every job uses
    progress.py counts, rate and ETA of a run

Imports go downward only: `dualtok.jobs` -> `dualtok.pipelines` -> `dualtok_core`
(tests/test_layout.py checks it, and that no module circle exists).
"""

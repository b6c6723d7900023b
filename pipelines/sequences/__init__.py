"""From a token corpus to LLM training sequences over the contract of `dualtok_core.sequences`:
the streaming, resumable loader (`loader`) and `dualtok export` to Megatron-LM / Parquet files
(`export`)."""

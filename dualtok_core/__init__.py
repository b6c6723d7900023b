"""dualtok: a dual-stream (guide + semantic) visual tokenizer for LLM pretraining corpora."""

__version__ = "0.1.0"

"""dualtok: a dual-stream (guide + semantic) visual tokenizer for LLM pretraining corpora.

    from dualtok_core import DualTokenizer
    tok = DualTokenizer.from_pretrained("path/or/s3://bundle")

The facade is imported on first use, so that `import dualtok_core.errors` stays light.
"""

__version__ = "0.1.0"
__all__ = ["DualTokenizer", "__version__"]


def __getattr__(name: str):
    if name == "DualTokenizer":
        from dualtok_core.bundle import DualTokenizer

        return DualTokenizer
    raise AttributeError(f"module 'dualtok_core' has no attribute {name!r}")

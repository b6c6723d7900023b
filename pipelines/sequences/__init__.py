"""From a token corpus to LLM training sequences: the streaming, resumable loader (`loader`)
over the sequence contract of `dualtok_core.sequences`."""

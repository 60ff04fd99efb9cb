"""The demo world: corpora, tokenizer, demo target and draft, and request workloads (no hub needed)."""

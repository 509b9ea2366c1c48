"""Generative inference: GGUF language models, tokenizer, reference forward pass (issue 5, in progress)."""

"""Generative inference: GGUF reading, the tokenizer, a numpy reference decoder, the ONNX decoder
session with its KV cache, sampling, streaming detokenization, and LanguageModel.generate()."""

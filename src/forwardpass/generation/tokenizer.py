"""The tokenizer stored in GGUF metadata, rebuilt as a Hugging Face `tokenizers` Tokenizer.

GGUF keeps a byte-level BPE vocabulary (``tokenizer.ggml.tokens``), its merges, token types
(3 = control, 4 = user-defined: special tokens) and a pre-tokenizer name (``tokenizer.ggml.pre``)
that llama.cpp maps to split regexes. Only pre-tokenizers verified against llama.cpp are accepted.

    tok = tokenizer_from_gguf(GGUFFile.open(path))
    tok.save("tokenizer.json")     # the model folder's copy: loading it takes milliseconds
"""

from __future__ import annotations

from typing import Any

from forwardpass._deps import require
from forwardpass.generation.gguf_file import GGUFError, GGUFFile

_CONTROL, _USER_DEFINED = 3, 4


def _pre_tokenizer(name: str, pre_tokenizers: Any) -> Any:
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)  # GPT-2's split regex
    table = {
        # llama.cpp: "\p{N}" (each digit alone), then GPT-2's regex
        "smollm": lambda: pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level]),
        "gpt-2": lambda: byte_level,
        "default": lambda: byte_level,
    }
    if name not in table:
        raise GGUFError(f"pre-tokenizer '{name}' is not supported yet (supported: {sorted(table)})")
    return table[name]()


def tokenizer_from_gguf(model: GGUFFile) -> Any:
    """A `tokenizers.Tokenizer` equal to the one llama.cpp builds from the same metadata."""
    tk = require("tokenizers", "llm", "GGUF tokenizers")
    kind = model.value("tokenizer.ggml.model")
    if kind != "gpt2":
        raise GGUFError(f"{model.path}: tokenizer model '{kind}' is not supported (byte-level BPE 'gpt2' is)")
    tokens = _strings(model, "tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ", 1)) for m in _strings(model, "tokenizer.ggml.merges")]
    if any(len(m) != 2 for m in merges):
        raise GGUFError(f"{model.path}: metadata 'tokenizer.ggml.merges' has an entry without a space; "
                        "each is two tokens separated by one")  # fmt: skip
    types = list(model.value("tokenizer.ggml.token_type", [1] * len(tokens)))
    try:
        bpe = tk.models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False)
    except Exception as exc:  # tokenizers raises a bare Exception, e.g. for a merge of unknown tokens
        raise GGUFError(f"{model.path}: the tokenizer in the metadata does not load ({exc})") from None
    tokenizer = tk.Tokenizer(bpe)
    tokenizer.pre_tokenizer = _pre_tokenizer(str(model.value("tokenizer.ggml.pre", "default")), tk.pre_tokenizers)
    tokenizer.decoder = tk.decoders.ByteLevel()
    special = [tk.AddedToken(t, special=True, normalized=False) for t, kind in zip(tokens, types)
               if kind in (_CONTROL, _USER_DEFINED)]  # fmt: skip
    tokenizer.add_special_tokens(special)
    return tokenizer


def _strings(model: GGUFFile, key: str) -> list[str]:
    values = model.value(key)
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise GGUFError(f"{model.path}: metadata '{key}' is not an array of strings")
    return values

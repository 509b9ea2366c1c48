"""Reading a GGUF language model: hyper-parameters, tokenizer metadata and (dequantized) tensors.

    model = GGUFFile.open("SmolLM2-135M-Instruct.Q4_1.gguf")
    model.hparams.n_layer            # 30
    model.dequantize("blk.0.attn_q.weight")   # float32 (576, 576), rows = output features

A file that is not GGUF, is cut short or lacks a field raises GGUFError naming the file and
what is wrong, never a parser traceback.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from forwardpass._deps import require
from forwardpass.errors import ModelLoadError

_PURPOSE = "reading GGUF language models"


class GGUFError(ModelLoadError):
    """A GGUF file that cannot be used: not GGUF, truncated, or missing what the model needs."""


@dataclass(frozen=True)
class HParams:
    """The architecture numbers a Llama-family decoder needs."""

    arch: str
    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    n_ctx: int
    n_vocab: int
    rope_base: float
    rope_dim: int
    rms_eps: float

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


class GGUFFile:
    """An opened GGUF file (memory-mapped by the gguf package)."""

    def __init__(self, path: Path, reader: Any):
        self.path, self._reader = path, reader
        self.fields = reader.fields
        self.tensors = {t.name: t for t in reader.tensors}
        self.hparams = self._hparams()

    @classmethod
    def open(cls, path: str | Path) -> GGUFFile:
        """Open and validate ``path``; GGUFError for anything unusable."""
        gguf = require("gguf", "llm", _PURPOSE)
        path = Path(path)
        try:
            with path.open("rb") as f:
                magic = f.read(4)
        except OSError as exc:
            raise GGUFError(f"{path}: cannot read: {exc.strerror}") from None
        if magic != b"GGUF":
            raise GGUFError(f"{path}: not a GGUF file (starts with {magic!r}, expected b'GGUF')")
        try:
            reader = gguf.GGUFReader(str(path))
        except Exception as exc:  # the parser raises ValueError/IndexError/struct.error on damaged files
            raise GGUFError(f"{path}: damaged or truncated GGUF file ({type(exc).__name__}: {exc})") from None
        return cls(path, reader)

    def value(self, key: str, default: Any = ...) -> Any:
        """A metadata value (``general.architecture``, ``tokenizer.ggml.tokens``, ...)."""
        field = self.fields.get(key)
        if field is None:
            if default is ...:
                raise GGUFError(f"{self.path}: metadata '{key}' is missing")
            return default
        try:
            return field.contents()
        except Exception as exc:
            raise GGUFError(f"{self.path}: metadata '{key}' is unreadable ({exc})") from None

    def _hparams(self) -> HParams:
        arch = self.value("general.architecture")
        if arch != "llama":
            raise GGUFError(f"{self.path}: architecture '{arch}' is not supported (llama-family decoders are)")

        def num(key: str, default: Any = ...) -> Any:
            return self.value(f"{arch}.{key}", default)

        n_embd, n_head = int(num("embedding_length")), int(num("attention.head_count"))
        tokens = self.fields.get("tokenizer.ggml.tokens")
        return HParams(
            arch=arch,
            n_layer=int(num("block_count")),
            n_embd=n_embd,
            n_ff=int(num("feed_forward_length")),
            n_head=n_head,
            n_head_kv=int(num("attention.head_count_kv", n_head)),
            n_ctx=int(num("context_length")),
            n_vocab=int(num("vocab_size", len(tokens.data) if tokens is not None else 0)),
            rope_base=float(num("rope.freq_base", 10000.0)),
            rope_dim=int(num("rope.dimension_count", n_embd // n_head)),
            rms_eps=float(num("attention.layer_norm_rms_epsilon")),
        )

    def tensor(self, name: str) -> Any:
        """The raw tensor record (type, shape, quantized bytes)."""
        found = self.tensors.get(name)
        if found is None:
            raise GGUFError(f"{self.path}: tensor '{name}' is missing")
        return found

    def dequantize(self, name: str) -> np.ndarray:
        """The tensor as float32, rows = output features (numpy order, GGUF's dims reversed)."""
        gguf = require("gguf", "llm", _PURPOSE)
        t = self.tensor(name)
        try:
            values = gguf.quants.dequantize(t.data, t.tensor_type)
        except Exception as exc:
            raise GGUFError(f"{self.path}: tensor '{name}' ({t.tensor_type.name}) cannot be read ({exc})") from None
        return np.asarray(values, dtype=np.float32).reshape([int(d) for d in reversed(t.shape.tolist())])

"""``pre: {kind: text, ...}``: strings -> a BYTES input, or through a tokenizer.json -> input_ids / attention_mask.

    pre: {kind: text, tokenizer: tokenizer.json, max_length: 128}

    pre = build_pre(config.pre, specs, folder)
    pre(["the movie was good", b"utf-8 bytes too"])    # {"input_ids": (2, T), "attention_mask": (2, T)}
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import Field

from forwardpass._deps import require
from forwardpass.config import PreOptions
from forwardpass.errors import InvalidInput, ModelConfigError
from forwardpass.pipeline.pre import BatchDefaults, Plan, Preprocessor, pick_input, some
from forwardpass.tensors import to_numpy

if TYPE_CHECKING:
    from forwardpass.config import TensorSpec

INLINE_CHARACTERS = 2000  # tokenized text below this costs less than a hop to a thread


class TextPre(PreOptions):
    """Strings -> a BYTES input, or through a tokenizer.json -> input_ids / attention_mask."""

    kind: Literal["text"]
    tokenizer: str | None = None  # path relative to the model folder; None = raw strings
    input: str | None = None  # the BYTES input for raw strings
    max_length: int = Field(512, ge=1)
    input_ids: str = "input_ids"
    attention_mask: str | None = "attention_mask"
    token_type_ids: str | None = None


class Text(Preprocessor):
    """Strings (or UTF-8 bytes) -> a BYTES input, or -> input_ids / attention_mask through a tokenizer.json."""

    schema = TextPre
    takes_raw = True
    text = True
    batch = BatchDefaults(batch_size=64, chunk_rows=1024, ray_rows=4096)

    def __init__(self, config: TextPre, specs: Sequence[TensorSpec], folder: Path):
        super().__init__(config, specs, folder)
        self.config: TextPre = config
        self.names = {s.name: s for s in specs}
        self.tokenizer = None
        if config.tokenizer is None:
            spec = pick_input(specs, config.input, "text", lambda s: s.datatype == "BYTES")
            self.input, self.rank = spec.name, len(spec.shape)
            return
        tokenizers = require("tokenizers", "text", "text pre-processing with a tokenizer.json")
        path = folder / config.tokenizer
        if folder.resolve() not in path.resolve().parents:
            raise ModelConfigError(str(folder / "model.yaml"), "pre.tokenizer", f"'{config.tokenizer}' is outside the "
                                   "model folder", "put tokenizer.json beside model.yaml")  # fmt: skip
        try:
            self.tokenizer = tokenizers.Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a bare Exception for missing/corrupt files
            raise ModelConfigError(str(folder / "model.yaml"), "pre.tokenizer", f"cannot load {path}: {exc}",
                                   "point it at a Hugging Face tokenizer.json in the model folder") from None  # fmt: skip
        self.tokenizer.enable_truncation(config.max_length)
        self.tokenizer.enable_padding()
        for field in ("input_ids", "attention_mask", "token_type_ids"):
            name = getattr(config, field)
            if name is not None and name not in self.names:
                raise ModelConfigError(str(folder / "model.yaml"), f"pre.{field}",
                                       f"'{name}' is not a model input ({list(self.names)})",
                                       "name a model input")  # fmt: skip

    def is_single(self, data: Any) -> bool:
        return isinstance(data, (str, bytes))

    def read_row(self, row: Mapping[str, Any]) -> Any:
        """A JSONL row's ``text`` (or ``prompt``, as in a .txt of prompts)."""
        return row.get("text", row.get("prompt"))

    def plan(self, instances: Sequence[Any]) -> Plan:
        """Check every instance is text; tokenizing grows with its length."""
        some(instances)
        texts = [_string(i, text) for i, text in enumerate(instances)]
        chars = sum(map(len, texts))
        if self.tokenizer is None:
            return Plan(chars, "characters", False, lambda: self._strings(texts))
        return Plan(chars, "characters", chars > INLINE_CHARACTERS, lambda: self._tokens(texts))

    def _strings(self, texts: list[str]) -> dict[str, np.ndarray]:
        array = np.array(texts, dtype=object)
        return {self.input: array.reshape(-1, 1) if self.rank == 2 else array}

    def _tokens(self, texts: list[str]) -> dict[str, np.ndarray]:
        encodings = self.tokenizer.encode_batch(texts)  # type: ignore[union-attr]
        feeds = {}
        for field, attr in (("input_ids", "ids"), ("attention_mask", "attention_mask"), ("token_type_ids", "type_ids")):
            name = getattr(self.config, field)
            if name is not None:
                values = np.array([getattr(e, attr) for e in encodings], dtype=np.int64)
                feeds[name] = values.astype(to_numpy(self.names[name].datatype), copy=False)
        return feeds


def _string(i: int, text: Any) -> str:
    if isinstance(text, str):
        return text
    if isinstance(text, bytes):
        try:
            return text.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidInput(("instances", i), "expected UTF-8 text", text[:16]) from None
    raise InvalidInput(("instances", i), "expected a string", text)

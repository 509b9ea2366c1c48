"""Constrained decoding with llguidance: a grammar per request, a token mask per step, output that always parses.

    grammar = Grammar("json_schema", {"type": "object", ...}, ("response_format", "json_schema", "schema"))
    constraint = grammar.constraint(llm)       # compiled against the model's vocabulary (about 1 ms)
    masks = MaskWorker()
    pending = masks.start([(0, constraint)])    # computed on a worker thread while the forward pass runs
    logits = session.decode(...)
    allowed = pending.result()[0]               # (V,) bool: the tokens that keep the output in the grammar
    token = sampler.pick(np.where(allowed, logits, -np.inf))
    constraint.consume(token)

llguidance (Microsoft's grammar engine, Rust, no dependencies) compiles JSON schemas, regular expressions,
choices and Lark grammars, and computes a token mask in tens of microseconds on a 49k vocabulary; both it and
ONNX Runtime release the GIL, so the masks of a step's constrained rows cost no time beside the forward
pass. Unconstrained rows never touch it. A grammar the model's tokenizer cannot follow is an InvalidInput
naming the request field it came from.
"""

from __future__ import annotations

import json
import threading
import weakref
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from forwardpass._deps import require
from forwardpass.errors import InvalidInput

Kind = Literal["json_schema", "regex", "choice", "lark"]


def _guidance() -> Any:
    return require("llguidance", "llm", "structured outputs (response_format, tools, guided_*)")


@dataclass(frozen=True)
class Grammar:
    """What a request asks its output to follow: ``kind`` and its source, and the field it came from."""

    kind: Kind
    source: Any  # a JSON schema (dict), a regex or Lark text (str), or a list of strings (choice)
    loc: tuple[str | int, ...]

    def text(self) -> str:
        """The llguidance grammar."""
        llg = _guidance()
        if self.kind == "json_schema":
            # OpenAI's JSON: the schema's own properties in order, whitespace as a compact serializer writes it
            options = {"whitespace_flexible": False, "coerce_one_of": True}
            return str(llg.LLMatcher.grammar_from_json_schema(json.dumps(closed(self.source)), overrides=options))
        if self.kind == "regex":
            return str(llg.LLMatcher.grammar_from_regex(self.source))
        if self.kind == "choice":
            return str(llg.grammar_from("choice", json.dumps(self.source)))
        return str(llg.LLMatcher.grammar_from_lark(self.source))

    def constraint(self, llm: Any) -> Constraint:
        """This grammar compiled against ``llm``'s vocabulary; InvalidInput at ``loc`` when it cannot be."""
        llg = _guidance()
        tokenizer = guidance_tokenizer(llm)
        try:
            grammar = self.text()
        except (ValueError, TypeError) as exc:
            raise InvalidInput(self.loc, f"not a valid {self.kind.replace('_', ' ')}: {exc}") from None
        matcher = llg.LLMatcher(tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise InvalidInput(self.loc, f"cannot constrain the output to this {self.kind.replace('_', ' ')}: "
                               f"{matcher.get_error()[:300]}")  # fmt: skip
        return Constraint(matcher, tokenizer.vocab_size)


class Constraint:
    """One request's grammar state: which tokens may come next, and the tokens it has taken."""

    def __init__(self, matcher: Any, vocab: int):
        self.matcher, self.vocab = matcher, vocab

    def copy(self) -> Constraint:
        """The same grammar in the same state, to follow on its own (another choice of the request)."""
        return Constraint(self.matcher.deep_copy(), self.vocab)

    def consume(self, token: int) -> None:
        """Advance past a sampled token (one the mask allowed)."""
        if not self.matcher.consume_token(token):
            raise RuntimeError(f"the grammar refused token {token} its own mask allowed: {self.matcher.get_error()}")

    @property
    def done(self) -> bool:
        """The grammar is complete and allows nothing more (the output ends here)."""
        return bool(self.matcher.is_stopped())

    def allowed(self) -> np.ndarray:
        """The mask for the next token, computed here (a worker computes many at once: MaskWorker)."""
        llgn = require("llguidance.numpy", "llm", "structured outputs")
        bitmask = llgn.allocate_token_bitmask(1, self.vocab)
        llgn.fill_next_token_bitmask(self.matcher, bitmask, 0)
        return unpack(bitmask, self.vocab)[0]


def closed(schema: Any) -> Any:
    """``schema`` with ``additionalProperties: false`` on every object that lists ``properties`` and says nothing
    of others. Whatever follows the closed schema follows the original, so the answer still validates; but a
    small model given leave to add properties of its own invents them until max_tokens (llm's concise schemas,
    ``{"properties": {"name": ...}}``, do so)."""
    if isinstance(schema, list):
        return [closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: closed(v) if k in _SUBSCHEMAS else v for k, v in schema.items()}
    for key in ("properties", "$defs", "definitions", "patternProperties"):
        if isinstance(schema.get(key), dict):
            out[key] = {name: closed(sub) for name, sub in schema[key].items()}
    if isinstance(schema.get("properties"), dict) and "additionalProperties" not in schema \
            and "patternProperties" not in schema:  # fmt: skip
        out["additionalProperties"] = False
    return out


_SUBSCHEMAS = {"items", "prefixItems", "anyOf", "oneOf", "allOf", "not", "if", "then", "else", "additionalProperties",
               "contains"}  # fmt: skip


def unpack(bitmask: np.ndarray, vocab: int) -> np.ndarray:
    """llguidance's int32 bitmask (rows, ceil(V/32)) -> bool (rows, V)."""
    bits = np.unpackbits(np.ascontiguousarray(bitmask).view(np.uint8), axis=1, bitorder="little")
    return bits[:, :vocab].astype(bool)


def apply(logits: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """Logits with every token the grammar forbids at -inf (a new array; the model's vocabulary may be padded
    past the tokenizer's: those tokens are forbidden too)."""
    out = np.full(logits.shape, -np.inf, dtype=np.float32)
    n = min(len(allowed), len(logits))
    out[:n] = np.where(allowed[:n], logits[:n], -np.inf)
    return out


class MaskWorker:
    """Computes the masks of a step's constrained rows on one worker thread (llguidance spreads them over its
    own threads), while the caller runs the forward pass."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="grammar-masks")
        self._executor: Any = None

    def start(self, rows: Sequence[tuple[int, Constraint]]) -> Future[dict[int, np.ndarray]]:
        """Begin the masks of ``rows`` ((row key, constraint) pairs); the future gives {row key: (V,) bool}."""
        return self._pool.submit(self._masks, list(rows))

    def _masks(self, rows: list[tuple[int, Constraint]]) -> dict[int, np.ndarray]:
        llg = _guidance()
        llgn = require("llguidance.numpy", "llm", "structured outputs")
        if self._executor is None:
            self._executor = llg.LLExecutor()
        vocab = max(c.vocab for _, c in rows)
        bitmask = llgn.allocate_token_bitmask(len(rows), vocab)
        llgn.fill_next_token_bitmask_par(self._executor, [(c.matcher, i) for i, (_, c) in enumerate(rows)], bitmask)
        allowed = unpack(bitmask, vocab)
        return {key: allowed[i] for i, (key, _) in enumerate(rows)}

    def close(self) -> None:
        self._pool.shutdown(wait=False)


_tokenizers: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def guidance_tokenizer(llm: Any) -> Any:
    """llguidance's view of ``llm``'s vocabulary (built once per model: about 0.4 s for 49k tokens)."""
    with _lock:
        found = _tokenizers.get(llm)
        if found is None:
            llg = _guidance()
            stops = list(llm.gen.stop_token_ids) or None
            found = _tokenizers[llm] = llg.LLTokenizer(llm.tokenizer.to_str(), eos_token=stops)
        return found


__all__ = ["Constraint", "Grammar", "MaskWorker", "apply", "guidance_tokenizer", "unpack"]

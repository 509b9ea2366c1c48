"""A language model from the repository: tokenizer, chat template, decoder session, sampling loop.

    llm = forwardpass.load("smollm2")
    llm.generate("What is the capital of France?").text
    for chunk in llm.generate(messages=[{"role": "user", "content": "Hi"}], stream=True):
        print(chunk, end="")
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

from forwardpass._deps import require
from forwardpass.config import ModelConfig
from forwardpass.errors import InvalidInput, ModelConfigError
from forwardpass.generation.sampler import SamplingParams
from forwardpass.generation.sequence import Generation
from forwardpass.generation.sequence import Sequence as TokenSequence
from forwardpass.generation.session import DecoderSession

__all__ = ["Generation", "LanguageModel"]


class LanguageModel:
    """One version of a generation model; generate() runs one sequence at a time."""

    def __init__(self, name: str, version: int, config: ModelConfig, folder: Path):
        tokenizers = require("tokenizers", "llm", "language models")
        assert config.generation is not None
        self.name, self.version, self.config, self.folder = name, version, config, folder
        gen = self.gen = config.generation
        self.tokenizer = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.template = None
        if gen.chat_template:
            jinja2 = require("jinja2", "llm", "chat templates")
            env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
            try:
                self.template = env.from_string((folder / gen.chat_template).read_text(encoding="utf-8"))
            except (OSError, jinja2.TemplateError) as exc:
                raise ModelConfigError(str(folder / "model.yaml"), "generation.chat_template", str(exc),
                                       "point it at the template file beside model.yaml") from None  # fmt: skip
        self._lock = threading.Lock()

    @cached_property
    def session(self) -> DecoderSession:
        """The single-sequence session generate() uses (created on first use: a server decodes through its
        own multi-slot scheduler and never needs this one)."""
        return self.open_session(slots=1)

    def open_session(self, slots: int = 1, context: int | None = None) -> DecoderSession:
        """A decoder with ``slots`` KV rows of ``context`` positions (default: the model's context)."""
        gen = self.gen
        folder = self.folder / str(self.version)
        prefill = folder / "prefill.onnx"
        return DecoderSession(
            folder / "model.onnx", n_layer=gen.n_layer, n_head_kv=gen.n_head_kv, head_dim=gen.head_dim,
            n_vocab=gen.n_vocab, max_context=context or gen.context_length, slots=slots,
            prefill_path=prefill if prefill.is_file() else None,
        )  # fmt: skip

    def __repr__(self) -> str:
        return f"<LanguageModel {self.name} v{self.version}, context {self.gen.context_length}>"

    def render(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        """The chat template applied to ``messages`` (role/content dicts)."""
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise InvalidInput(("messages", i), "expected {'role': str, 'content': str}", m)
            if m["role"] not in ("system", "user", "assistant", "tool"):
                raise InvalidInput(("messages", i, "role"), "expected system, user, assistant or tool", m["role"])
        if self.template is None:
            return "".join(m["content"] + "\n" for m in messages)
        return self.template.render(messages=list(messages), add_generation_prompt=add_generation_prompt)

    def encode(self, text: str) -> list[int]:
        """Prompt token ids (special tokens in the text are recognized; BOS added when the model wants it)."""
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        return [self.gen.bos_token_id, *ids] if self.gen.add_bos_token and self.gen.bos_token_id >= 0 else ids

    def prepare(self, prompt: str | None = None, *, messages: Sequence[dict[str, Any]] | None = None,
                max_tokens: int | None = None, stop: str | Sequence[str] | None = None, logprobs: int = 0,
                ignore_eos: bool = False, **sampling: Any) -> TokenSequence:  # fmt: skip
        """A checked, tokenized request, ready to run (generate() and the server's scheduler both start here).

        ``ignore_eos`` keeps generating past the model's stop tokens, to max_tokens (benchmarks, as vLLM's).
        """
        if not 0 <= logprobs <= 20:
            raise InvalidInput(("logprobs",), "expected 0 to 20", logprobs)
        if (prompt is None) == (messages is None):
            raise InvalidInput(("prompt",), "give either prompt or messages")
        if prompt is not None and not isinstance(prompt, str):
            raise InvalidInput(("prompt",), "expected a string", prompt)
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if len(stops) > 4 or not all(isinstance(s, str) and s for s in stops):
            raise InvalidInput(("stop",), "expected a non-empty string or a list of up to 4", stop)
        text = prompt if prompt is not None else self.render(messages or [])
        ids = self.encode(text)
        if not ids:
            raise InvalidInput(("prompt",), "expected at least one token", text)
        if len(ids) >= self.gen.context_length:
            raise InvalidInput(("messages" if prompt is None else "prompt",),
                               f"the prompt is {len(ids)} tokens, the context holds {self.gen.context_length} "
                               "(prompt and completion together); shorten the prompt")  # fmt: skip
        limit = max_tokens if max_tokens is not None else min(self.gen.max_tokens, self.gen.context_length - len(ids))
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise InvalidInput(("max_tokens",), "expected an integer >= 1", limit)
        if len(ids) + limit > self.gen.context_length:
            raise InvalidInput(("max_tokens",), f"the prompt ({len(ids)} tokens) + max_tokens ({limit}) = "
                               f"{len(ids) + limit} is more than the context of {self.gen.context_length} tokens; "
                               "shorten the prompt or lower max_tokens")  # fmt: skip
        params = SamplingParams(**sampling)
        return TokenSequence(ids, limit=limit, stop=stops, params=params, logprobs=logprobs,
                             stop_ids=() if ignore_eos else self.gen.stop_token_ids, tokenizer=self.tokenizer)  # fmt: skip

    def generate(self, prompt: str | None = None, *, messages: Sequence[dict[str, Any]] | None = None,
                 max_tokens: int | None = None, stop: str | Sequence[str] | None = None, stream: bool = False,
                 logprobs: int = 0, **sampling: Any) -> Generation | Iterator[str]:  # fmt: skip
        """Complete ``prompt`` (raw text) or ``messages`` (through the chat template).

        Sampling keywords are SamplingParams' (temperature, top_k, top_p, min_p, penalties, seed);
        temperature 0 is greedy. With ``stream`` an iterator of text pieces, else a Generation.
        ``logprobs`` > 0 records, per generated token, its log-probability and the top ``logprobs``
        alternatives (before sampling filters, as OpenAI reports them) in ``token_logprobs``.
        """
        seq = self.prepare(prompt, messages=messages, max_tokens=max_tokens, stop=stop, logprobs=logprobs, **sampling)
        run = self._run(seq)
        if stream:
            return (piece for piece in run if isinstance(piece, str))
        result = None
        for item in run:
            if isinstance(item, Generation):
                result = item
        assert result is not None
        return result

    def _run(self, seq: TokenSequence) -> Iterator[str | Generation]:
        with self._lock:
            session = self.session
            session.reset()
            logits = session.step(seq.prompt)
            while True:
                piece = seq.advance(logits)
                if piece:
                    yield piece
                if seq.finish_reason:
                    break
                logits = session.step([seq.tokens[-1]])
        yield seq.result()

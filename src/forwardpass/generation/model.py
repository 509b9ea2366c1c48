"""A language model from the repository: tokenizer, chat template, decoder session, sampling loop.

    llm = forwardpass.load("smollm2")
    llm.generate("What is the capital of France?").text
    for chunk in llm.generate(messages=[{"role": "user", "content": "Hi"}], stream=True):
        print(chunk, end="")
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from forwardpass._deps import require
from forwardpass.config import ModelConfig
from forwardpass.errors import InvalidInput, ModelConfigError
from forwardpass.generation.detokenize import TextStream
from forwardpass.generation.sampler import Sampler, SamplingParams, token_logprob, top_logprobs
from forwardpass.generation.session import DecoderSession


@dataclass
class Generation:
    """A finished generation."""

    text: str
    tokens: list[int]
    finish_reason: str  # "stop" (a stop token or string) or "length" (max_tokens)
    prompt_tokens: int
    seconds_to_first_token: float
    seconds: float
    token_logprobs: list[Any] = field(default_factory=list)

    @property
    def completion_tokens(self) -> int:
        return len(self.tokens)

    @property
    def tokens_per_second(self) -> float:
        decode = self.seconds - self.seconds_to_first_token
        return (len(self.tokens) - 1) / decode if decode > 0 and len(self.tokens) > 1 else 0.0


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
        prefill = folder / str(version) / "prefill.onnx"
        self.session = DecoderSession(
            folder / str(version) / "model.onnx", n_layer=gen.n_layer, n_head_kv=gen.n_head_kv, head_dim=gen.head_dim,
            n_vocab=gen.n_vocab, max_context=gen.context_length, prefill_path=prefill if prefill.is_file() else None,
        )  # fmt: skip
        self._lock = threading.Lock()

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

    def generate(self, prompt: str | None = None, *, messages: Sequence[dict[str, Any]] | None = None,
                 max_tokens: int | None = None, stop: Sequence[str] = (), stream: bool = False,
                 logprobs: int = 0, **sampling: Any) -> Generation | Iterator[str]:  # fmt: skip
        """Complete ``prompt`` (raw text) or ``messages`` (through the chat template).

        Sampling keywords are SamplingParams' (temperature, top_k, top_p, min_p, penalties, seed);
        temperature 0 is greedy. With ``stream`` an iterator of text pieces, else a Generation.
        ``logprobs`` > 0 records, per generated token, its log-probability and the top ``logprobs``
        alternatives (before sampling filters, as OpenAI reports them) in ``token_logprobs``.
        """
        if not 0 <= logprobs <= 20:
            raise InvalidInput(("logprobs",), "expected 0 to 20", logprobs)
        if (prompt is None) == (messages is None):
            raise InvalidInput(("prompt",), "give either prompt or messages")
        text = prompt if prompt is not None else self.render(messages or [])
        ids = self.encode(text)
        limit = max_tokens if max_tokens is not None else self.gen.max_tokens
        if limit < 1:
            raise InvalidInput(("max_tokens",), "expected at least 1", limit)
        if len(ids) + limit > self.gen.context_length:
            raise InvalidInput(("max_tokens",), f"the prompt ({len(ids)} tokens) + max_tokens ({limit}) = "
                               f"{len(ids) + limit} is more than the context of {self.gen.context_length} tokens; "
                               "shorten the prompt or lower max_tokens")  # fmt: skip
        params = SamplingParams(**sampling)
        run = self._run(ids, limit, list(stop), params, logprobs)
        if stream:
            return (piece for piece in run if isinstance(piece, str))
        result = None
        for item in run:
            if isinstance(item, Generation):
                result = item
        assert result is not None
        return result

    def _run(self, ids: list[int], limit: int, stop: list[str], params: SamplingParams,
             logprobs: int = 0) -> Iterator[str | Generation]:  # fmt: skip
        sampler = Sampler(params)
        stop_ids = set(self.gen.stop_token_ids)
        holdback = max((len(s) for s in stop), default=0)  # text that might still become a stop string
        started = time.perf_counter()
        with self._lock:
            self.session.reset()
            logits = self.session.step(ids)
            first = time.perf_counter() - started
            out = TextStream(self.tokenizer)
            generated: list[int] = []
            recorded: list[Any] = []
            text, sent, reason = "", 0, "length"
            for _ in range(limit):
                token = sampler.pick(logits, generated)
                if token in stop_ids:
                    reason = "stop"
                    break
                if logprobs:
                    top = top_logprobs(logits, logprobs)
                    own = dict(top).get(token)
                    recorded.append({"token": token, "logprob": own if own is not None else token_logprob(logits, token),
                                     "top_logprobs": top})  # fmt: skip
                generated.append(token)
                text += out.push(token)
                cut = min((text.find(s) for s in stop if s in text), default=-1)
                if cut >= 0:
                    text, reason = text[:cut], "stop"
                    break
                if len(text) - holdback > sent:
                    yield text[sent : len(text) - holdback]
                    sent = len(text) - holdback
                if len(generated) == limit:
                    break
                logits = self.session.step([token])
            if reason == "length":
                text += out.flush()
            if len(text) > sent:
                yield text[sent:]
        yield Generation(text, generated, reason, len(ids), first, time.perf_counter() - started, recorded)

"""One generation request's state between forward passes: sampling, stop rules, text to send.

update() in generation/steps.py advances every Sequence (the scheduler's and LanguageModel.generate's:
one path). By hand, over one session:

    seq = Sequence(prompt_ids, limit=64, stop=["\\n\\n"], params=SamplingParams(seed=1), ...)
    logits = session.step(seq.prompt)
    while True:
        piece = seq.advance(logits)      # picks a token; text safe to show now ('' or more)
        if seq.finish_reason: break
        logits = session.step([seq.tokens[-1]])
    seq.result(...)                      # a Generation
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from forwardpass.generation.constraint import Constraint, apply
from forwardpass.generation.detokenize import TextStream
from forwardpass.generation.sampler import Sampler, SamplingParams, token_logprob, top_logprobs


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
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
    embedding: np.ndarray | None = None  # a pooling sequence's mean final hidden state (C,), unnormalized

    @property
    def completion_tokens(self) -> int:
        return len(self.tokens)

    @property
    def tokens_per_second(self) -> float:
        decode = self.seconds - self.seconds_to_first_token
        return (len(self.tokens) - 1) / decode if decode > 0 and len(self.tokens) > 1 else 0.0


class Sequence:
    """Prompt ids in, tokens and text out; knows when it is finished."""

    def __init__(self, prompt: list[int], *, limit: int, stop: Seq[str], params: SamplingParams, logprobs: int,
                 stop_ids: Seq[int], tokenizer: Any, constraint: Constraint | None = None,
                 logit_bias: dict[int, float] | None = None, stop_when: Callable[[str], bool] | None = None):  # fmt: skip
        self.prompt, self.limit, self.stop = prompt, limit, list(stop)
        self.stop_when = stop_when  # a rule on the text so far that ends it (tools: a call written twice)
        self._tokenizer, self._logit_bias = tokenizer, logit_bias
        self.constraint = constraint  # a grammar the output follows (generation/constraint.py)
        self.bias = (np.fromiter(logit_bias, np.int64), np.fromiter(logit_bias.values(), np.float32)) \
            if logit_bias else None  # fmt: skip
        self.sampler = Sampler(params)
        self.logprobs = logprobs
        self.stop_ids = set(stop_ids)
        self.stream = TextStream(tokenizer)
        self.holdback = max((len(s) for s in self.stop), default=0)  # text that might still become a stop string
        self.tokens: list[int] = []
        self.recorded: list[Any] = []
        self.text, self.sent = "", 0
        self.finish_reason: str | None = None
        self.started = time.perf_counter()
        self.first_token_at: float | None = None
        self.cached_tokens = 0
        self.pooling = False  # an embedding: the prompt is read, its hidden states averaged, nothing generated
        self.hidden_sum: np.ndarray | None = None

    def advance(self, logits: np.ndarray, allowed: np.ndarray | None = None) -> str:
        """Pick the next token from ``logits`` (V,), among the ``allowed`` ones when the output follows a grammar
        (its mask for this step, computed beside the forward pass); the text that can be sent now ('' if none)."""
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        if self.bias is not None:
            logits = logits.astype(np.float32, copy=True)
            logits[self.bias[0]] += self.bias[1]
        candidates = None
        if self.constraint is not None:
            mask = self.constraint.allowed() if allowed is None else allowed
            candidates = np.flatnonzero(mask[: len(logits)])
            if not len(candidates):  # the grammar allows nothing more (it cannot happen with a valid grammar)
                self.text += self.stream.flush()
                return self._finish("stop")
            if self.logprobs:  # reported from the distribution sampled: the grammar's tokens only
                logits = apply(logits, mask)
        token = self.sampler.pick(logits, self.tokens, candidates)
        if token in self.stop_ids:
            return self._finish("stop")
        if self.constraint is not None:
            self.constraint.consume(token)
        if self.logprobs:
            top = top_logprobs(logits, self.logprobs)
            own = dict(top).get(token)
            self.recorded.append({"token": token, "logprob": own if own is not None else token_logprob(logits, token),
                                  "top_logprobs": top})  # fmt: skip
        self.tokens.append(token)
        self.text += self.stream.push(token)
        cut = min((self.text.find(s) for s in self.stop if s in self.text), default=-1)
        if cut >= 0:
            self.text = self.text[:cut]
            return self._finish("stop")
        if self.constraint is not None and self.constraint.done:  # the grammar is complete: nothing may follow
            self.text += self.stream.flush()
            return self._finish("stop")
        if self.stop_when is not None and self.stop_when(self.text):
            return self._finish("stop")
        if len(self.tokens) == self.limit:
            self.text += self.stream.flush()
            return self._finish("length")
        end = len(self.text) - self.holdback
        if end > self.sent:
            piece, self.sent = self.text[self.sent : end], end
            return piece
        return ""

    def fork(self, index: int) -> Sequence:
        """Choice ``index`` of the same request (OpenAI's ``n``): the same prompt and rules, its own sampling
        (seed + index when seeded, so a request's choices repeat with its seed); taken before generating."""
        params = self.sampler.params
        seeded = dataclasses.replace(params, seed=None if params.seed is None else params.seed + index)
        constraint = None if self.constraint is None else self.constraint.copy()
        return Sequence(self.prompt, limit=self.limit, stop=self.stop, params=seeded, logprobs=self.logprobs,
                        stop_ids=list(self.stop_ids), tokenizer=self._tokenizer, constraint=constraint,
                        logit_bias=self._logit_bias, stop_when=self.stop_when)  # fmt: skip

    def _finish(self, reason: str) -> str:
        self.finish_reason = reason
        piece, self.sent = self.text[self.sent :], len(self.text)
        return piece

    def pool(self, hidden_sum: np.ndarray, last: bool) -> None:
        """A pooling sequence's prompt chunk: its hidden states' sum; after the last one it is finished."""
        self.hidden_sum = hidden_sum if self.hidden_sum is None else self.hidden_sum + hidden_sum
        if last:
            self.finish_reason = "stop"

    def result(self) -> Generation:
        now = time.perf_counter()
        first = (self.first_token_at or now) - self.started
        embedding = None if self.hidden_sum is None else self.hidden_sum / len(self.prompt)
        return Generation(self.text, self.tokens, self.finish_reason or "length", len(self.prompt), first,
                          now - self.started, self.recorded, self.cached_tokens, embedding)  # fmt: skip

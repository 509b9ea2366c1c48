"""The OpenAI-compatible API for language models: /v1/models, /v1/completions, /v1/chat/completions.

Requests go to the model's GenerationScheduler (continuous batching); ``stream: true`` answers
with server-sent events ending in ``data: [DONE]``. Errors use OpenAI's shape:
``{"error": {"message", "type", "param", "code"}}``. Parameters we do not implement are refused
by name (400), never silently ignored.
"""

from __future__ import annotations

import asyncio
import functools
import math
import time
import uuid
import weakref
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import orjson

from forwardpass.engine import Engine
from forwardpass.errors import ForwardpassError, InvalidInput, InvalidModelName, PayloadTooLarge, format_loc
from forwardpass.generation.scheduler import AsyncGeneration
from forwardpass.generation.sequence import Generation
from forwardpass.server.config import ServeConfig
from forwardpass.server.errors import log_unexpected, shown
from forwardpass.server.http import Request, Response, StreamingResponse
from forwardpass.stats import Stats

SAMPLING = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p", "seed": "seed",
            "frequency_penalty": "frequency_penalty", "presence_penalty": "presence_penalty",
            "repetition_penalty": "repetition_penalty"}  # fmt: skip
COMMON = {"model", "max_tokens", "stop", "stream", "stream_options", "n", "user", "ignore_eos", *SAMPLING}
CHAT = COMMON | {"messages", "logprobs", "top_logprobs", "max_completion_tokens"}
COMPLETION = COMMON | {"prompt", "logprobs"}
_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "invalid_request_error",
          413: "invalid_request_error", 503: "server_error"}  # fmt: skip


def openai_error(exc: BaseException, stats: Stats | None = None, model: str = "", version: str = "") -> Response:
    """Any exception as OpenAI's error object (unexpected ones are a 500 without internals, logged once per
    cause, and counted in ``stats`` under ``model`` and ``version`` when given)."""
    if not isinstance(exc, ForwardpassError):
        log_unexpected(exc)
        if stats is not None:
            stats.unexpected(model, version)
        return Response.json({"error": {"message": f"internal error: {type(exc).__name__}", "type": "server_error",
                                        "param": None, "code": None}}, 500)  # fmt: skip
    if exc.status == 500:
        log_unexpected(exc)
    param = format_loc(exc.loc) if isinstance(exc, InvalidInput) else "model" if isinstance(exc, InvalidModelName) else None
    code = {"model_not_found": "model_not_found", "invalid_api_key": "invalid_api_key"}.get(exc.type, exc.type)
    headers = []
    retry = getattr(exc, "retry_after", None)
    if retry is not None:
        headers.append((b"retry-after", str(max(1, round(retry))).encode()))
    body = {"error": {"message": exc.message, "type": _TYPES.get(exc.status, "server_error"), "param": param, "code": code}}
    return Response.json(body, exc.status, headers)


class OpenAIHandlers:
    """The three endpoints; each returns a Response or a StreamingResponse and never raises."""

    def __init__(self, engine: Engine, config: ServeConfig):
        self.engine, self.config = engine, config

    async def models(self, request: Request) -> Response:
        data = [{"id": name, "object": "model", "created": 0, "owned_by": "forwardpass"}
                for name in sorted(self.engine.generators())]  # fmt: skip
        return Response.json({"object": "list", "data": data})

    async def chat_completions(self, request: Request) -> Response | StreamingResponse:
        return await self._complete(request, chat=True)

    async def completions(self, request: Request) -> Response | StreamingResponse:
        return await self._complete(request, chat=False)

    async def _complete(self, request: Request, chat: bool) -> Response | StreamingResponse:
        label, version = "", ""  # for the count of unexpected errors: set once the model is known
        try:
            doc = await _body(request, self.config.max_body_bytes, self.engine.generators())
            unknown = sorted(set(doc) - (CHAT if chat else COMPLETION))
            if unknown:
                raise InvalidInput((unknown[0],), f"field {unknown[0][:40]!r} is not supported by this server "
                                   f"(unsupported: {', '.join(repr(k[:40]) for k in unknown[:8])})")  # fmt: skip
            model = doc.get("model")
            if not isinstance(model, str) or not model:
                raise InvalidInput(("model",), "expected a model name (GET /v1/models lists them)", shown(model))
            scheduler = self.engine.generator(model)
            llm = scheduler.model
            label, version = model, str(llm.version)
            checked = _checked(doc, chat)
            chars = _characters(checked)
            limit = _max_characters(llm)
            if chars > limit:  # before the template and the tokenizer, whose cost grows with the prompt
                field = "messages" if chat else "prompt"
                raise InvalidInput((field,), f"the prompt is {chars} characters; the context holds "
                                   f"{llm.gen.context_length} tokens, at most {limit} characters even at this "
                                   "tokenizer's longest token: shorten the prompt")  # fmt: skip
            prepare = functools.partial(llm.prepare, **checked.prepare)
            # templating and tokenizing cost ~0.8 us per character: off the event loop when not tiny
            seq = prepare() if chars <= _INLINE_CHARACTERS else await asyncio.to_thread(prepare)
            generation = AsyncGeneration(scheduler, seq)  # Overloaded (503) here when the queue is full
        except Exception as exc:
            return openai_error(exc, self.engine.stats, label, version)
        meta = {"id": ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24], "created": int(time.time()),
                "model": model}  # fmt: skip
        if checked.stream:
            return StreamingResponse(_events(generation, meta, chat, checked.include_usage))
        try:
            result = await generation.result()
        except Exception as exc:
            return openai_error(exc, self.engine.stats, label, version)
        logprobs = checked.prepare["logprobs"]
        choice: dict[str, Any] = {"index": 0, "finish_reason": result.finish_reason}
        if chat:
            choice["message"] = {"role": "assistant", "content": result.text}
            choice["logprobs"] = _chat_logprobs(llm, result) if logprobs else None
        else:
            choice["text"] = result.text
            choice["logprobs"] = _completion_logprobs(llm, result) if logprobs else None
        return Response.json({**meta, "object": "chat.completion" if chat else "text_completion", "choices": [choice],
                              "usage": _usage(result)})  # fmt: skip


@dataclass
class Checked:
    """A completion request whose fields have been checked: the keywords for LanguageModel.prepare, and how to answer."""

    prepare: dict[str, Any]
    stream: bool
    include_usage: bool


_INLINE_CHARACTERS = 500  # ~0.4 ms of tokenizing, against ~0.1 ms for a hop to a thread and back
_INT64 = 2**63 - 1
# OpenAI's documented ranges where it has them; the sampler narrows top_p, min_p and repetition_penalty further
_RANGES = {"temperature": (0, 2), "top_p": (0, 1), "min_p": (0, 1), "frequency_penalty": (-2, 2),
           "presence_penalty": (-2, 2), "repetition_penalty": (0, math.inf), "top_k": (0, _INT64),
           "seed": (0, _INT64)}  # fmt: skip


def _checked(doc: dict[str, Any], chat: bool) -> Checked:
    """Every field of a completion request checked (types and ranges) before any work; null means absent."""
    n = doc.get("n")
    if n is not None and (isinstance(n, bool) or n != 1):
        raise InvalidInput(("n",), "only n=1 is supported", shown(n))
    stream = _flag(doc, "stream")
    options = doc.get("stream_options")
    if options is not None and (not isinstance(options, dict) or set(options) - {"include_usage"}):
        raise InvalidInput(("stream_options",), 'expected {"include_usage": bool}', shown(options))
    include_usage = _flag(options or {}, "include_usage", ("stream_options", "include_usage"))
    logprobs = _logprobs(doc, chat)
    if logprobs and stream:
        raise InvalidInput(("logprobs",), "logprobs are returned for non-streaming requests only")
    sampling: dict[str, Any] = {}
    for key, name in SAMPLING.items():
        value = doc.get(key)
        if value is None:
            continue
        low, high = _RANGES[name]
        integer = name in ("seed", "top_k")
        if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
            raise InvalidInput((key,), "expected an integer" if integer else "expected a number", shown(value))
        if not low <= value <= high:
            raise InvalidInput((key,), f"expected {'an integer' if integer else 'a number'} from {low} to {high}", value)
        sampling[name] = value
    sampling["ignore_eos"] = _flag(doc, "ignore_eos")
    user = doc.get("user")
    if user is not None and not isinstance(user, str):
        raise InvalidInput(("user",), "expected a string", shown(user))
    max_tokens_key = "max_completion_tokens" if doc.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = doc.get(max_tokens_key)
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1):
        raise InvalidInput((max_tokens_key,), "expected an integer >= 1", shown(max_tokens))
    stop = doc.get("stop")
    if stop is not None and not isinstance(stop, str) and not (
            isinstance(stop, list) and len(stop) <= 4 and all(isinstance(s, str) for s in stop)):  # fmt: skip
        raise InvalidInput(("stop",), "expected a string or a list of up to 4 strings", shown(stop))
    text: dict[str, Any] = {"messages": _messages(doc.get("messages"))} if chat else {"prompt": _prompt(doc.get("prompt"))}
    return Checked({**text, "max_tokens": max_tokens, "stop": stop, "logprobs": logprobs, **sampling}, stream,
                   include_usage)  # fmt: skip


def _flag(doc: dict[str, Any], key: str, loc: tuple[str, ...] | None = None) -> bool:
    value = doc.get(key)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise InvalidInput(loc or (key,), "expected true or false", shown(value))
    return value


def _characters(request: Checked) -> int:
    """The prompt's length in characters, as sent (the template adds a few)."""
    if "prompt" in request.prepare:
        return len(request.prepare["prompt"])
    return sum(len(m["content"]) for m in request.prepare["messages"])


_longest: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()


def _longest_token(llm: Any) -> int:
    """Characters in the tokenizer's longest token: no prompt of more than context x this many characters fits.

    Byte-level BPE tokens are strings of byte symbols, one per byte, and a character takes at least one byte.
    """
    found = _longest.get(llm)
    if found is None:
        found = _longest[llm] = max(map(len, llm.tokenizer.get_vocab(with_added_tokens=True)), default=1)
    return found


async def _body(request: Request, limit: int, generators: dict[str, Any]) -> dict[str, Any]:
    """The request's JSON object. A body larger than any served model's longest prompt could need is refused
    unread: parsing 30 MB of JSON holds the event loop (and the GIL) for ~0.1 s."""
    cap = max((_max_body(g.model) for g in generators.values()), default=None)
    try:
        body = await request.read_body(limit if cap is None else min(cap, limit))
    except PayloadTooLarge:
        if cap is None or cap >= limit:
            raise
        raise PayloadTooLarge(f"the request body is over {cap} bytes, more than a prompt this server's language "
                              "models can take needs (context x longest token x 12 bytes a character as escaped "
                              "JSON, + 64 KiB): shorten the prompt") from None  # fmt: skip
    try:
        doc = orjson.loads(body) if body else None
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(("body",), f"malformed JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise InvalidInput(("body",), "expected a JSON object", shown(doc))
    return doc


def _max_characters(llm: Any) -> int:
    """The longest prompt that can fit, in characters: no more than context x the longest token's characters."""
    return llm.gen.context_length * _longest_token(llm)


def _max_body(llm: Any) -> int:
    # a character is at most 12 bytes of JSON (a surrogate pair escaped); the other fields are small
    return 12 * _max_characters(llm) + 64 * 1024


def _messages(messages: Any) -> list[dict[str, str]]:
    """OpenAI messages -> role/content strings (content parts of type text are joined)."""
    if not isinstance(messages, list) or not messages:
        raise InvalidInput(("messages",), "expected a non-empty list of {role, content}", shown(messages))
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise InvalidInput(("messages", i), "expected {role, content}", shown(m))
        role, content = m.get("role"), m.get("content")
        if role not in _ROLES:
            raise InvalidInput(("messages", i, "role"), f"expected one of {', '.join(_ROLES)}", shown(role))
        if isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise InvalidInput(("messages", i, "content", j), 'expected {"type": "text", "text": str}',
                                       shown(part))  # fmt: skip
                parts.append(part["text"])
            content = "".join(parts)
        elif content is None and role == "assistant":
            content = ""
        elif not isinstance(content, str):
            raise InvalidInput(("messages", i, "content"), "expected a string or a list of text parts", shown(content))
        out.append({"role": role, "content": content})
    return out


_ROLES = ("system", "user", "assistant", "tool")


def _prompt(prompt: Any) -> str:
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        return prompt[0]
    if not isinstance(prompt, str):
        raise InvalidInput(("prompt",), "expected a string (or a list of one string)", shown(prompt))
    return prompt


def _logprobs(doc: dict[str, Any], chat: bool) -> int:
    """How many top alternatives to report per token (0: no logprobs)."""
    if chat:
        wanted, top = doc.get("logprobs"), doc.get("top_logprobs")
        if wanted is not None and not isinstance(wanted, bool):
            raise InvalidInput(("logprobs",), "expected true or false", shown(wanted))
        if top is not None and (isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= 20):
            raise InvalidInput(("top_logprobs",), "expected an integer from 0 to 20", shown(top))
        if top and not wanted:
            raise InvalidInput(("top_logprobs",), "needs logprobs: true")
        return max(top or 0, 1) if wanted else 0
    n = doc.get("logprobs")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= 5):
        raise InvalidInput(("logprobs",), "expected an integer from 0 to 5", shown(n))
    return n or 0


def _usage(result: Generation) -> dict[str, Any]:
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": result.cached_tokens}}  # fmt: skip


def _token_text(llm: Any, token: int) -> str:
    return llm.tokenizer.decode([token], skip_special_tokens=False)


def _chat_logprobs(llm: Any, result: Generation) -> dict[str, Any]:
    def entry(token: int, logprob: float) -> dict[str, Any]:
        text = _token_text(llm, token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    return {"content": [{**entry(r["token"], r["logprob"]),
                         "top_logprobs": [entry(t, lp) for t, lp in r["top_logprobs"]]}
                        for r in result.token_logprobs]}  # fmt: skip


def _completion_logprobs(llm: Any, result: Generation) -> dict[str, Any]:
    tokens = [_token_text(llm, r["token"]) for r in result.token_logprobs]
    offsets, at = [], 0
    for text in tokens:
        offsets.append(at)
        at += len(text)
    return {"tokens": tokens, "token_logprobs": [r["logprob"] for r in result.token_logprobs],
            "top_logprobs": [{_token_text(llm, t): lp for t, lp in r["top_logprobs"]} for r in result.token_logprobs],
            "text_offset": offsets}  # fmt: skip


async def _events(
    generation: AsyncGeneration, meta: dict[str, Any], chat: bool, include_usage: bool
) -> AsyncIterator[bytes]:
    """Server-sent events: one chunk per text piece, a last chunk with finish_reason, usage, [DONE]."""
    kind = "chat.completion.chunk" if chat else "text_completion"

    def event(choices: list[dict[str, Any]], **extra: Any) -> bytes:
        return b"data: " + orjson.dumps({**meta, "object": kind, "choices": choices, **extra}) + b"\n\n"

    def choice(text: str | None, finish: str | None, first: bool = False) -> dict[str, Any]:
        if chat:
            delta: dict[str, Any] = {} if text is None else {"content": text}
            if first:
                delta["role"] = "assistant"
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}

    try:
        if chat:
            yield event([choice("", None, first=True)])
        async for item in generation:
            if isinstance(item, Generation):
                yield event([choice(None, item.finish_reason)])
                if include_usage:
                    yield event([], usage=_usage(item))
            else:
                yield event([choice(item, None)])
    except Exception as exc:  # after the headers went out, an error can only be an event
        yield b"data: " + openai_error(exc).body + b"\n\n"
    yield b"data: [DONE]\n\n"

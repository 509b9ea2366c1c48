"""The OpenAI-compatible API for language models: /v1/models, /v1/completions, /v1/chat/completions.

Requests go to the model's GenerationScheduler (continuous batching); ``stream: true`` answers
with server-sent events ending in ``data: [DONE]``. Errors use OpenAI's shape:
``{"error": {"message", "type", "param", "code"}}``. Parameters we do not implement are refused
by name (400), never silently ignored.
"""

from __future__ import annotations

import hmac
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import orjson

from forwardpass.engine import Engine
from forwardpass.errors import ForwardpassError, InvalidInput, format_loc
from forwardpass.generation.scheduler import AsyncGeneration
from forwardpass.generation.sequence import Generation
from forwardpass.server.config import ServeConfig
from forwardpass.server.http import Request, Response, StreamingResponse

SAMPLING = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p", "seed": "seed",
            "frequency_penalty": "frequency_penalty", "presence_penalty": "presence_penalty",
            "repetition_penalty": "repetition_penalty"}  # fmt: skip
COMMON = {"model", "max_tokens", "stop", "stream", "stream_options", "n", "user", "ignore_eos", *SAMPLING}
CHAT = COMMON | {"messages", "logprobs", "top_logprobs", "max_completion_tokens"}
COMPLETION = COMMON | {"prompt", "logprobs"}
_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
          413: "invalid_request_error", 503: "server_error"}  # fmt: skip


class Unauthorized(ForwardpassError):
    status = 401
    type = "invalid_api_key"


def openai_error(exc: BaseException) -> Response:
    """Any exception as OpenAI's error object (unexpected ones are a 500 without internals)."""
    if not isinstance(exc, ForwardpassError):
        from forwardpass.server.errors import error_response

        error_response(exc)  # logs it
        return Response.json({"error": {"message": f"internal error: {type(exc).__name__}", "type": "server_error",
                                        "param": None, "code": None}}, 500)  # fmt: skip
    param = format_loc(exc.loc) if isinstance(exc, InvalidInput) else None
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

    def _authorize(self, request: Request) -> None:
        key = self.config.api_key
        if not key:
            return
        given = request.header(b"authorization") or ""
        token = given[7:].strip() if given[:7].lower() == "bearer " else ""
        if not hmac.compare_digest(token.encode(), key.encode()):
            raise Unauthorized("missing or wrong API key: send 'Authorization: Bearer <key>'")

    async def models(self, request: Request) -> Response:
        try:
            self._authorize(request)
        except ForwardpassError as exc:
            return openai_error(exc)
        data = [{"id": name, "object": "model", "created": 0, "owned_by": "forwardpass"}
                for name in sorted(self.engine.generators())]  # fmt: skip
        return Response.json({"object": "list", "data": data})

    async def chat_completions(self, request: Request) -> Response | StreamingResponse:
        return await self._complete(request, chat=True)

    async def completions(self, request: Request) -> Response | StreamingResponse:
        return await self._complete(request, chat=False)

    async def _complete(self, request: Request, chat: bool) -> Response | StreamingResponse:
        try:
            self._authorize(request)
            doc = await _body(request, self.config.max_body_bytes)
            unknown = sorted(set(doc) - (CHAT if chat else COMPLETION))
            if unknown:
                raise InvalidInput((unknown[0],), f"not supported by this server (unsupported: {', '.join(unknown)})")
            model = doc.get("model")
            if not isinstance(model, str) or not model:
                raise InvalidInput(("model",), "expected a model name (GET /v1/models lists them)", model)
            scheduler = self.engine.generator(model)
            llm = scheduler.model
            if doc.get("n", 1) != 1:
                raise InvalidInput(("n",), "only n=1 is supported", doc.get("n"))
            stream = doc.get("stream", False)
            if not isinstance(stream, bool):
                raise InvalidInput(("stream",), "expected true or false", stream)
            options = doc.get("stream_options") or {}
            if not isinstance(options, dict) or set(options) - {"include_usage"}:
                raise InvalidInput(("stream_options",), 'expected {"include_usage": bool}', options)
            logprobs = _logprobs(doc, chat)
            if logprobs and stream:
                raise InvalidInput(("logprobs",), "logprobs are returned for non-streaming requests only")
            sampling = {SAMPLING[k]: doc[k] for k in SAMPLING if doc.get(k) is not None}
            for name, value in sampling.items():
                if name == "seed" or name == "top_k":
                    if isinstance(value, bool) or not isinstance(value, int):
                        raise InvalidInput((name,), "expected an integer", value)
                elif isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise InvalidInput((name,), "expected a number", value)
            max_tokens = doc.get("max_completion_tokens", doc.get("max_tokens"))
            ignore_eos = doc.get("ignore_eos", False)
            if not isinstance(ignore_eos, bool):
                raise InvalidInput(("ignore_eos",), "expected true or false", ignore_eos)
            sampling["ignore_eos"] = ignore_eos
            if chat:
                seq = llm.prepare(messages=_messages(doc.get("messages")), max_tokens=max_tokens, stop=doc.get("stop"),
                                  logprobs=logprobs, **sampling)  # fmt: skip
            else:
                seq = llm.prepare(_prompt(doc.get("prompt")), max_tokens=max_tokens, stop=doc.get("stop"),
                                  logprobs=logprobs, **sampling)  # fmt: skip
            generation = AsyncGeneration(scheduler, seq)  # Overloaded (503) here when the queue is full
        except Exception as exc:
            return openai_error(exc)
        meta = {"id": ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24], "created": int(time.time()),
                "model": model}  # fmt: skip
        if stream:
            return StreamingResponse(_events(generation, meta, chat, bool(options.get("include_usage"))))
        try:
            result = await generation.result()
        except Exception as exc:
            return openai_error(exc)
        choice: dict[str, Any] = {"index": 0, "finish_reason": result.finish_reason}
        if chat:
            choice["message"] = {"role": "assistant", "content": result.text}
            choice["logprobs"] = _chat_logprobs(llm, result) if logprobs else None
        else:
            choice["text"] = result.text
            choice["logprobs"] = _completion_logprobs(llm, result) if logprobs else None
        return Response.json({**meta, "object": "chat.completion" if chat else "text_completion", "choices": [choice],
                              "usage": _usage(result)})  # fmt: skip


async def _body(request: Request, limit: int) -> dict[str, Any]:
    body = await request.read_body(limit)
    try:
        doc = orjson.loads(body) if body else None
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(("body",), f"malformed JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise InvalidInput(("body",), "expected a JSON object", doc)
    return doc


def _messages(messages: Any) -> list[dict[str, str]]:
    """OpenAI messages -> role/content strings (content parts of type text are joined)."""
    if not isinstance(messages, list) or not messages:
        raise InvalidInput(("messages",), "expected a non-empty list of {role, content}", messages)
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise InvalidInput(("messages", i), "expected {role, content}", m)
        content = m.get("content")
        if isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise InvalidInput(("messages", i, "content", j), 'expected {"type": "text", "text": str}', part)
                parts.append(part["text"])
            content = "".join(parts)
        elif content is None and m.get("role") == "assistant":
            content = ""
        out.append({"role": m.get("role"), "content": content})
    return out


def _prompt(prompt: Any) -> str:
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        return prompt[0]
    if not isinstance(prompt, str):
        raise InvalidInput(("prompt",), "expected a string (or a list of one string)", prompt)
    return prompt


def _logprobs(doc: dict[str, Any], chat: bool) -> int:
    """How many top alternatives to report per token (0: no logprobs)."""
    if chat:
        wanted, top = doc.get("logprobs"), doc.get("top_logprobs")
        if wanted is not None and not isinstance(wanted, bool):
            raise InvalidInput(("logprobs",), "expected true or false", wanted)
        if top is not None and (isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= 20):
            raise InvalidInput(("top_logprobs",), "expected an integer from 0 to 20", top)
        if top and not wanted:
            raise InvalidInput(("top_logprobs",), "needs logprobs: true")
        return max(top or 0, 1) if wanted else 0
    n = doc.get("logprobs")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= 5):
        raise InvalidInput(("logprobs",), "expected an integer from 0 to 5", n)
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
                         "top_logprobs": [entry(t, lp) for t, lp in r["top_logprobs"]]} for r in result.token_logprobs]}  # fmt: skip


def _completion_logprobs(llm: Any, result: Generation) -> dict[str, Any]:
    tokens = [_token_text(llm, r["token"]) for r in result.token_logprobs]
    offsets, at = [], 0
    for text in tokens:
        offsets.append(at)
        at += len(text)
    return {"tokens": tokens, "token_logprobs": [r["logprob"] for r in result.token_logprobs],
            "top_logprobs": [{_token_text(llm, t): lp for t, lp in r["top_logprobs"]} for r in result.token_logprobs],
            "text_offset": offsets}  # fmt: skip


async def _events(generation: AsyncGeneration, meta: dict[str, Any], chat: bool, include_usage: bool) -> AsyncIterator[bytes]:
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

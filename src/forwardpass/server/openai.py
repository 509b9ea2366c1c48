"""The OpenAI-compatible API for language models: /v1/models, /v1/completions, /v1/chat/completions.

Requests are checked by engine/requests.py and run by Engine.prepare_generation/generate (the model's
continuous-batching scheduler); this module is the OpenAI wire format only. ``stream: true`` answers
with server-sent events ending in ``data: [DONE]``. Errors use OpenAI's shape:
``{"error": {"message", "type", "param", "code"}}``. Parameters we do not implement are refused
by name (400), never silently ignored.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import orjson

from forwardpass.engine import Engine
from forwardpass.engine.requests import max_body, parse_generation, refuse_unknown
from forwardpass.errors import InvalidInput, PayloadTooLarge
from forwardpass.generation.scheduler import AsyncGeneration
from forwardpass.generation.sequence import Generation
from forwardpass.generation.tools import CallStream, split_calls
from forwardpass.server.config import ServeConfig
from forwardpass.server.errors import openai_error, shown
from forwardpass.server.http import Request, Response, StreamingResponse
from forwardpass.server.openai_extras import OpenAIExtras


class OpenAIHandlers:
    """The three endpoints; each returns a Response or a StreamingResponse and never raises."""

    def __init__(self, engine: Engine, config: ServeConfig):
        self.engine, self.config = engine, config

    async def models(self, request: Request) -> Response:
        data = [{"id": name, "object": "model", "created": 0, "owned_by": "forwardpass"}
                for name in OpenAIExtras(self.engine, self.config).model_ids()]  # language and embedding models
        return Response.json({"object": "list", "data": data})

    async def chat_completions(self, request: Request) -> Response | StreamingResponse:
        return await self._complete(request, chat=True)

    async def completions(self, request: Request) -> Response | StreamingResponse:
        return await self._complete(request, chat=False)

    async def _complete(self, request: Request, chat: bool) -> Response | StreamingResponse:
        label, version = "", ""  # for the count of unexpected errors: set once the model is known
        try:
            doc = await _body(request, self.config.max_body_bytes, self.engine.generators())
            refuse_unknown(doc, chat)
            model = doc.get("model")
            if not isinstance(model, str) or not model:
                raise InvalidInput(("model",), "expected a model name (GET /v1/models lists them)", shown(model))
            self.engine.generator(model)  # an unknown model is a 404 before the fields are checked
            checked = parse_generation(doc, chat)
            llm, seq = await self.engine.prepare_generation(model, checked)
            label, version = model, str(llm.version)
            generation = self.engine.generate(model, seq)  # Overloaded (503) here when the queue is full
        except Exception as exc:
            return openai_error(exc, self.engine.stats, label, version)
        meta = {"id": ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24], "created": int(time.time()),
                "model": model}  # fmt: skip
        if checked.stream:
            return StreamingResponse(_events(generation, meta, chat, checked.include_usage, checked.tools is not None))
        try:
            result = await generation.result()
        except Exception as exc:
            return openai_error(exc, self.engine.stats, label, version)
        logprobs = checked.prepare["logprobs"]
        choice: dict[str, Any] = {"index": 0, "finish_reason": result.finish_reason}
        if chat:
            choice["message"] = {"role": "assistant", "content": result.text}
            if checked.tools is not None:
                content, calls = split_calls(result.text)
                if calls:
                    choice["message"] = {"role": "assistant", "content": content, "tool_calls": calls}
                    choice["finish_reason"] = "tool_calls" if result.finish_reason == "stop" else result.finish_reason
            choice["logprobs"] = _chat_logprobs(llm, result) if logprobs else None
        else:
            choice["text"] = result.text
            choice["logprobs"] = _completion_logprobs(llm, result) if logprobs else None
        return Response.json({**meta, "object": "chat.completion" if chat else "text_completion", "choices": [choice],
                              "usage": _usage(result)})  # fmt: skip


async def _body(request: Request, limit: int, generators: dict[str, Any]) -> dict[str, Any]:
    """The request's JSON object. A body larger than any served model's longest prompt could need is refused
    unread: parsing 30 MB of JSON holds the event loop (and the GIL) for ~0.1 s."""
    cap = max((max_body(g.model) for g in generators.values()), default=None)
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
    generation: AsyncGeneration, meta: dict[str, Any], chat: bool, include_usage: bool, tools: bool = False
) -> AsyncIterator[bytes]:
    """Server-sent events: one chunk per text piece, a last chunk with finish_reason, usage, [DONE]. With tools,
    each call goes out as OpenAI's tool_calls deltas (its id and name, then its arguments) once it closes."""
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

    def call_deltas(index: int, call: dict[str, Any]) -> list[bytes]:
        head = {"index": index, "id": call["id"], "type": "function",
                "function": {"name": call["function"]["name"], "arguments": ""}}  # fmt: skip
        arguments = {"index": index, "function": {"arguments": call["function"]["arguments"]}}
        return [event([{"index": 0, "delta": {"tool_calls": [d]}, "logprobs": None, "finish_reason": None}])
                for d in (head, arguments)]  # fmt: skip

    calls = CallStream() if tools else None
    try:
        if chat:
            yield event([choice("", None, first=True)])
        async for item in generation:
            if isinstance(item, Generation):
                finish = item.finish_reason
                if calls is not None and calls.calls and finish == "stop":
                    finish = "tool_calls"
                yield event([choice(None, finish)])
                if include_usage:
                    yield event([], usage=_usage(item))
            elif calls is not None:
                for sent in calls.push(item):
                    if sent[0] == "content":
                        yield event([choice(sent[1], None)])
                    else:
                        for chunk in call_deltas(sent[1], sent[2]):
                            yield chunk
            else:
                yield event([choice(item, None)])
    except Exception as exc:  # after the headers went out, an error can only be an event
        yield b"data: " + openai_error(exc).body + b"\n\n"
    yield b"data: [DONE]\n\n"

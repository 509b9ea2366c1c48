"""The OpenAI-compatible API for language models: /v1/models, /v1/completions, /v1/chat/completions.

Requests are checked by engine/requests.py and run by Engine.prepare_generation/generate (the model's
continuous-batching scheduler); this module is the OpenAI wire format only. ``stream: true`` answers
with server-sent events ending in ``data: [DONE]``. Errors use OpenAI's shape:
``{"error": {"message", "type", "param", "code"}}``. Parameters we do not implement are refused
by name (400), never silently ignored.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import orjson

from forwardpass.engine import Engine
from forwardpass.engine.requests import GenerationRequest, max_body, parse_generation, refuse_unknown
from forwardpass.errors import InvalidInput, PayloadTooLarge
from forwardpass.generation.scheduler import AsyncGeneration
from forwardpass.generation.sequence import Generation
from forwardpass.generation.tools import CallStream, split_calls
from forwardpass.server.config import ServeConfig
from forwardpass.server.errors import openai_error, shown
from forwardpass.server.http import Finally, Request, Response, StreamingResponse, json_object
from forwardpass.server.openai_extras import OpenAIExtras
from forwardpass.server.tenancy import Tenancy

requests_log = logging.getLogger("forwardpass.requests")


class OpenAIHandlers:
    """The three endpoints; each returns a Response or a StreamingResponse and never raises."""

    def __init__(self, engine: Engine, config: ServeConfig, tenancy: Tenancy | None = None):
        self.engine, self.config = engine, config
        self.tenancy = tenancy or Tenancy.none()

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
            doc = await read_json(request, self.config.max_body_bytes, self.engine.generators())
            refuse_unknown(doc, chat)
            model = doc.get("model")
            if not isinstance(model, str) or not model:
                raise InvalidInput(("model",), "expected a model name (GET /v1/models lists them)", shown(model))
            self.tenancy.model(request, model)
            self.engine.generator(model)  # an unknown model is a 404 before the fields are checked
            checked = parse_generation(doc, chat)
            llm, seq = await self.engine.prepare_generation(model, checked)
            label, version = model, str(llm.version)
            # the tokens it may use are reserved (429 past the tier's rate), and settled when it ends
            self.tenancy.generation(request, model, seq, checked.n, checked.prepare["max_tokens"] is not None)
            if checked.stream:
                self.tenancy.stream(request)  # 429 past the tier's concurrent streams
            generations = self._submit(request, model, seq, checked.n)  # Overloaded (503) when the queue is full
        except Exception as exc:
            return openai_error(exc, self.engine.stats, label, version)
        meta = {"id": ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24], "created": int(time.time()),
                "model": model}  # fmt: skip
        if checked.stream:
            events = _events(generations, meta, chat, checked.include_usage, checked.tools is not None,
                             lambda results: log_request(meta, checked, results))  # fmt: skip
            # never read (the client left before the head went out): the generations stop, their slots free
            def stop() -> None:
                for g in generations:
                    g.cancel()

            return StreamingResponse(Finally(events, stop))
        try:
            results = await asyncio.gather(*(g.result() for g in generations))
        except Exception as exc:
            for g in generations:
                g.cancel()
            return openai_error(exc, self.engine.stats, label, version)
        log_request(meta, checked, results)
        logprobs = checked.prepare["logprobs"]
        choices = []
        for index, result in enumerate(results):
            choice: dict[str, Any] = {"index": index, "finish_reason": result.finish_reason}
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
            choices.append(choice)
        return Response.json({**meta, "object": "chat.completion" if chat else "text_completion", "choices": choices,
                              "usage": _usage(*results)})  # fmt: skip

    def _submit(self, request: Request, model: str, seq: Any, n: int) -> list[AsyncGeneration]:
        """The request's ``n`` choices in the scheduler: the first reads the prompt, the others copy its KV."""
        forks = [seq.fork(index) for index in range(1, n)]  # before the first starts: its grammar state moves
        first = self.engine.generate(model, seq)
        generations = [first]
        try:
            for fork in forks:
                generations.append(self.engine.generate(model, fork, parent=first))
        except Exception:
            for g in generations:
                g.cancel()
            raise
        self.tenancy.sequences(request, [seq, *forks])  # their tokens are charged when the request ends
        return generations


async def read_json(request: Request, limit: int, generators: dict[str, Any]) -> dict[str, Any]:
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
    return json_object(body)


def log_request(meta: dict[str, Any], checked: GenerationRequest, results: Sequence[Generation]) -> None:
    """One line per answered generation request on ``forwardpass.requests``, with the caller's ``user`` and
    ``metadata`` (kept, as OpenAI keeps them, for whoever reads the log; metering is issue 19's)."""
    if not requests_log.isEnabledFor(logging.INFO):
        return
    usage = _usage(*results)
    requests_log.info("%s", orjson.dumps({
        "id": meta["id"], "model": meta["model"], "user": checked.user, "metadata": checked.metadata,
        "choices": len(results), "prompt_tokens": usage["prompt_tokens"], "completion_tokens": usage["completion_tokens"],
        "finish_reasons": [r.finish_reason for r in results], "seconds": round(max(r.seconds for r in results), 4),
    }).decode())  # fmt: skip


def _usage(*results: Generation) -> dict[str, Any]:
    """One request's usage: its prompt once, every choice's completion tokens."""
    prompt, completion = results[0].prompt_tokens, sum(r.completion_tokens for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": results[0].cached_tokens}}  # fmt: skip


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


async def _events(generations: list[AsyncGeneration], meta: dict[str, Any], chat: bool, include_usage: bool,
                  tools: bool = False, done: Callable[[list[Generation]], None] | None = None,
                  ) -> AsyncIterator[bytes]:  # fmt: skip
    """Server-sent events: one chunk per text piece of a choice, a chunk with each choice's finish_reason, usage,
    [DONE]. With tools, each call goes out as OpenAI's tool_calls deltas (its id and name, then its arguments)
    once it closes."""
    kind = "chat.completion.chunk" if chat else "text_completion"

    def event(choices: list[dict[str, Any]], **extra: Any) -> bytes:
        return b"data: " + orjson.dumps({**meta, "object": kind, "choices": choices, **extra}) + b"\n\n"

    def choice(index: int, text: str | None, finish: str | None, first: bool = False) -> dict[str, Any]:
        if chat:
            delta: dict[str, Any] = {} if text is None else {"content": text}
            if first:
                delta["role"] = "assistant"
            return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
        return {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}

    def call_deltas(index: int, k: int, call: dict[str, Any]) -> list[bytes]:
        head = {"index": k, "id": call["id"], "type": "function",
                "function": {"name": call["function"]["name"], "arguments": ""}}  # fmt: skip
        arguments = {"index": k, "function": {"arguments": call["function"]["arguments"]}}
        return [event([{"index": index, "delta": {"tool_calls": [d]}, "logprobs": None, "finish_reason": None}])
                for d in (head, arguments)]  # fmt: skip

    calls = [CallStream() if tools else None for _ in generations]
    results: list[Generation] = []
    try:
        if chat:
            for index in range(len(generations)):
                yield event([choice(index, "", None, first=True)])
        async for index, item in _merged(generations):
            stream = calls[index]
            if isinstance(item, Generation):
                results.append(item)
                finish = item.finish_reason
                if stream is not None and stream.calls and finish == "stop":
                    finish = "tool_calls"
                yield event([choice(index, None, finish)])
            elif stream is not None:
                for sent in stream.push(item):
                    if sent[0] == "content":
                        yield event([choice(index, sent[1], None)])
                    else:
                        for chunk in call_deltas(index, sent[1], sent[2]):
                            yield chunk
            else:
                yield event([choice(index, item, None)])
        if done is not None:
            done(results)
        if include_usage:
            yield event([], usage=_usage(*results))
    except Exception as exc:  # after the headers went out, an error can only be an event
        yield b"data: " + openai_error(exc).body + b"\n\n"
    yield b"data: [DONE]\n\n"


async def _merged(generations: list[AsyncGeneration]) -> AsyncIterator[tuple[int, Any]]:
    """(choice index, item) from every generation as they come; leaving early cancels them all."""
    if len(generations) == 1:
        async for item in generations[0]:
            yield 0, item
        return
    queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()

    async def pump(index: int, generation: AsyncGeneration) -> None:
        try:
            async for item in generation:
                queue.put_nowait((index, item))
        except Exception as exc:
            queue.put_nowait((index, exc))

    tasks = [asyncio.create_task(pump(i, g)) for i, g in enumerate(generations)]
    try:
        for _ in range(len(generations)):
            while True:
                index, item = await queue.get()
                if isinstance(item, Exception):
                    raise item
                yield index, item
                if isinstance(item, Generation):
                    break
    finally:
        for task in tasks:
            task.cancel()

"""OpenAI's Responses API: ``POST /v1/responses`` (whole or streamed) and ``GET /v1/responses/{id}``.

    client.responses.create(model="smollm2", instructions="Be brief.", input="Hi", max_output_tokens=32)
    client.responses.create(..., stream=True)          # response.created ... response.output_text.delta ... completed
    client.responses.parse(..., text_format=Person)    # text.format json_schema: the output always parses
    client.responses.create(..., previous_response_id=first.id, input=[{"type": "function_call_output", ...}])

A request is translated into a chat completions request and goes the chat path's way: checked by
engine/requests.py ``parse_generation``, run by ``Engine.prepare_generation`` / ``Engine.generate``, with tool
calls read by generation/tools.py. ``input`` is a string or a list of items: messages (roles user, assistant,
system, developer; content a string or input_text/output_text parts), ``function_call`` and
``function_call_output`` (matched by ``call_id``). ``instructions`` is a system message first, for this turn only
(not carried to the next, as OpenAI does). ``text.format`` is ``response_format``; the flat function tools are
chat's ``tools``. A response is stored unless ``store: false`` (server/response_store.py: bounded, in memory,
nothing survives a restart); ``previous_response_id`` continues a stored conversation. An answer cut by
``max_output_tokens`` (or the context) is ``status: incomplete`` with reason ``max_output_tokens``; streamed,
it ends with ``response.incomplete`` instead of ``response.completed``.

Errors are OpenAI's shape with ``param`` in this API's names (``max_output_tokens``, ``text.format.schema``,
``input[2].call_id``); fields this server does not implement are refused by name, null means absent.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import orjson

from forwardpass.engine import Engine
from forwardpass.engine.requests import parse_generation
from forwardpass.errors import InvalidInput, ResponseNotFound, shown
from forwardpass.generation.scheduler import AsyncGeneration
from forwardpass.generation.sequence import Generation
from forwardpass.generation.tools import CallStream, split_calls
from forwardpass.server.config import ServeConfig
from forwardpass.server.errors import openai_error
from forwardpass.server.http import Finally, Request, Response, StreamingResponse
from forwardpass.server.openai import log_request, read_json  # the chat path's body reader, its request log
from forwardpass.server.response_store import ResponseStore, StoredResponse
from forwardpass.server.tenancy import Tenancy

Loc = tuple[str | int, ...]
# taken and applied (translated to chat's fields), or accepted as bookkeeping that changes no answer
FIELDS = {"model", "input", "instructions", "max_output_tokens", "temperature", "top_p", "tools", "tool_choice",
          "parallel_tool_calls", "text", "metadata", "user", "store", "previous_response_id", "stream",
          "stream_options", "service_tier", "safety_identifier", "prompt_cache_key", "truncation", "include",
          "background"}  # fmt: skip
ROLES = ("user", "assistant", "system", "developer")


class ResponsesHandlers:
    """POST /v1/responses and GET /v1/responses/{response_id}; each returns a response and never raises."""

    def __init__(self, engine: Engine, config: ServeConfig, tenancy: Tenancy | None = None,
                 store: ResponseStore | None = None):  # fmt: skip
        self.engine, self.config = engine, config
        self.tenancy = tenancy or Tenancy.none()
        self.store = store if store is not None else ResponseStore()

    async def create(self, request: Request) -> Response | StreamingResponse:
        label, version, origins = "", "", []
        try:
            doc = await read_json(request, self.config.max_body_bytes, self.engine.generators())
            refuse_unknown(doc)
            model = doc.get("model")
            if not isinstance(model, str) or not model:
                raise InvalidInput(("model",), "expected a model name (GET /v1/models lists them)", shown(model))
            self.tenancy.model(request, model)
            self.engine.generator(model)  # an unknown model is a 404 before the fields are checked
            turn = translate(doc, self.store)
            origins = turn.origins
            checked = parse_generation(turn.chat, chat=True)
            llm, seq = await self.engine.prepare_generation(model, checked)
            label, version = model, str(llm.version)
            self.tenancy.generation(request, model, seq, 1, checked.prepare["max_tokens"] is not None)
            if checked.stream:
                self.tenancy.stream(request)
            generation = self.engine.generate(model, seq)  # Overloaded (503) here when the queue is full
            self.tenancy.sequences(request, [seq])
        except Exception as exc:
            return openai_error(in_responses_terms(exc, origins), self.engine.stats, label, version)
        answer = _Answer(turn, model, checked.tools is not None)

        def keep(final: tuple[dict[str, Any], list[dict[str, Any]], bool], result: Generation) -> dict[str, Any]:
            response = self._keep(final)
            log_request({"id": response["id"], "model": model}, checked, [result])  # the request log, as chats
            return response

        if checked.stream:
            return StreamingResponse(Finally(_events(generation, answer, keep), generation.cancel))
        try:
            result = await generation.result()
        except Exception as exc:
            return openai_error(exc, self.engine.stats, label, version)
        content, calls = split_calls(result.text) if answer.tools else (result.text, [])
        items = ([answer.message(content, result.finish_reason)] if content is not None else []) \
            + [answer.function_call(call) for call in calls]  # fmt: skip
        return Response.json(keep(answer.final(items, result), result))

    async def retrieve(self, request: Request, response_id: str) -> Response:
        """A stored response as it was answered; 404 when it never was (``store: false``) or was evicted."""
        entry = self.store.get(response_id)
        if entry is None:
            why = (f"no stored response {response_id[:80]!r}: it was sent with store false, was evicted from this "
                   f"server's in-memory store (it keeps the last {self.store.max_responses}), or the server "
                   "restarted")  # fmt: skip
            return openai_error(ResponseNotFound(why))
        return Response.json(entry.response)

    def _keep(self, final: tuple[dict[str, Any], list[dict[str, Any]], bool]) -> dict[str, Any]:
        response, conversation, store = final
        if store:
            self.store.put(StoredResponse(response, conversation))
        return response


def refuse_unknown(doc: dict[str, Any]) -> None:
    """InvalidInput naming the first field this server does not implement (a field sent as null is absent)."""
    unknown = sorted(k for k, v in doc.items() if v is not None and k not in FIELDS)
    if unknown:
        raise InvalidInput((unknown[0],), f"field {unknown[0][:40]!r} is not supported by this server "
                           f"(unsupported: {', '.join(repr(k[:40]) for k in unknown[:8])})")  # fmt: skip
    for key, allowed in (("truncation", ("disabled",)), ("background", (False,))):
        if doc.get(key) is not None and doc[key] not in allowed:
            raise InvalidInput((key,), f"only {allowed[0]!r} is supported (a prompt over the context is a 400; "
                               "answers are given while the request waits)", shown(doc[key]))  # fmt: skip
    if doc.get("include") not in (None, []):
        raise InvalidInput(("include",), "no extra output is available to include on this server", shown(doc["include"]))
    options = doc.get("stream_options")
    if options is not None and (not isinstance(options, dict) or set(options) - {"include_obfuscation"}):
        raise InvalidInput(("stream_options",), 'expected {"include_obfuscation": bool}', shown(options))
    for key in ("safety_identifier", "prompt_cache_key"):  # bookkeeping: the prefix cache needs no key
        if doc.get(key) is not None and not isinstance(doc[key], str):
            raise InvalidInput((key,), "expected a string", shown(doc[key]))


@dataclass
class Turn:
    """A Responses request as a chat completions request, with what the answer echoes and what gets stored."""

    chat: dict[str, Any]  # the chat completions request document
    conversation: list[dict[str, Any]]  # chat messages before the answer, without this turn's instructions
    origins: list[Loc]  # for each of chat's messages, the field of this request it came from
    echo: dict[str, Any] = field(default_factory=dict)  # the request's fields as the response object shows them


def translate(doc: dict[str, Any], store: ResponseStore) -> Turn:
    """The chat completions request for a Responses request (InvalidInput names this API's fields)."""
    previous = doc.get("previous_response_id")
    history: list[dict[str, Any]] = []
    if previous is not None:
        entry = store.get(previous) if isinstance(previous, str) else None
        if entry is None:
            raise InvalidInput(("previous_response_id",), "no stored response has this id (responses sent with "
                               "store false are not kept; the store is in memory: a restart forgets them)",
                               shown(previous))  # fmt: skip
        history = list(entry.messages)
    instructions = doc.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise InvalidInput(("instructions",), "expected a string", shown(instructions))
    messages, origins = _input(doc.get("input"), history)
    conversation = [*history, *messages]
    system = [{"role": "system", "content": instructions}] if instructions else []
    origins = [("instructions",)] * len(system) + [("previous_response_id",)] * len(history) + origins
    chat: dict[str, Any] = {"model": doc["model"], "messages": [*system, *conversation], "stream": doc.get("stream")}
    for ours, theirs in (("max_output_tokens", "max_completion_tokens"), ("temperature", "temperature"),
                         ("top_p", "top_p"), ("parallel_tool_calls", "parallel_tool_calls"), ("metadata", "metadata"),
                         ("user", "user"), ("store", "store"), ("service_tier", "service_tier")):  # fmt: skip
        chat[theirs] = doc.get(ours)
    chat["tools"] = _tools(doc.get("tools"))
    chat["tool_choice"] = _tool_choice(doc.get("tool_choice"))
    text_format = _text_format(doc.get("text"))
    chat["response_format"] = _response_format(text_format)
    echo = {"instructions": instructions, "max_output_tokens": doc.get("max_output_tokens"),
            "metadata": doc.get("metadata") or {}, "parallel_tool_calls": doc.get("parallel_tool_calls") is not False,
            "previous_response_id": previous, "temperature": _or(doc.get("temperature"), 1.0),
            "top_p": _or(doc.get("top_p"), 1.0),
            "text": {"format": text_format or {"type": "text"}}, "tool_choice": doc.get("tool_choice") or "auto",
            "tools": doc.get("tools") or [], "truncation": "disabled", "user": doc.get("user"),
            "store": doc.get("store") is not False, "background": False,
            "service_tier": doc.get("service_tier") or "default"}  # fmt: skip
    return Turn({k: v for k, v in chat.items() if v is not None}, conversation, origins, echo)


def _or(value: Any, default: Any) -> Any:
    return default if value is None else value


def _input(value: Any, history: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[Loc]]:
    """``input`` as chat messages, with the field each came from; consecutive function calls are one assistant
    message (parallel calls), and each function_call_output must answer a call made before it."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}], [("input",)]
    if not isinstance(value, list) or not value:
        raise InvalidInput(("input",), "expected a string or a non-empty list of items (messages, function_call, "
                           "function_call_output)", shown(value))  # fmt: skip
    calls = {c["id"] for m in history for c in m.get("tool_calls", ())}
    messages: list[dict[str, Any]] = []
    origins: list[Loc] = []
    for i, item in enumerate(value):
        loc: Loc = ("input", i)
        if not isinstance(item, dict):
            raise InvalidInput(loc, "expected an item: {role, content}, function_call or function_call_output",
                               shown(item))  # fmt: skip
        kind = item.get("type") or ("message" if "role" in item else None)
        if kind == "message":
            messages.append(_message(item, loc))
        elif kind == "function_call":
            call = _function_call(item, loc)
            calls.add(call["id"])
            if messages and messages[-1]["role"] == "assistant" and origins[-1][:1] == ("input",):
                messages[-1].setdefault("tool_calls", []).append(call)  # parallel calls: one assistant turn
                continue
            messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind == "function_call_output":
            messages.append(_function_call_output(item, loc, calls))
        else:
            raise InvalidInput((*loc, "type"), "expected message, function_call or function_call_output (this "
                               "server keeps no other item kinds)", shown(item.get("type")))  # fmt: skip
        origins.append(loc)
    return messages, origins


def _string(item: dict[str, Any], key: str, loc: Loc) -> str:
    value = item.get(key)
    if not isinstance(value, str) or not value:
        raise InvalidInput((*loc, key), "expected a non-empty string", shown(value))
    return value


def _message(item: dict[str, Any], loc: Loc) -> dict[str, Any]:
    role, content = item.get("role"), item.get("content")
    if role not in ROLES:
        raise InvalidInput((*loc, "role"), f"expected one of {', '.join(ROLES)}", shown(role))
    return {"role": role, "content": _text(content, (*loc, "content"))}


def _text(content: Any, loc: Loc) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InvalidInput(loc, "expected a string or a list of input_text / output_text parts", shown(content))
    parts = []
    for j, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") not in ("input_text", "output_text"):
            kind = part.get("type") if isinstance(part, dict) else part
            raise InvalidInput((*loc, j, "type"), "expected input_text or output_text (this server reads text "
                               "only: no images, files or audio)", shown(kind))  # fmt: skip
        if not isinstance(part.get("text"), str):
            raise InvalidInput((*loc, j, "text"), "expected a string", shown(part.get("text")))
        parts.append(part["text"])
    return "".join(parts)


def _function_call(item: dict[str, Any], loc: Loc) -> dict[str, Any]:
    call_id, name, arguments = _string(item, "call_id", loc), _string(item, "name", loc), item.get("arguments")
    try:
        parsed = json.loads(arguments) if isinstance(arguments, str) else None
    except ValueError:
        parsed = None
    if not isinstance(parsed, dict):
        raise InvalidInput((*loc, "arguments"), "expected a JSON object as a string", shown(arguments))
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def _function_call_output(item: dict[str, Any], loc: Loc, calls: set[str]) -> dict[str, Any]:
    call_id = _string(item, "call_id", loc)
    if call_id not in calls:
        raise InvalidInput((*loc, "call_id"), "no function_call with this call_id comes before it (in this input "
                           "or the previous_response_id's conversation)", call_id[:80])  # fmt: skip
    return {"role": "tool", "tool_call_id": call_id, "content": _text(item.get("output"), (*loc, "output"))}


def _tools(tools: Any) -> list[dict[str, Any]] | None:
    """The flat function tools ({type, name, description, parameters, strict}) in chat's shape."""
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise InvalidInput(("tools",), "expected a list of {type: function, name, parameters}", shown(tools))
    out = []
    for i, tool in enumerate(tools):
        kind = tool.get("type") if isinstance(tool, dict) else tool
        if kind != "function":
            raise InvalidInput(("tools", i, "type"), "expected function (OpenAI's built-in tools, such as web_search "
                               "and file_search, are not served here)", shown(kind))  # fmt: skip
        extra = sorted(k for k, v in tool.items() if v is not None and k not in ("type", "name", "description",
                                                                                  "parameters", "strict"))  # fmt: skip
        if extra:
            raise InvalidInput(("tools", i, extra[0]), "is not supported by this server", shown(tool[extra[0]]))
        out.append({"type": "function", "function": {k: v for k, v in tool.items() if k != "type" and v is not None}})
    return out


def _tool_choice(choice: Any) -> Any:
    if choice is None or isinstance(choice, str):
        return choice  # none, auto, required: chat's own, checked there
    if isinstance(choice, dict) and choice.get("type") == "function":
        return {"type": "function", "function": {"name": choice.get("name")}}
    raise InvalidInput(("tool_choice",), 'expected "none", "auto", "required" or {"type": "function", "name": ...}',
                       shown(choice))  # fmt: skip


def _text_format(text: Any) -> dict[str, Any] | None:
    if text is None:
        return None
    if not isinstance(text, dict):
        raise InvalidInput(("text",), "expected {format: {type: text | json_object | json_schema, ...}}", shown(text))
    for key, value in text.items():
        if key not in ("format", "verbosity") or (key == "verbosity" and value not in (None, "medium")):
            raise InvalidInput(("text", key), "is not supported by this server", shown(value))
    fmt = text.get("format")
    if fmt is not None and not isinstance(fmt, dict):
        raise InvalidInput(("text", "format"), "expected {type: text | json_object | json_schema, ...}", shown(fmt))
    allowed: tuple[str, ...] = ("type", "name", "schema", "strict", "description") \
        if fmt and fmt.get("type") == "json_schema" else ("type",)  # fmt: skip
    for key, value in (fmt or {}).items():
        if key not in allowed and value is not None:
            raise InvalidInput(("text", "format", key), "is not a field of this format", shown(value))
    return fmt


def _response_format(fmt: dict[str, Any] | None) -> dict[str, Any] | None:
    if fmt is None or fmt.get("type") != "json_schema":
        return fmt  # text, json_object: chat's own; anything else is refused there, by type
    spec = {k: fmt.get(k) for k in ("name", "schema", "strict", "description") if fmt.get(k) is not None}
    return {"type": "json_schema", "json_schema": spec}


def in_responses_terms(exc: BaseException, origins: list[Loc]) -> BaseException:
    """An InvalidInput about the translated chat request, its loc named as in the Responses request."""
    if not isinstance(exc, InvalidInput) or not exc.loc:
        return exc
    head, rest = exc.loc[0], exc.loc[1:]
    if head == "messages":
        at = rest[0] if rest and isinstance(rest[0], int) and rest[0] < len(origins) else None
        loc: Loc = ("input",) if at is None else origins[at]
    elif head == "response_format":
        loc = ("text", "format", *(p for p in rest if p != "json_schema"))
    elif head in ("tools", "tool_choice"):
        loc = (head, *(p for p in rest if p != "function"))
    elif head == "max_completion_tokens":
        loc = ("max_output_tokens", *rest)
    else:
        return exc
    if exc.input is InvalidInput._MISSING:
        return InvalidInput(loc, exc.msg)
    return InvalidInput(loc, exc.msg, exc.input)


class _Answer:
    """The response object around a turn's output items: ids, status, usage, and the conversation to store."""

    def __init__(self, turn: Turn, model: str, tools: bool):
        self.turn, self.model, self.tools = turn, model, tools
        self.id, self.created = f"resp_{uuid.uuid4().hex}", int(time.time())

    def response(self, status: str, output: list[dict[str, Any]], usage: dict[str, Any] | None = None,
                 incomplete: bool = False) -> dict[str, Any]:  # fmt: skip
        return {"id": self.id, "object": "response", "created_at": self.created, "status": status, "error": None,
                "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None, "model": self.model,
                "output": output, **self.turn.echo, "reasoning": {"effort": None, "summary": None},
                "usage": usage}  # fmt: skip

    @staticmethod
    def message(text: str, finish: str, item_id: str | None = None) -> dict[str, Any]:
        return {"id": item_id or f"msg_{uuid.uuid4().hex}", "type": "message", "role": "assistant",
                "status": "incomplete" if finish == "length" else "completed",
                "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]}  # fmt: skip

    @staticmethod
    def function_call(call: dict[str, Any], status: str = "completed") -> dict[str, Any]:
        return {"id": f"fc_{uuid.uuid4().hex}", "type": "function_call", "status": status, "call_id": call["id"],
                "name": call["function"]["name"], "arguments": call["function"]["arguments"]}  # fmt: skip

    def final(self, items: list[dict[str, Any]], result: Generation) -> tuple[dict[str, Any], list[dict[str, Any]], bool]:
        """(the response, the conversation it ends, whether to store it)."""
        usage = {"input_tokens": result.prompt_tokens, "input_tokens_details": {"cached_tokens": result.cached_tokens},
                 "output_tokens": result.completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
                 "total_tokens": result.prompt_tokens + result.completion_tokens}  # fmt: skip
        incomplete = result.finish_reason == "length"
        response = self.response("incomplete" if incomplete else "completed", items, usage, incomplete)
        text = "".join(part["text"] for item in items if item["type"] == "message" for part in item["content"])
        said: dict[str, Any] = {"role": "assistant", "content": text}
        calls = [{"id": i["call_id"], "type": "function", "function": {"name": i["name"], "arguments": i["arguments"]}}
                 for i in items if i["type"] == "function_call"]  # fmt: skip
        if calls:
            said["tool_calls"] = calls
        return response, [*self.turn.conversation, said], bool(self.turn.echo["store"])


async def _events(generation: AsyncGeneration, answer: _Answer, keep: Any) -> AsyncIterator[bytes]:
    """The Responses API's server-sent events: created, in_progress, then per output item its added, content or
    argument deltas and done events, then completed (incomplete when cut by max_output_tokens)."""
    number = 0

    def event(kind: str, **fields: Any) -> bytes:
        nonlocal number
        data = {"type": kind, "sequence_number": number, **fields}
        number += 1
        return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"

    items: list[dict[str, Any]] = []
    message: dict[str, Any] | None = None  # the message item being written
    text: list[str] = []

    def open_message() -> list[bytes]:
        nonlocal message
        message = {"id": f"msg_{uuid.uuid4().hex}", "type": "message", "role": "assistant", "status": "in_progress",
                   "content": []}  # fmt: skip
        items.append(message)
        where = {"item_id": message["id"], "output_index": len(items) - 1, "content_index": 0}
        return [event("response.output_item.added", output_index=len(items) - 1, item=message),
                event("response.content_part.added", **where,
                      part={"type": "output_text", "text": "", "annotations": [], "logprobs": []})]  # fmt: skip

    def delta(piece: str) -> list[bytes]:
        out = open_message() if message is None else []
        text.append(piece)
        assert message is not None
        return [*out, event("response.output_text.delta", item_id=message["id"], output_index=len(items) - 1,
                            content_index=0, delta=piece, logprobs=[])]  # fmt: skip

    def close_message(finish: str) -> list[bytes]:
        assert message is not None
        index = items.index(message)
        done = _Answer.message("".join(text), finish, message["id"])
        items[index] = done
        part, where = done["content"][0], {"item_id": done["id"], "output_index": index, "content_index": 0}
        return [event("response.output_text.done", **where, text=part["text"], logprobs=[]),
                event("response.content_part.done", **where, part=part),
                event("response.output_item.done", output_index=index, item=done)]  # fmt: skip

    def call(made: dict[str, Any]) -> list[bytes]:
        done = _Answer.function_call(made)
        items.append({**done, "status": "in_progress", "arguments": ""})
        index, where = len(items) - 1, {"item_id": done["id"], "output_index": len(items) - 1}
        added = event("response.output_item.added", output_index=index, item=items[index])
        items[index] = done
        return [added, event("response.function_call_arguments.delta", **where, delta=done["arguments"]),
                event("response.function_call_arguments.done", **where, name=done["name"], arguments=done["arguments"]),
                event("response.output_item.done", output_index=index, item=done)]  # fmt: skip

    calls = CallStream() if answer.tools else None
    try:
        yield event("response.created", response=answer.response("in_progress", []))
        yield event("response.in_progress", response=answer.response("in_progress", []))
        async for item in generation:
            if isinstance(item, Generation):
                if message is None and (calls is None or calls.mode != "calls"):  # an empty answer: an empty message
                    for chunk in open_message():
                        yield chunk
                if message is not None:
                    for chunk in close_message(item.finish_reason):
                        yield chunk
                response = keep(answer.final(items, item), item)
                yield event(f"response.{response['status']}", response=response)
                return
            for sent in calls.push(item) if calls is not None else [("content", item)]:
                for chunk in delta(sent[1]) if sent[0] == "content" else call(sent[2]):
                    yield chunk
    except Exception as exc:  # after the headers went out, an error can only be an event
        error = orjson.loads(openai_error(exc).body)["error"]
        yield event("error", code=error["code"], message=error["message"], param=error["param"])
        failed = answer.response("failed", items)
        failed["error"] = {"code": "server_error", "message": error["message"]}
        yield event("response.failed", response=failed)


__all__ = ["ResponsesHandlers", "Turn", "in_responses_terms", "refuse_unknown", "translate"]

"""Tool calls (OpenAI's ``tools``, ``tool_choice``, ``parallel_tool_calls``): the call format, its grammar (arguments
constrained to each function's JSON schema) and parsing. A chat template with a tool format of its own (it reads
``tools``) describes the functions itself; for one without (SmolLM2's), ``with_tools`` puts a documented built-in
description in the system message.

    request = parse_tools(doc)                    # None: no tools in use (absent, [], null, or tool_choice none)
    messages = with_tools(messages, request)      # the tools described in the system message
    grammar = request.grammar()                   # the output: free text or calls (auto), calls only (required)
    content, calls = split_calls(text)            # after generation: OpenAI's message content and tool_calls

The format, as many open models are trained to write it (Hermes, Qwen 2.5): each call is one line of JSON
between tags, ``{"name"}`` first, then ``{"arguments"}``::

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

With ``tool_choice`` auto the answer is either text (which then may not begin with "<") or calls; with
required or a named function it is calls. A call's ``arguments`` always parse and follow the function's
``parameters`` schema (generation/constraint.py); ``parallel_tool_calls: false`` allows one call, else up to 8. A
call repeated word for word in one answer (a small model looping) ends the answer and is given once. Tool
results come back as ``role: tool`` messages with their ``tool_call_id``; an assistant message's
``tool_calls`` are rendered back into the same format, so a conversation reads as the model wrote it.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

from forwardpass.errors import InvalidInput, shown
from forwardpass.generation.constraint import Grammar

OPEN, CLOSE = "<tool_call>\n", "\n</tool_call>"
MAX_CALLS = 8  # calls in one answer


@dataclass(frozen=True)
class Function:
    name: str
    description: str
    parameters: dict[str, Any]


@dataclass(frozen=True)
class ToolRequest:
    """The functions a request offers and how the model may use them."""

    functions: tuple[Function, ...]
    choice: str  # auto | required | a function's name (none: no ToolRequest at all)
    parallel: bool = True

    def grammar(self) -> Grammar:
        """What the answer may be: text or calls (auto), calls of any or of the named function."""
        offered = [f for f in self.functions if self.choice in ("auto", "required") or f.name == self.choice]
        bodies = "\n".join(f"f{i}: %json {json.dumps(_call_schema(f))}" for i, f in enumerate(offered))
        calls = f'call ("\\n" call){{0,{MAX_CALLS - 1}}}' if self.parallel else "call"
        start = "TEXT | calls" if self.choice == "auto" else "calls"
        lark = (f"start: {start}\ncalls: {calls}\n"
                f'call: {json.dumps(OPEN)} body {json.dumps(CLOSE)}\n'
                f"body: {' | '.join(f'f{i}' for i in range(len(offered)))}\n{bodies}\n"
                'TEXT: /[^<](.|\\n)*/\n')  # fmt: skip
        return Grammar("lark", lark, ("tools",))

    def openai(self) -> list[dict[str, Any]]:
        """The functions as OpenAI tool objects: what a chat template with a tool format reads as ``tools``."""
        return [{"type": "function", "function": {"name": f.name, "description": f.description,
                                                  "parameters": f.parameters}} for f in self.functions]  # fmt: skip

    def instructions(self) -> str:
        """The system message text that describes the functions and the format."""
        described = "\n".join(json.dumps({"name": f.name, "description": f.description, "parameters": f.parameters})
                              for f in self.functions)  # fmt: skip
        must = {"auto": "When a function helps, call it; otherwise answer in plain text.",
                "required": "Answer by calling one or more of them."}.get(
            self.choice, f"Answer by calling {self.choice}.")  # fmt: skip
        return (f"You can call these functions (JSON schemas of their arguments):\n<tools>\n{described}\n</tools>\n"
                f"To call one, write exactly:\n{OPEN}" + '{"name": "<function name>", "arguments": {<its arguments>}}'
                f"{CLOSE}\n{must}")  # fmt: skip


def _call_schema(f: Function) -> dict[str, Any]:
    # compact JSON (no whitespace between items): fewer tokens to write, and the format of the instructions
    return {"type": "object", "properties": {"name": {"const": f.name}, "arguments": f.parameters},
            "required": ["name", "arguments"], "additionalProperties": False,
            "x-guidance": {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}}  # fmt: skip


def parse_tools(doc: dict[str, Any]) -> ToolRequest | None:
    """The request's tools, checked (InvalidInput names the field); None when no tool can be called."""
    tools, choice, parallel = doc.get("tools"), doc.get("tool_choice"), doc.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise InvalidInput(("parallel_tool_calls",), "expected true or false", shown(parallel))
    if tools is None:
        tools = []
    if not isinstance(tools, list) or len(tools) > 128:
        raise InvalidInput(("tools",), "expected a list of up to 128 {type: function, function: {...}}", shown(tools))
    functions = [_function(i, t) for i, t in enumerate(tools)]
    names = [f.name for f in functions]
    if len(set(names)) != len(names):
        raise InvalidInput(("tools",), "function names must be unique", names)
    if not functions:
        if choice not in (None, "none", "auto"):
            raise InvalidInput(("tool_choice",), "asks for a tool call, but the request has no tools", shown(choice))
        return None
    picked = _choice(choice, names)
    if picked == "none":
        return None
    return ToolRequest(tuple(functions), picked, parallel is not False)


def _function(i: int, tool: Any) -> Function:
    loc: tuple[str | int, ...] = ("tools", i)
    if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
        raise InvalidInput(loc, 'expected {"type": "function", "function": {"name", "parameters"}}', shown(tool))
    fn = tool["function"]
    name = fn.get("name")
    if not isinstance(name, str) or not name or len(name) > 64 or not all(c.isalnum() or c in "_-" for c in name):
        raise InvalidInput((*loc, "function", "name"), "expected 1 to 64 letters, digits, _ or -", shown(name))
    description = fn.get("description") or ""
    if not isinstance(description, str):
        raise InvalidInput((*loc, "function", "description"), "expected a string", shown(description))
    parameters = fn.get("parameters")
    if parameters is None:
        parameters = {"type": "object", "properties": {}}
    if not isinstance(parameters, dict):
        raise InvalidInput((*loc, "function", "parameters"), "expected a JSON schema object", shown(parameters))
    if fn.get("strict") is not None and not isinstance(fn["strict"], bool):
        raise InvalidInput((*loc, "function", "strict"), "expected true or false", shown(fn["strict"]))
    return Function(name, description, parameters)


def _choice(choice: Any, names: list[str]) -> str:
    if choice is None:
        return "auto"
    if choice in ("none", "auto", "required"):
        return str(choice)
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        if name in names:
            return str(name)
        raise InvalidInput(("tool_choice", "function", "name"), f"not one of the request's tools {names}", shown(name))
    raise InvalidInput(("tool_choice",), 'expected "none", "auto", "required" or {"type": "function", "function": '
                       '{"name": ...}}', shown(choice))  # fmt: skip


def with_tools(messages: list[dict[str, str]], tools: ToolRequest) -> list[dict[str, str]]:
    """The messages with the functions described at the start of the system message (one is added first)."""
    if messages and messages[0]["role"] == "system":
        return [{"role": "system", "content": messages[0]["content"] + "\n\n" + tools.instructions()}, *messages[1:]]
    return [{"role": "system", "content": tools.instructions()}, *messages]


def render_calls(calls: Any, loc: tuple[str | int, ...]) -> str:
    """An assistant message's ``tool_calls`` in the format the model writes them (for the next turn's prompt)."""
    if not isinstance(calls, list):
        raise InvalidInput(loc, "expected a list of {id, type: function, function: {name, arguments}}", shown(calls))
    out = []
    for j, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not isinstance(fn.get("arguments"), str):
            raise InvalidInput((*loc, j), 'expected {"function": {"name": str, "arguments": str of JSON}}', shown(call))
        try:
            arguments = json.loads(fn["arguments"]) if fn["arguments"].strip() else {}
        except ValueError:
            raise InvalidInput((*loc, j, "function", "arguments"), "expected a JSON object as a string",
                               shown(fn["arguments"])) from None  # fmt: skip
        out.append(OPEN + json.dumps({"name": fn["name"], "arguments": arguments}, ensure_ascii=False) + CLOSE)
    return "\n".join(out)


def repeats_a_call(text: str) -> bool:
    """The answer has written some call twice: a model looping (the generation ends there; the copy is dropped)."""
    if text.count(CLOSE.strip()) < 2:
        return False
    bodies = [part.partition(CLOSE.strip())[0].strip() for part in text.split(OPEN.strip())[1:]
              if CLOSE.strip() in part]  # fmt: skip
    return len(set(bodies)) < len(bodies)


def split_calls(text: str) -> tuple[str | None, list[dict[str, Any]]]:
    """A generated answer -> (content, OpenAI tool_calls). Text that is not a call is the content; a call cut off
    by max_tokens is left out; a call repeated word for word is given once."""
    if not text.startswith(OPEN.strip()):
        return text, []
    calls, seen = [], set()
    for part in text.split(OPEN.strip())[1:]:
        body, closed, _ = part.partition(CLOSE.strip())
        if not closed:
            continue
        try:
            call = json.loads(body)
        except ValueError:
            continue
        key = json.dumps(call, sort_keys=True)
        if key in seen:
            continue
        seen.add(key)
        calls.append(openai_call(call["name"], call["arguments"]))
    return None, calls


class CallStream:
    """Streamed text pieces -> what to send: ("content", text) as it comes when the answer is text, or
    ("call", index, OpenAI tool call) as each call closes when it is calls (a call is sent whole, once)."""

    def __init__(self) -> None:
        self.buffer, self.mode = "", ""  # mode: "" (not known yet), "text" or "calls"
        self.calls = 0
        self._seen: set[str] = set()

    def push(self, piece: str) -> list[tuple[Any, ...]]:
        if self.mode == "text":
            return [("content", piece)] if piece else []
        self.buffer += piece
        if not self.mode and self.buffer:
            self.mode = "calls" if self.buffer.startswith("<") else "text"
            if self.mode == "text":
                text, self.buffer = self.buffer, ""
                return [("content", text)]
        out: list[tuple[Any, ...]] = []
        while True:
            start, end = self.buffer.find(OPEN.strip()), self.buffer.find(CLOSE.strip())
            if start < 0 or end < 0:
                return out
            body = self.buffer[start + len(OPEN.strip()) : end]
            self.buffer = self.buffer[end + len(CLOSE.strip()) :]
            try:
                call = json.loads(body)
            except ValueError:
                continue
            key = json.dumps(call, sort_keys=True)
            if key not in self._seen:
                self._seen.add(key)
                out.append(("call", self.calls, openai_call(call["name"], call["arguments"])))
                self.calls += 1


def openai_call(name: str, arguments: Any) -> dict[str, Any]:
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)}}  # fmt: skip


__all__ = ["CallStream", "Function", "ToolRequest", "parse_tools", "render_calls", "split_calls", "with_tools"]

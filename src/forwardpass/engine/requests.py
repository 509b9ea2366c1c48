"""A generation request, checked field by field before any work: one place for every entrypoint.

    request = parse_generation({"messages": [...], "max_tokens": 16, "temperature": 0.7}, chat=True)
    request.prepare        # LanguageModel.prepare's keywords (messages or prompt, max_tokens, stop, sampling)
    request.stream         # answer as a stream of events
    engine.prepare_generation(name, request)  # the length limit, then templating and tokenizing

The fields are OpenAI's (its chat and completion requests), which the WebSocket and batch entrypoints
reuse; ``null`` means absent. Fields this server does not implement are refused by name, never ignored.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import Any

from forwardpass.errors import InvalidInput, shown
from forwardpass.generation.constraint import Grammar, Kind
from forwardpass.generation.tools import ToolRequest, parse_tools, render_calls, repeats_a_call

SAMPLING = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p", "seed": "seed",
            "frequency_penalty": "frequency_penalty", "presence_penalty": "presence_penalty",
            "repetition_penalty": "repetition_penalty"}  # fmt: skip
# accepted and kept, changing nothing in the answer: OpenAI's bookkeeping fields
KEPT = {"user", "metadata", "store", "service_tier", "reasoning_effort"}
GUIDED: dict[str, Kind] = {"guided_json": "json_schema", "guided_regex": "regex", "guided_choice": "choice",
                           "guided_grammar": "lark"}  # fmt: skip
COMMON = {"model", "max_tokens", "stop", "stream", "stream_options", "n", "ignore_eos", "logit_bias", "response_format",
          *KEPT, *GUIDED, *SAMPLING}  # fmt: skip
CHAT = COMMON | {"messages", "logprobs", "top_logprobs", "max_completion_tokens", "tools", "tool_choice",
                 "parallel_tool_calls"}  # fmt: skip
COMPLETION = COMMON | {"prompt", "logprobs"}


def parse_generation(doc: dict[str, Any], chat: bool) -> GenerationRequest:
    """Every field of a generation request checked (known, typed, in range); InvalidInput names the first bad one."""
    refuse_unknown(doc, chat)
    return _checked(doc, chat)


def refuse_unknown(doc: dict[str, Any], chat: bool) -> None:
    """InvalidInput naming the first field this server does not implement (checked before anything else); a
    field sent as null is absent."""
    unknown = sorted(k for k, v in doc.items() if v is not None and k not in (CHAT if chat else COMPLETION))
    if unknown:
        raise InvalidInput((unknown[0],), f"field {unknown[0][:40]!r} is not supported by this server "
                           f"(unsupported: {', '.join(repr(k[:40]) for k in unknown[:8])})")  # fmt: skip


@dataclass
class GenerationRequest:
    """A generation request whose fields have been checked: the keywords for LanguageModel.prepare, and how to answer."""

    prepare: dict[str, Any]
    stream: bool
    include_usage: bool
    user: str | None = None  # kept for the request log and metering
    metadata: dict[str, str] | None = None
    tools: ToolRequest | None = None  # the answer may be tool calls (generation/tools.py)
    n: int = 1  # choices: sequences sharing the prompt's KV (one prefill, n decoding rows)


_INT64 = 2**63 - 1
MAX_CHOICES = 16  # n: choices in one request
# OpenAI's documented ranges where it has them; the sampler narrows top_p, min_p and repetition_penalty further
_RANGES = {"temperature": (0, 2), "top_p": (0, 1), "min_p": (0, 1), "frequency_penalty": (-2, 2),
           "presence_penalty": (-2, 2), "repetition_penalty": (0, math.inf), "top_k": (0, _INT64),
           "seed": (0, _INT64)}  # fmt: skip


def _checked(doc: dict[str, Any], chat: bool) -> GenerationRequest:
    """Every field of a completion request checked (types and ranges) before any work; null means absent."""
    n = doc.get("n", None)
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_CHOICES):
        raise InvalidInput(("n",), f"expected an integer from 1 to {MAX_CHOICES}", shown(n))
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
    metadata = _metadata(doc.get("metadata"))
    for key in ("service_tier", "reasoning_effort"):
        if doc.get(key) is not None and not isinstance(doc[key], str):
            raise InvalidInput((key,), "expected a string", shown(doc[key]))
    _flag(doc, "store")
    max_tokens_key = "max_completion_tokens" if doc.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = doc.get(max_tokens_key)
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1):
        raise InvalidInput((max_tokens_key,), "expected an integer >= 1", shown(max_tokens))
    stop = doc.get("stop")
    if stop is not None and not isinstance(stop, str) and not (
            isinstance(stop, list) and len(stop) <= 4 and all(isinstance(s, str) for s in stop)):  # fmt: skip
        raise InvalidInput(("stop",), "expected a string or a list of up to 4 strings", shown(stop))
    text: dict[str, Any] = {"messages": _messages(doc.get("messages"))} if chat else {"prompt": _prompt(doc.get("prompt"))}
    constraint = grammar(doc)
    tools = parse_tools(doc) if chat else None
    if tools is not None:
        if constraint is not None:
            raise InvalidInput((constraint.loc[0],), "is not supported together with tools yet: give one of them")
        constraint = tools.grammar()
    shaped: dict[str, Any] = {"grammar": constraint, "logit_bias": _logit_bias(doc.get("logit_bias"))}
    if tools is not None:  # described by the chat template when it has a tool format, else by tools.py
        shaped.update(tools=tools, stop_when=repeats_a_call)
    return GenerationRequest({**text, "max_tokens": max_tokens, "stop": stop, "logprobs": logprobs, **sampling, **shaped},
                             stream, include_usage, user, metadata, tools, n or 1)  # fmt: skip


def grammar(doc: dict[str, Any]) -> Grammar | None:
    """The grammar the output must follow: ``response_format`` (OpenAI's text, json_object, json_schema) or one
    of vLLM's ``guided_json``, ``guided_regex``, ``guided_choice``, ``guided_grammar`` (Lark); None for free text."""
    found = [Grammar(kind, doc[key], (key,)) for key, kind in GUIDED.items() if doc.get(key) is not None]
    response_format = _response_format(doc.get("response_format"))
    if response_format is not None:
        found.insert(0, response_format)
    if len(found) > 1:
        raise InvalidInput((found[1].loc[0],), f"give one output constraint, not {found[0].loc[0]} and {found[1].loc[0]}")
    if not found:
        return None
    g = found[0]
    if g.kind == "json_schema" and not isinstance(g.source, dict):
        raise InvalidInput(g.loc, "expected a JSON schema object", shown(g.source))
    if g.kind in ("regex", "lark") and (not isinstance(g.source, str) or not g.source):
        raise InvalidInput(g.loc, f"expected a {'regular expression' if g.kind == 'regex' else 'Lark grammar'} "
                           "as a non-empty string", shown(g.source))  # fmt: skip
    if g.kind == "choice" and (not isinstance(g.source, list) or not g.source
                               or not all(isinstance(c, str) and c for c in g.source)):  # fmt: skip
        raise InvalidInput(g.loc, "expected a non-empty list of non-empty strings", shown(g.source))
    return g


def _response_format(value: Any) -> Grammar | None:
    loc: tuple[str, ...] = ("response_format",)
    if value is None:
        return None
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return Grammar("json_schema", {"type": "object"}, loc)
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict):
            raise InvalidInput((*loc, "json_schema"), "expected {name, schema, strict}", shown(spec))
        if not isinstance(spec.get("name"), str) or not spec["name"]:
            raise InvalidInput((*loc, "json_schema", "name"), "expected a non-empty string", shown(spec.get("name")))
        schema = spec.get("schema", {})
        if not isinstance(schema, dict):
            raise InvalidInput((*loc, "json_schema", "schema"), "expected a JSON schema object", shown(schema))
        if spec.get("strict") is not None and not isinstance(spec["strict"], bool):
            raise InvalidInput((*loc, "json_schema", "strict"), "expected true or false", shown(spec["strict"]))
        return Grammar("json_schema", schema or {"type": "object"}, (*loc, "json_schema", "schema"))
    raise InvalidInput((*loc, "type"), "expected text, json_object or json_schema", shown(kind))


def _logit_bias(value: Any) -> dict[int, float] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise InvalidInput(("logit_bias",), "expected an object of token id -> bias from -100 to 100", shown(value))
    out = {}
    for key, bias in value.items():
        try:
            token = int(key)
        except ValueError:
            raise InvalidInput(("logit_bias", key[:40]), "expected a token id (an integer as a string)") from None
        if isinstance(bias, bool) or not isinstance(bias, (int, float)) or not -100 <= bias <= 100:
            raise InvalidInput(("logit_bias", key[:40]), "expected a number from -100 to 100", shown(bias))
        out[token] = float(bias)
    return out or None


def _metadata(value: Any) -> dict[str, str] | None:
    """OpenAI's metadata: up to 16 string pairs, keys up to 64 characters, values up to 512."""
    if value is None:
        return None
    if not isinstance(value, dict) or len(value) > 16:
        raise InvalidInput(("metadata",), "expected an object of up to 16 string pairs", shown(value))
    for key, item in value.items():
        if len(key) > 64 or not isinstance(item, str) or len(item) > 512:
            raise InvalidInput(("metadata", key[:64]), "expected a key of up to 64 characters and a string value of "
                               "up to 512", shown(item))  # fmt: skip
    return dict(value)


def _flag(doc: dict[str, Any], key: str, loc: tuple[str, ...] | None = None) -> bool:
    value = doc.get(key)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise InvalidInput(loc or (key,), "expected true or false", shown(value))
    return value


def characters(request: GenerationRequest) -> int:
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


def max_characters(llm: Any) -> int:
    """The longest prompt that can fit, in characters: no more than context x the longest token's characters."""
    return llm.gen.context_length * _longest_token(llm)


def max_body(llm: Any) -> int:
    # a character is at most 12 bytes of JSON (a surrogate pair escaped); the other fields are small
    return 12 * max_characters(llm) + 64 * 1024


def _messages(messages: Any) -> list[dict[str, str]]:
    """OpenAI messages -> role/content strings (content parts of type text are joined)."""
    if not isinstance(messages, list) or not messages:
        raise InvalidInput(("messages",), "expected a non-empty list of {role, content}", shown(messages))
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise InvalidInput(("messages", i), "expected {role, content}", shown(m))
        role, content = m.get("role"), m.get("content")
        if role == "developer":  # what newer OpenAI flows send in place of system
            role = "system"
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
        if role == "assistant" and m.get("tool_calls"):  # the calls it made, as the model wrote them
            calls = render_calls(m["tool_calls"], ("messages", i, "tool_calls"))
            content = f"{content}\n{calls}" if isinstance(content, str) and content else calls
        if role == "tool" and m.get("tool_call_id") is not None and not isinstance(m["tool_call_id"], str):
            raise InvalidInput(("messages", i, "tool_call_id"), "expected a string", shown(m["tool_call_id"]))
        if not isinstance(content, str):
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



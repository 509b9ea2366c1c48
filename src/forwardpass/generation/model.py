"""A language model from the repository: tokenizer, chat template, decoder session, and generate(): the
server scheduler's own schedule -> execute -> update steps (generation/steps.py), one request at a time in the
caller's thread, prefix cache included.

    llm = forwardpass.load("smollm2")
    llm.generate("What is the capital of France?").text
    for chunk in llm.generate(messages=[{"role": "user", "content": "Hi"}], stream=True):
        print(chunk, end="")
"""

from __future__ import annotations

import json
import re
import secrets
import threading
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime
from functools import cache, cached_property
from pathlib import Path
from typing import Any

from forwardpass._deps import require
from forwardpass.config import ModelConfig
from forwardpass.errors import ForwardpassError, InvalidInput, ModelConfigError, ModelLoadError
from forwardpass.generation.constraint import Grammar
from forwardpass.generation.sampler import SamplingParams
from forwardpass.generation.schedule import PrefixCache, SchedulerState
from forwardpass.generation.sequence import Generation
from forwardpass.generation.sequence import Sequence as TokenSequence
from forwardpass.generation.session import DecoderSession
from forwardpass.generation.steps import Steps
from forwardpass.generation.tools import ToolRequest, with_tools
from forwardpass.stats import GenerationStats

__all__ = ["ChatTemplate", "Generation", "LanguageModel"]


class LanguageModel:
    """One version of a generation model; generate() runs one sequence at a time (a server runs many at once
    through its GenerationScheduler)."""

    def __init__(self, name: str, version: int, config: ModelConfig, folder: Path):
        tokenizers = require("tokenizers", "llm", "language models")
        assert config.generation is not None
        self.name, self.version, self.config, self.folder = name, version, config, folder
        gen = self.gen = config.generation
        self.tokenizer = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
        self._specials = _SpecialTokens(self.tokenizer)
        self.template = ChatTemplate.load(folder, gen.chat_template) if gen.chat_template else None
        self._lock = threading.Lock()

    @cached_property
    def _plain(self) -> Any:
        """The same vocabulary with special-token text encoded as plain text, for what messages say (see
        encode_chat); made on first use: a second tokenizer is 29 MiB, and few chats spell a special token."""
        plain = self.tokenizer.from_str(self.tokenizer.to_str())
        plain.encode_special_tokens = True
        return plain

    @cached_property
    def session(self) -> DecoderSession:
        """The one-slot session generate() uses (created on first use: a server decodes through its own
        multi-slot scheduler and never needs this one). ``session.step()`` drives it by hand (the goldens test,
        bench/generate.py)."""
        return self.open_session(slots=1)

    @cached_property
    def _steps(self) -> Steps:
        """generate()'s scheduling state: one slot, prefix cache, statistics. Its decode calls have one row where
        the server's carry a dummy second one (MIN_ROWS): one row is faster alone (96 vs 112 ms a step measured on
        a busy 2-core machine) and keeps the tokens generate() always gave; at a near tie (top-2 margin under
        ~0.5 logits) generate() and the server may pick differently, as before."""
        gen = self.gen
        cache = PrefixCache(gen.prefix_cache_mib * 2**20)
        state = SchedulerState(1, gen.prefill_chunk, cache, min_rows=1)
        return Steps(self.session, state, GenerationStats(self.name, self.version))

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

    def render(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True,
               tools: ToolRequest | None = None) -> str:  # fmt: skip
        """The chat template applied to ``messages`` (role/content dicts), as text; ``tools`` described by the
        template when it has a tool format, else in the system message (generation/tools.py)."""
        text, marks = self._render(messages, add_generation_prompt, tools)
        return text if marks is None else marks.restore(text)

    def _render(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool,
                tools: ToolRequest | None = None) -> tuple[str, _Marks | None]:  # fmt: skip
        """The rendered chat with special-token text from the messages replaced by markers (None: there was none)."""
        if tools is not None and (self.template is None or not self.template.takes_tools):
            messages = with_tools(list(messages), tools)
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise InvalidInput(("messages", i), "expected {'role': str, 'content': str}", m)
            if m["role"] not in ("system", "user", "assistant", "tool"):
                raise InvalidInput(("messages", i, "role"), "expected system, user, assistant or tool", m["role"])
        escaped, marks = self._specials.escape(list(messages))
        if self.template is None:
            return "".join(m["content"] + "\n" for m in escaped), marks
        context: dict[str, Any] = {"messages": escaped, "add_generation_prompt": add_generation_prompt}
        if self.template.takes_tools:  # Hugging Face's convention: a list of OpenAI tool objects, or None
            context["tools"] = None if tools is None else tools.openai()
        return self.template.render(**context), marks

    def encode(self, text: str) -> list[int]:
        """Prompt token ids of raw text: special-token text in it is recognized (the caller writes the whole
        prompt, markup included); BOS added when the model wants it."""
        # encode_batch, not encode: the same ids, but it lets go of the GIL, so a long prompt tokenizing on a
        # worker thread does not hold up the event loop (1.2M characters: 729 ms held with encode, 16 ms here)
        return self._with_bos(self.tokenizer.encode_batch([text], add_special_tokens=False)[0].ids)

    def encode_chat(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True,
                    tools: ToolRequest | None = None) -> list[int]:  # fmt: skip
        """Prompt token ids of a chat: only the template's own markup becomes special tokens.

        Special-token text inside a message (a user typing ``<|im_end|>``) is encoded as the plain text it is,
        so a message cannot close its turn or open another role's.
        """
        text, marks = self._render(messages, add_generation_prompt, tools)
        if marks is None:  # the usual case: no message spells a special token, so every one in the text is markup
            return self.encode(text)
        return self._with_bos(self._specials.encode(text, marks, self._plain))

    def _with_bos(self, ids: list[int]) -> list[int]:
        return [self.gen.bos_token_id, *ids] if self.gen.add_bos_token and self.gen.bos_token_id >= 0 else ids

    def prepare(self, prompt: str | None = None, *, messages: Sequence[dict[str, Any]] | None = None,
                max_tokens: int | None = None, stop: str | Sequence[str] | None = None, logprobs: int = 0,
                ignore_eos: bool = False, grammar: Grammar | None = None, logit_bias: dict[int, float] | None = None,
                stop_when: Callable[[str], bool] | None = None, tools: ToolRequest | None = None,
                **sampling: Any) -> TokenSequence:  # fmt: skip
        """A checked, tokenized request, ready to run (generate() and the server's scheduler both start here).

        ``ignore_eos`` keeps generating past the model's stop tokens, to max_tokens (benchmarks, as vLLM's).
        ``max_tokens`` past what the context leaves is capped to it (the finish reason says ``length``), as
        llama-server does; a prompt that alone fills the context is refused. ``grammar``: the output follows it
        (generation/constraint.py); ``logit_bias``: token id -> added to its logit, -100 to 100 (OpenAI's);
        ``stop_when``: a rule on the text so far that ends the generation (tool calls: a call repeated).
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
        ids = self.encode(prompt) if prompt is not None else self.encode_chat(messages or [], tools=tools)
        if not ids:
            raise InvalidInput(("prompt",) if prompt is not None else ("messages",), "expected at least one token")
        if len(ids) >= self.gen.context_length:
            raise InvalidInput(("messages" if prompt is None else "prompt",),
                               f"the prompt is {len(ids)} tokens, the context holds {self.gen.context_length} "
                               "(prompt and completion together); shorten the prompt")  # fmt: skip
        limit = max_tokens if max_tokens is not None else self.gen.max_tokens
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise InvalidInput(("max_tokens",), "expected an integer >= 1", limit)
        limit = min(limit, self.gen.context_length - len(ids))  # what the context leaves after the prompt
        for token in logit_bias or {}:
            if not 0 <= token < self.gen.n_vocab:
                raise InvalidInput(("logit_bias", str(token)), f"not a token of this model (0 to {self.gen.n_vocab - 1})")
        params = SamplingParams(**sampling)
        constraint = grammar.constraint(self) if grammar is not None else None
        return TokenSequence(ids, limit=limit, stop=stops, params=params, logprobs=logprobs,
                             stop_ids=() if ignore_eos else self.gen.stop_token_ids, tokenizer=self.tokenizer,
                             constraint=constraint, logit_bias=logit_bias, stop_when=stop_when)  # fmt: skip

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
            yield from self._steps.run(seq)


class ChatTemplate:
    """A model's chat template (from its GGUF, or model.yaml's ``chat_template`` file), rendered in jinja2's
    immutable sandbox: a template reads the messages and writes text; it cannot reach Python objects, files or
    commands, nor change the messages. It has the helpers real templates call, as Hugging Face's
    apply_chat_template provides them: ``raise_exception`` (the template refuses the messages: InvalidInput, 400),
    ``strftime_now`` and a ``tojson`` that keeps non-ASCII text.

        template = ChatTemplate.load(folder, "chat_template.jinja")
        template.render(messages=[{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    """

    def __init__(self, source: str, origin: str):
        self._jinja2 = jinja2 = require("jinja2", "llm", "chat templates")
        env = _bounded_sandbox()(undefined=jinja2.StrictUndefined, keep_trailing_newline=True,
                                 extensions=["jinja2.ext.loopcontrols"])  # fmt: skip
        env.filters["tojson"] = _tojson
        env.filters["center"] = _bounded_center
        env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now)
        self.origin = origin
        self._template = env.from_string(source)
        # a template with a tool format of its own reads `tools` (Hugging Face's apply_chat_template passes it)
        from jinja2 import meta

        self.takes_tools = "tools" in meta.find_undeclared_variables(env.parse(source))

    @classmethod
    def load(cls, folder: Path, name: str) -> ChatTemplate:
        """The template file ``name`` of a model folder; it must lie inside the folder."""
        jinja2 = require("jinja2", "llm", "chat templates")
        file, path = str(folder / "model.yaml"), folder / name
        if folder.resolve() not in path.resolve().parents:
            raise ModelConfigError(file, "generation.chat_template", f"'{name}' is outside the model folder",
                                   "put the template file beside model.yaml")  # fmt: skip
        try:
            return cls(path.read_text(encoding="utf-8"), str(path))
        except (OSError, UnicodeDecodeError, jinja2.TemplateError) as exc:
            raise ModelConfigError(file, "generation.chat_template", str(exc),
                                   "point it at the template file beside model.yaml") from None  # fmt: skip

    def render(self, **context: Any) -> str:
        """The template's text for ``context`` (messages, add_generation_prompt)."""
        try:
            return self._template.render(**context)
        except ForwardpassError:
            raise
        except self._jinja2.exceptions.SecurityError as exc:
            raise ModelLoadError(f"{self.origin}: the chat template tried what the sandbox forbids ({exc}); it is not "
                                 "a safe template: replace it with the model's original one") from None  # fmt: skip
        except Exception as exc:  # a template that fails on these messages (undefined names, type errors)
            raise ModelLoadError(f"{self.origin}: the chat template failed ({type(exc).__name__}: {exc})") from None


# The most a template may build with one *, ** or % or string padding call: jinja2's sandbox keeps a
# template away from Python's internals and caps range() at 100,000 items, but not 'a' * 10**10.
MAX_TEMPLATE_ITEMS = 1_000_000


def _too_big(what: str) -> Exception:
    from jinja2.exceptions import SecurityError

    return SecurityError(f"{what} would be larger than {MAX_TEMPLATE_ITEMS:,} items")


@cache
def _bounded_sandbox() -> type:
    """jinja2's immutable sandbox, where an operator or a string method cannot build huge values."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class BoundedSandbox(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"*", "**", "%"})

        def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
            if operator == "*":
                for seq, n in ((left, right), (right, left)):
                    if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > MAX_TEMPLATE_ITEMS:
                        raise _too_big("a repeated text or list")
            elif operator == "**":
                if isinstance(left, (int, float)) and isinstance(right, (int, float)) and abs(right) > 64 and abs(left) > 1:
                    raise _too_big("a power")
            elif isinstance(left, str) and any(isinstance(v, int) and v > MAX_TEMPLATE_ITEMS
                                               for v in (right if isinstance(right, tuple) else (right,))):  # fmt: skip
                raise _too_big("a formatted text")
            return super().call_binop(context, operator, left, right)

        def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805 (jinja2's names)
            if isinstance(getattr(__obj, "__self__", None), str) and any(
                isinstance(v, int) and v > MAX_TEMPLATE_ITEMS for v in (*args, *kwargs.values())
            ):
                raise _too_big("a padded text")
            return super().call(__context, __obj, *args, **kwargs)

    return BoundedSandbox


def _bounded_center(value: Any, width: int = 80) -> str:
    if isinstance(width, int) and width > MAX_TEMPLATE_ITEMS:
        raise _too_big("a centered text")
    return str(value).center(width)


def _raise_exception(message: str) -> None:
    raise InvalidInput(("messages",), f"the model's chat template refuses these messages: {message}")


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(value: Any, indent: int | None = None, separators: Any = None, sort_keys: bool = False,
            ensure_ascii: bool = False) -> str:  # fmt: skip
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class _Marks:
    """Markers standing for special-token text found in messages during one render: private-use characters
    around a random number no message can know, so only this render's markers turn back into text."""

    def __init__(self, specials: re.Pattern[str]):
        self.specials = specials
        self.originals: list[str] = []
        self.nonce = str(secrets.randbits(64))
        self.pattern = re.compile(f"\ue000{self.nonce}:(\\d+)\ue001")

    def _mark(self, match: re.Match[str]) -> str:
        self.originals.append(match.group(0))
        return f"\ue000{self.nonce}:{len(self.originals) - 1}\ue001"

    def escape(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.specials.sub(self._mark, value)
        if isinstance(value, dict):
            return {k: self.escape(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [self.escape(v) for v in value]
        return value

    def restore(self, text: str) -> str:
        def original(m: re.Match[str]) -> str:
            i = int(m.group(1))
            return self.originals[i] if i < len(self.originals) else m.group(0)

        return self.pattern.sub(original, text)


class _SpecialTokens:
    """The tokenizer's special tokens, and the chat encoding where only the template's markup becomes them."""

    def __init__(self, tokenizer: Any):
        added = {t.content: (i, t) for i, t in tokenizer.get_added_tokens_decoder().items() if t.special and t.content}
        self.ids = {content: i for content, (i, _) in added.items()}
        self.strips = {content: (t.lstrip, t.rstrip) for content, (_, t) in added.items()}
        longest_first = sorted(added, key=len, reverse=True)
        self.pattern = re.compile("|".join(map(re.escape, longest_first))) if added else None

    def escape(self, messages: list[Any]) -> tuple[list[Any], _Marks | None]:
        """``messages`` with every special token's text replaced by a marker, and the marks (None: none found)."""
        if self.pattern is None:
            return messages, None
        marks = _Marks(self.pattern)
        escaped = marks.escape(messages)
        return (escaped, marks) if marks.originals else (messages, None)

    def encode(self, text: str, marks: _Marks, plain: Any) -> list[int]:
        """Token ids of a render with markers: special tokens in ``text`` are the template's and become their ids;
        the text between them, markers turned back into what the messages said, is encoded by ``plain`` (a
        tokenizer that reads special-token text as text). The split is the tokenizer's own: at each special
        token, with the whitespace beside it stripped for tokens marked lstrip or rstrip."""
        assert self.pattern is not None
        pieces: list[tuple[bool, str]] = []
        pos = 0
        for m in self.pattern.finditer(text):
            pieces += [(False, text[pos : m.start()]), (True, m.group(0))]
            pos = m.end()
        pieces.append((False, text[pos:]))
        for i, (special, piece) in enumerate(pieces):
            if special:
                lstrip, rstrip = self.strips[piece]
                if lstrip:
                    pieces[i - 1] = (False, pieces[i - 1][1].rstrip())
                if rstrip:
                    pieces[i + 1] = (False, pieces[i + 1][1].lstrip())
        ids: list[int] = []
        for special, piece in pieces:
            if special:
                ids.append(self.ids[piece])
            elif piece:
                ids += plain.encode_batch([marks.restore(piece)], add_special_tokens=False)[0].ids  # GIL let go
        return ids

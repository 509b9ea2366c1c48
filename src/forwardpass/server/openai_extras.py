"""The OpenAI and llama-server endpoints beside chat and completions: embeddings, model objects, health, tokens.

Embeddings come from a ``task: embedding`` model, or from a language model's own final hidden states, mean
pooled and normalized (llama-server's ``--pooling mean``; ``Engine.embed``).

    POST /v1/embeddings    {"model": "smollm2-embed", "input": ["a", "b"], "encoding_format": "float"}
                           -> {"object": "list", "data": [{"object": "embedding", "index": 0, "embedding": [...]}],
                               "model": ..., "usage": {"prompt_tokens": 4, "total_tokens": 4}}
    GET  /v1/models/{id}   OpenAI's model object (404 in OpenAI's shape)
    GET  /health           llama-server's {"status": "ok"}; 503 {"status": "loading model"} until ready
    POST /tokenize         {"content": "Hi", "add_special": false} -> {"tokens": [...]}   (a language model's)
    POST /detokenize       {"tokens": [...]} -> {"content": "Hi"}

Embeddings run through ``Engine.infer`` on a ``task: embedding`` model (forwardpass/embedding.py): a list of
inputs is one engine call, which the dynamic batcher batches with other requests. Any other path under /v1/
is answered in OpenAI's error shape (``unknown_route``), so OpenAI clients show its cause.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Callable
from typing import Any

import numpy as np

from forwardpass.embedding import EMBEDDING, TOKENS, EmbeddingModel
from forwardpass.engine import Engine
from forwardpass.errors import InvalidInput, ModelNotFound, ModelNotReady
from forwardpass.inference import InferRequest, InputTensor
from forwardpass.server.config import ServeConfig
from forwardpass.server.errors import openai_error, shown
from forwardpass.server.http import Request, Response, json_object
from forwardpass.server.tenancy import Tenancy

MAX_INPUTS = 2048  # OpenAI's limit on inputs per embeddings request
INLINE_CHARACTERS = 2000  # tokenizing fewer characters costs less than a hop to a worker thread
_EMBEDDING_FIELDS = ("model", "input", "encoding_format", "dimensions", "user")


class OpenAIExtras:
    """The handlers; each returns a Response and never raises (errors in OpenAI's shape, /health in llama-server's)."""

    def __init__(self, engine: Engine, config: ServeConfig, tenancy: Tenancy | None = None):
        self.engine, self.config = engine, config
        self.tenancy = tenancy or Tenancy.none()

    # -- /v1/embeddings ----------------------------------------------------------------------------

    async def embeddings(self, request: Request) -> Response:
        label, version = "", ""
        try:
            doc = await _body(request, self.config.max_body_bytes)
            doc = {k: v for k, v in doc.items() if v is not None}  # null means absent
            unknown = [k for k in doc if k not in _EMBEDDING_FIELDS]
            if unknown:
                raise InvalidInput((unknown[0],), f"unknown parameter; /v1/embeddings takes {list(_EMBEDDING_FIELDS)}")
            name = doc.get("model")
            if not isinstance(name, str) or not name:
                raise InvalidInput(("model",), "expected a model name (GET /v1/models lists them)", shown(name))
            language = name in self.engine.generators()  # its own pooled hidden states (llama-server --pooling mean)
            model: Any = self.engine.generator(name).model if language else self._embedding_model(name)
            label, version = name, str(model.version)
            self.tenancy.model(request, name)
            fmt = doc.get("encoding_format", "float")
            if fmt not in ("float", "base64"):
                raise InvalidInput(("encoding_format",), "expected 'float' or 'base64'", shown(fmt))
            width = self.engine.generator(name).session.hidden_width if language else model.dimensions
            dims = doc.get("dimensions")
            if dims is not None and (type(dims) is not int or not 1 <= dims <= width):
                raise InvalidInput(("dimensions",), f"expected an integer from 1 to {width} (this model's "
                                   "embedding length)", shown(dims))  # fmt: skip
            if "user" in doc and not isinstance(doc["user"], str):
                raise InvalidInput(("user",), "expected a string", shown(doc["user"]))
            if language:
                items = _items(doc.get("input", ...))
                if isinstance(items[0], list):
                    _check_ids(items, model.gen.n_vocab)
                pooled = await self.engine.embed(name, items)
                vectors = np.stack([v for v, _ in pooled])
                tokens = np.array([n for _, n in pooled], np.int64)
            else:
                tensors = _inputs(doc.get("input", ...), model)
                _, outputs = await self.engine.infer(name, None, InferRequest(None, tensors, None))
                got = {o.name: o.array for o in outputs}
                vectors, tokens = got[EMBEDDING], got[TOKENS]
            self.tenancy.tokens(request, name, int(tokens.sum()))
        except Exception as exc:
            return openai_error(exc, self.engine.stats, label, version)
        if dims is not None:  # OpenAI's shortened embeddings: the first `dimensions` values, scaled to unit length
            vectors = vectors[:, :dims]
            vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        if fmt == "base64":
            little = np.ascontiguousarray(vectors, dtype="<f4")
            data = [base64.b64encode(row.tobytes()).decode("ascii") for row in little]
        else:
            data = list(vectors.astype(np.float32, copy=False))
        used = int(tokens.sum())
        return Response.json({"object": "list", "model": name,
                              "data": [{"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(data)],
                              "usage": {"prompt_tokens": used, "total_tokens": used}})  # fmt: skip

    def _embedding_model(self, name: str) -> EmbeddingModel:
        model = self.engine.served(name).model  # ModelNotFound (404), ModelNotReady (503), ModelUnavailable
        if not isinstance(model, EmbeddingModel):
            raise InvalidInput(("model",), f"'{name}' is not an embedding model (task: {model.config.task}): name a "
                               "task: embedding model (GET /v1/models lists them)", name)  # fmt: skip
        return model

    # -- /v1/models/{model} ------------------------------------------------------------------------

    def model_ids(self) -> list[str]:
        """The models the OpenAI API serves: language models and embedding models."""
        embedders = {s.model.name for s in self.engine.registry.all_served() if isinstance(s.model, EmbeddingModel)}
        return sorted(set(self.engine.generators()) | embedders)

    async def model(self, request: Request, model: str) -> Response:
        if model not in self.model_ids():
            exc = ModelNotFound(f"The model '{model}' does not exist; GET /v1/models lists the models served")
            return openai_error(exc, self.engine.stats)
        return Response.json({"id": model, "object": "model", "created": 0, "owned_by": "forwardpass"})

    # -- llama-server's extras ---------------------------------------------------------------------

    async def health(self, request: Request) -> Response:
        if self.engine.ready:
            return Response.json({"status": "ok"})
        return Response.json({"status": "loading model"}, 503)

    async def tokenize(self, request: Request) -> Response:
        try:
            doc = await _body(request, self.config.max_body_bytes)
            llm = self._language_model(doc.get("model"))
            content = doc.get("content")
            if not isinstance(content, str):
                raise InvalidInput(("content",), "expected the text to tokenize, a string", shown(content))
            add_special = doc.get("add_special", False)
            if not isinstance(add_special, bool):
                raise InvalidInput(("add_special",), "expected true or false", shown(add_special))
            pieces = doc.get("with_pieces", False)
            if not isinstance(pieces, bool):
                raise InvalidInput(("with_pieces",), "expected true or false", shown(pieces))
            tokenizer, gen = llm.tokenizer, llm.gen

            def encode() -> list[Any]:
                ids = list(tokenizer.encode(content, add_special_tokens=False).ids)
                if add_special and gen.add_bos_token and gen.bos_token_id >= 0:  # what a prompt starts with
                    ids.insert(0, gen.bos_token_id)
                if not pieces:
                    return ids
                return [{"id": t, "piece": tokenizer.decode([t], skip_special_tokens=False)} for t in ids]

            tokens = await _off_loop_if(len(content) > INLINE_CHARACTERS, encode)
        except Exception as exc:
            return openai_error(exc, self.engine.stats)
        return Response.json({"tokens": tokens})

    async def detokenize(self, request: Request) -> Response:
        try:
            doc = await _body(request, self.config.max_body_bytes)
            llm = self._language_model(doc.get("model"))
            tokens = doc.get("tokens")
            if not isinstance(tokens, list):
                raise InvalidInput(("tokens",), "expected a list of token ids", shown(tokens))
            vocab = llm.tokenizer.get_vocab_size(with_added_tokens=True)
            for i, t in enumerate(tokens):
                if type(t) is not int or not 0 <= t < vocab:
                    raise InvalidInput(("tokens", i), f"expected a token id from 0 to {vocab - 1}", shown(t))
            content = await _off_loop_if(len(tokens) > INLINE_CHARACTERS // 4, lambda: llm.tokenizer.decode(
                tokens, skip_special_tokens=False))  # fmt: skip
        except Exception as exc:
            return openai_error(exc, self.engine.stats)
        return Response.json({"content": content})

    def _language_model(self, name: Any) -> Any:
        """The named language model, or the only one served when ``name`` is absent."""
        generators = self.engine.generators()
        if name is None:
            if len(generators) != 1:
                if not generators and not self.engine.ready:
                    raise ModelNotReady("the server is loading its models; retry in a moment")
                raise InvalidInput(("model",), f"this server serves {len(generators)} language models "
                                   f"({sorted(generators)}): name one with 'model'")  # fmt: skip
            return next(iter(generators.values())).model
        if not isinstance(name, str) or not name:
            raise InvalidInput(("model",), "expected a language model's name", shown(name))
        return self.engine.generator(name).model  # ModelNotFound (404) for an unknown or non-language model

    # -- anything else under /v1/ ------------------------------------------------------------------

    @staticmethod
    def unknown_route(method: str, path: str, path_exists: bool) -> Response:
        """OpenAI's answer to a path it does not serve, so that its clients show the cause."""
        why = f"{method} is not allowed there" if path_exists else "no such endpoint"
        status = 405 if path_exists else 404
        return Response.json({"error": {"message": f"Invalid URL ({method} {path}): {why}; this server's OpenAI API "
                                        "has /v1/chat/completions, /v1/completions, /v1/responses, /v1/embeddings "
                                        "and /v1/models",
                                        "type": "invalid_request_error", "param": None, "code": None}}, status)  # fmt: skip


async def _off_loop_if(large: bool, work: Callable[[], Any]) -> Any:
    """``work()`` here when small, on a worker thread when it grows with a large request."""
    return await asyncio.get_running_loop().run_in_executor(None, work) if large else work()


async def _body(request: Request, limit: int) -> dict[str, Any]:
    return json_object(await request.read_body(limit))


def _items(value: Any) -> list[Any]:
    """``input`` -> a list of strings or a list of token id lists (each non-empty)."""
    if value is ...:
        raise InvalidInput(("input",), "missing: the text (or list of texts) to embed")
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        raise InvalidInput(("input",), "expected a string, a list of strings or a list of token id lists",
                           shown(value))  # fmt: skip
    if len(value) > MAX_INPUTS:
        raise InvalidInput(("input",), f"{len(value)} inputs; at most {MAX_INPUTS} a request: send fewer")
    if all(type(v) is int for v in value):
        value = [value]  # one text as token ids
    if not (all(isinstance(v, str) for v in value) or all(isinstance(v, list) for v in value)):
        raise InvalidInput(("input",), "expected all strings or all token id lists, not a mix", shown(value))
    for i, item in enumerate(value):
        if not item:
            raise InvalidInput(("input", i), "an empty input has nothing to embed")
    return value


def _inputs(value: Any, model: EmbeddingModel) -> list[InputTensor]:
    """``input`` (a string, a list of strings, a token list or a list of token lists) -> the engine's tensors."""
    items = _items(value)
    if isinstance(items[0], str):
        texts = np.array([t.encode("utf-8") for t in items], dtype=object)
        return [InputTensor("input", "BYTES", [len(texts)], texts)]
    return _token_tensors(items, model)


def _check_ids(lists: list[Any], vocab: int) -> None:
    """Every element of ``input``'s token lists a token id of the model (``_items`` checked they are non-empty)."""
    for i, ids in enumerate(lists):
        for j, t in enumerate(ids):
            if type(t) is not int or not 0 <= t < vocab:
                raise InvalidInput(("input", i, j), f"expected a token id from 0 to {vocab - 1}", shown(t))


def _token_tensors(lists: list[Any], model: EmbeddingModel) -> list[InputTensor]:
    tokenizer = model.tokenizer
    pre = getattr(model.pre, "config", None)
    ids_name, mask_name = getattr(pre, "input_ids", None), getattr(pre, "attention_mask", None)
    types_name = getattr(pre, "token_type_ids", None)
    if tokenizer is None or ids_name is None:
        raise InvalidInput(("input",), f"model '{model.name}' takes text, not token ids: send strings")
    _check_ids(lists, tokenizer.get_vocab_size(with_added_tokens=True))
    longest = max(map(len, lists))
    limit = getattr(pre, "max_length", longest)
    if longest > limit:
        raise InvalidInput(("input",), f"a token list of {longest} tokens; this model takes at most {limit}")
    specs = {s.name: s for s in model.inputs}
    ids_array = np.zeros((len(lists), longest), np.int64)  # right padding, masked out of the pooling
    mask = np.zeros((len(lists), longest), np.int64)
    for i, ids in enumerate(lists):
        ids_array[i, : len(ids)], mask[i, : len(ids)] = ids, 1
    tensors = []
    for name, array in ((ids_name, ids_array), (mask_name, mask), (types_name, np.zeros_like(mask))):
        if name is not None and name in specs:
            datatype = specs[name].datatype
            cast = array.astype(np.int32) if datatype == "INT32" else array
            tensors.append(InputTensor(name, datatype, list(cast.shape), cast))
    return tensors

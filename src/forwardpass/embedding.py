"""``task: embedding``: an ONNX encoder whose output is pooled into one vector per text.

    task: embedding
    pre: {kind: text, tokenizer: tokenizer.json, max_length: 512}     # input_ids, attention_mask
    post: {kind: embedding, pooling: mean, normalize: true}           # mean | cls | last

    model = forwardpass.load("smollm2-embed")
    model.predict("a sentence")        # {"embedding": [0.01, ...], "tokens": 3}
    model.run(feeds)                   # {"embedding": (N, H) float32, "tokens": (N,) int64}

The pooling is part of the forward pass (``Pooled`` wraps the model's runtime), so every entrypoint sees the
same vectors: V2 infer answers the outputs ``embedding`` [N, H] and ``tokens`` [N] (the tokens each row
counted, from the attention mask), ``:predict``, batch and the CLI one ``{"embedding", "tokens"}`` a row,
``POST /v1/embeddings`` OpenAI's shape (server/openai_extras.py). Rows still batch in the dynamic batcher.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from forwardpass.config import EmbeddingPost, ModelConfig
from forwardpass.errors import ModelConfigError
from forwardpass.model import Model
from forwardpass.pipeline.answers import Answers
from forwardpass.runtime import Runtime, TensorInfo, open_runtime

EMBEDDING, TOKENS = "embedding", "tokens"  # the outputs of an embedding model
_FLOATS = ("FP32", "FP64", "FP16")


def pool(hidden: np.ndarray, mask: np.ndarray | None, pooling: str, normalize: bool) -> np.ndarray:
    """Token vectors (N, T, H) -> one vector (N, H) float32: the mean of the tokens ``mask`` (N, T) marks, the
    last marked one, or the first (cls); (N, H) is taken as pooled. ``normalize``: unit L2 length each.

        pool(h, mask, "mean", True)
    """
    h = hidden.astype(np.float32, copy=False)
    if h.ndim == 3:
        n, t, _ = h.shape
        m = np.ones((n, t), np.float32) if mask is None else (mask.reshape(n, t) > 0).astype(np.float32)
        if pooling == "cls":
            h = h[:, 0]
        elif pooling == "last":  # the last marked token, wherever the padding is
            last = t - 1 - np.argmax(m[:, ::-1], axis=1)
            h = h[np.arange(n), last]
        else:
            counts = np.maximum(m.sum(axis=1, keepdims=True), 1.0)  # an all-padding row pools to zeros, not NaN
            h = np.einsum("nt,nth->nh", m, h) / counts
    elif h.ndim != 2:
        raise ValueError(f"expected token vectors (N, T, H) or pooled (N, H), got shape {list(h.shape)}")
    if normalize:
        h = h / np.maximum(np.linalg.norm(h, axis=1, keepdims=True), 1e-12)
    return np.ascontiguousarray(h, dtype=np.float32)


class Pooled:
    """A Runtime around an encoder's runtime: its outputs are ``embedding`` (N, H) FP32 and ``tokens`` (N,) INT64.

    Checked when built: the pooled output exists and is a float of rank 2 or 3, and mean/last pooling of
    token vectors has its mask input. ModelConfigErrors name ``post.<field>``.
    """

    def __init__(self, inner: Runtime, config: EmbeddingPost, file: str, mask_default: str | None):
        self.inner, self.config = inner, config
        self.inputs, self.guarded = inner.inputs, inner.guarded
        self.probe_ms, self.threads = inner.probe_ms, inner.threads
        outputs = {o.name: o for o in inner.outputs}
        if config.output is not None:
            if config.output not in outputs:
                raise ModelConfigError(file, "post.output", f"'{config.output}' is not a model output "
                                       f"({list(outputs)})", "name the encoder output to pool")  # fmt: skip
            out = outputs[config.output]
        else:
            found = [o for rank in (3, 2) for o in inner.outputs if o.datatype in _FLOATS and len(o.shape) == rank]
            if not found:
                raise ModelConfigError(file, "post.output", f"no float output of rank 3 (N, T, H) or 2 (N, H) among "
                                       f"{[(o.name, list(o.shape)) for o in inner.outputs]}",
                                       "name the output to pool with post.output")  # fmt: skip
            out = found[0]
        if out.datatype not in _FLOATS or len(out.shape) not in (2, 3):
            raise ModelConfigError(file, "post.output", f"'{out.name}' is {out.datatype} {list(out.shape)}; expected "
                                   "float token vectors (N, T, H) or pooled vectors (N, H)",
                                   "name a float output of rank 2 or 3")  # fmt: skip
        names = [i.name for i in inner.inputs]
        mask = config.mask or mask_default or "attention_mask"
        if config.mask is not None and mask not in names:
            raise ModelConfigError(file, "post.mask", f"'{mask}' is not a model input ({names})",
                                   "name the attention mask input")  # fmt: skip
        self.mask = mask if mask in names else None
        if len(out.shape) == 3 and config.pooling in ("mean", "last") and self.mask is None:
            raise ModelConfigError(file, "post.pooling", f"{config.pooling} pooling of '{out.name}' {list(out.shape)} "
                                   f"needs the attention mask, and the model has no input '{mask}' ({names})",
                                   "name it with post.mask, or use pooling: cls")  # fmt: skip
        self.source = out.name
        width = out.shape[-1]
        self.outputs: Sequence[TensorInfo] = [TensorInfo(EMBEDDING, "FP32", (-1, width)), TensorInfo(TOKENS, "INT64", (-1,))]
        self._inner_run = inner.prepare([out.name])

    def _pooled(self, feeds: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        (hidden,) = self._inner_run(feeds)
        mask = feeds.get(self.mask) if self.mask is not None else None
        embedding = pool(hidden, mask, self.config.pooling, self.config.normalize)
        if mask is not None:
            tokens = (np.asarray(mask).reshape(len(embedding), -1) > 0).sum(axis=1).astype(np.int64)
        else:  # every position counts
            first = next(iter(feeds.values()))
            tokens = np.full(len(embedding), first.shape[1] if first.ndim > 1 else 1, np.int64)
        return embedding, tokens

    def run(self, feeds: Mapping[str, np.ndarray], output_names: Sequence[str] | None = None) -> list[np.ndarray]:
        return self.prepare(output_names)(feeds)

    def prepare(self, output_names: Sequence[str] | None = None) -> Callable[[Mapping[str, np.ndarray]], list[np.ndarray]]:
        names = list(output_names) if output_names is not None else [EMBEDDING, TOKENS]

        def run(feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
            got = dict(zip((EMBEDDING, TOKENS), self._pooled(feeds)))
            return [got[n] for n in names]

        return run

    def close(self) -> None:
        self.inner.close()


class EmbeddingAnswers(Answers):
    """One ``{"embedding": [floats], "tokens": n}`` a row; ``columns()`` keeps the vectors as one (N, H) array."""

    def __init__(self, embeddings: np.ndarray, tokens: np.ndarray):
        super().__init__(len(embeddings))
        self.embeddings, self.tokens = embeddings, tokens

    def columns(self) -> dict[str, np.ndarray]:
        rows = np.empty(len(self.embeddings), dtype=object)  # a vector a row (Arrow: list<float>)
        rows[:] = list(self.embeddings)
        return {EMBEDDING: rows, TOKENS: self.tokens}

    def _all_rows(self) -> list[dict[str, Any]]:
        return [{EMBEDDING: e, TOKENS: t} for e, t in zip(self.embeddings.tolist(), self.tokens.tolist())]


class EmbedPost:
    """The post-processing of ``post: {kind: embedding}``: the pooled outputs -> EmbeddingAnswers."""

    output_names = [EMBEDDING, TOKENS]

    def __call__(self, outputs: Sequence[np.ndarray], top_k: int | None = None) -> EmbeddingAnswers:
        return EmbeddingAnswers(outputs[0], outputs[1])


class EmbeddingModel(Model):
    """A ``task: embedding`` model: the encoder's runtime wrapped in ``Pooled``; otherwise a Model like any other."""

    def __init__(self, name: str, version: int, config: ModelConfig, folder: Path, runtime: Runtime | None = None):
        file = str(folder / "model.yaml")
        post = config.post
        if not isinstance(post, EmbeddingPost):
            raise ModelConfigError(file, "post.kind", f"task: embedding pools its output with post kind 'embedding', "
                                   f"got '{getattr(post, 'kind', post)}'", "use post: {kind: embedding} or leave "
                                   "post out")  # fmt: skip
        inner = runtime if runtime is not None else open_runtime(config, folder, version)
        try:
            pooled = Pooled(inner, post, file, getattr(config.pre, "attention_mask", None))
        except BaseException:
            inner.close()
            raise
        super().__init__(name, version, config, folder, pooled)

    @property
    def dimensions(self) -> int:
        """The length of one embedding."""
        return int(self.outputs[0].shape[-1])

    @property
    def tokenizer(self) -> Any:
        """The text pre-processing's tokenizer (a ``tokenizers.Tokenizer``), or None when the model takes raw
        strings or tensors."""
        return getattr(self.pre, "tokenizer", None)

"""Post-processing declared in model.yaml: output tensors -> answers.

Classification and regression return an Answers sequence (columns, rows built on access);
classification gives, per row::

    {"label": "benign", "probability": 0.98, "top_k": [{"label": "benign", "probability": 0.98}, ...]}

regression ``{"value": 151.2, "low": 98.0, "high": 204.4, "level": 0.9}`` (interval when configured),
passthrough the raw tensors ``{output name: array}``, embedding ``{"embedding": [...], "tokens": n}``
(task: embedding, forwardpass/embedding.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np

from forwardpass.config import ClassificationPost, PostConfig, RegressionPost
from forwardpass.errors import ModelLoadError
from forwardpass.pipeline.answers import ClassificationAnswers, RegressionAnswers
from forwardpass.runtime.base import TensorInfo


class Postprocessor(Protocol):
    """Output tensors -> answers; ``output_names`` says which outputs to compute."""

    @property
    def output_names(self) -> list[str] | None:  # read-only here, so that list[str] in a kind conforms
        ...

    def __call__(self, outputs: Sequence[np.ndarray], top_k: int | None = None) -> Any:
        """Answers for the batch: a list with one entry per row, or raw tensors for passthrough."""
        ...


def _float_output(outputs: Sequence[TensorInfo], wanted: str | None, preferred: str, file: str) -> TensorInfo:
    by_name = {o.name: o for o in outputs}
    if wanted is not None:
        if wanted not in by_name:
            raise ModelLoadError(f"{file}: post.output '{wanted}' is not a model output; outputs: {list(by_name)}")
        return by_name[wanted]
    if preferred in by_name:
        return by_name[preferred]
    floats = [o for o in outputs if o.datatype in ("FP32", "FP64", "FP16")]
    if not floats:
        raise ModelLoadError(f"{file}: no float output to post-process; outputs: {list(by_name)}")
    return floats[-1]


def softmax(x: np.ndarray) -> np.ndarray:
    """Row-wise softmax, stable for large logits."""
    z = x - x.max(axis=1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=1, keepdims=True)
    return z


class Classify:
    """Probabilities (or logits) [N, C] -> label, probability and top-k labels."""

    def __init__(self, config: ClassificationPost, outputs: Sequence[TensorInfo], labels: list[str] | None, file: str):
        out = _float_output(outputs, config.output, "probabilities", file)
        classes = out.shape[-1] if out.shape else -1
        if labels is not None and classes not in (-1, len(labels)):
            raise ModelLoadError(f"{file}: {len(labels)} labels, but output '{out.name}' has {classes} classes")
        if config.threshold is not None and (labels is not None and len(labels) != 2 or classes not in (-1, 2)):
            raise ModelLoadError(f"{file}: post.threshold applies to binary classifiers only (2 classes)")
        self.output_names = [out.name]
        self.config = config
        self.labels = labels
        self._logits, self._top_k, self._threshold = config.logits, config.top_k, config.threshold
        self._label_lists: dict[int, tuple[np.ndarray, list[str]]] = {}  # n classes -> (array, list)

    def __call__(self, outputs: Sequence[np.ndarray], top_k: int | None = None) -> ClassificationAnswers:
        probs = outputs[0]
        if self._logits or probs.ndim != 2:
            probs = probs.reshape(len(probs), -1)
            probs = softmax(probs.astype(np.float32)) if self._logits else probs
        n_classes = probs.shape[1]
        labels = self._label_lists.get(n_classes)
        if labels is None:  # built once: numpy calls are dear beside a 20 us forward pass
            names = self.labels or [str(c) for c in range(n_classes)]
            labels = self._label_lists[n_classes] = (np.asarray(names), list(names))
        k = top_k or self._top_k
        return ClassificationAnswers(probs, labels[0], labels[1], k if k < n_classes else n_classes, self._threshold)


class Regress:
    """Values [N] or [N, 1] -> value, with an interval from conformal calibration or quantile outputs."""

    def __init__(self, config: RegressionPost, outputs: Sequence[TensorInfo], file: str):
        value = _float_output(outputs, config.output, "variable", file)
        self.output_names = [value.name]
        self.interval = config.interval
        if self.interval is not None and self.interval.low is not None:
            names = {o.name for o in outputs}
            low, high = self.interval.low, self.interval.high
            for name in (low, high):
                if name not in names:
                    raise ModelLoadError(f"{file}: interval output '{name}' is not a model output: {sorted(names)}")
            assert high is not None  # the interval config sets both bounds or neither
            self.output_names += [low, high]

    def __call__(self, outputs: Sequence[np.ndarray], top_k: int | None = None) -> RegressionAnswers:
        values = outputs[0].reshape(len(outputs[0]), -1)[:, 0].astype(np.float64)
        if self.interval is None:
            return RegressionAnswers(values, None, None, None)
        if self.interval.conformal is not None:
            low, high = values - self.interval.conformal, values + self.interval.conformal
        else:
            low, high = (o.reshape(len(o), -1)[:, 0].astype(np.float64) for o in outputs[1:3])
        return RegressionAnswers(values, low, high, self.interval.level)


class Passthrough:
    """All outputs, as named numpy arrays for the whole batch."""

    def __init__(self, outputs: Sequence[TensorInfo]):
        self.output_names = None
        self.names = [o.name for o in outputs]

    def __call__(self, outputs: Sequence[np.ndarray], top_k: int | None = None) -> dict[str, np.ndarray]:
        return dict(zip(self.names, outputs))


def build_post(
    config: PostConfig, outputs: Sequence[TensorInfo], labels: list[str] | None, file: str
) -> Postprocessor:
    """The post-processor model.yaml declares, checked against the model's outputs."""
    builders: dict[str, Callable[[], Postprocessor]] = {
        "classification": lambda: Classify(config, outputs, labels, file),  # type: ignore[arg-type]
        "regression": lambda: Regress(config, outputs, file),  # type: ignore[arg-type]
        "passthrough": lambda: Passthrough(outputs),
        "embedding": lambda: _embedding(outputs, file),
    }
    return builders[config.kind]()


def _embedding(outputs: Sequence[TensorInfo], file: str) -> Postprocessor:
    """The pooled vectors as answers; the pooling itself runs in the forward pass (forwardpass/embedding.py)."""
    from forwardpass.embedding import EMBEDDING, TOKENS, EmbedPost  # embedding.py imports the model, which imports this

    if [o.name for o in outputs] != [EMBEDDING, TOKENS]:
        raise ModelLoadError(f"{file}: post kind 'embedding' answers the vectors of a task: embedding model (its "
                             "runtime pools the encoder's output); set task: embedding")  # fmt: skip
    return EmbedPost()

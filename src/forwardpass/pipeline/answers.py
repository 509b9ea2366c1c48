"""Answers for a batch, kept as columns; each row becomes a dict only when it is read.

Post-processing a 64-row batch of a 0.03 ms model into 64 dicts would cost more than the
forward pass itself, so a batch's answers stay numpy columns until someone looks::

    answers = model.predict(rows)          # ClassificationAnswers, a Sequence of dicts
    answers[0]                             # {'label': 'benign', 'probability': 0.98, 'top_k': [...]}
    answers.columns()                      # {'label': array([...]), 'probability': array([...])}
    answers == [{...}, ...]                # compares as a list
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Iterator, Sequence
from functools import cached_property
from typing import Any

import numpy as np


class Answers(Sequence[dict[str, Any]]):
    """A batch of answers; rows are materialized on access and cached."""

    def __init__(self, n: int):
        self._n = n
        self._rows: list[dict[str, Any]] | None = None

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return self.to_list()[index]
        if self._rows is not None:
            return self._rows[index]
        if index < 0:
            index += self._n
        if not 0 <= index < self._n:
            raise IndexError(index)
        return self._row(index)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.to_list())

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (Answers, list, tuple)):
            return self.to_list() == list(other)
        return NotImplemented

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.to_list()!r})"

    def to_list(self) -> list[dict[str, Any]]:
        """Every row as a dict (JSON-ready: Python floats and strings)."""
        if self._rows is None:
            self._rows = self._all_rows()
        return self._rows

    @abstractmethod
    def columns(self) -> dict[str, np.ndarray]:
        """The answers as named numpy columns, one entry per row."""

    def _row(self, i: int) -> dict[str, Any]:
        return self.to_list()[i]

    def _all_rows(self) -> list[dict[str, Any]]:
        return [self._row(i) for i in range(self._n)]


class ClassificationAnswers(Answers):
    """label, probability and top_k per row, from a [N, C] probability matrix."""

    def __init__(self, probs: np.ndarray, labels: np.ndarray, label_list: list[str], k: int, threshold: float | None):
        self._n, self._rows = len(probs), None  # Answers.__init__ inlined: this runs once per request
        self.probabilities = probs
        self._labels = labels  # numpy array of str, for vectorized take()
        self._label_list = label_list
        self._k = k
        self._threshold = threshold

    @property
    def class_names(self) -> list[str]:
        """The label of each class index, in the model's order."""
        return self._label_list

    def labels_of(self, classes: np.ndarray) -> np.ndarray:
        """The labels of an array of class indices, in its shape (a numpy array of str)::

            order = np.argsort(-answers.probabilities, axis=1)[:, :3]
            answers.labels_of(order)            # [N, 3] labels, best first
        """
        return self._labels[classes]

    @cached_property
    def best(self) -> np.ndarray:
        """Chosen class index per row (argmax, or the binary threshold)."""
        if self._threshold is None:
            return self.probabilities.argmax(axis=1)
        return (self.probabilities[:, 1] >= self._threshold).astype(np.intp)

    def columns(self) -> dict[str, np.ndarray]:
        best = self.best
        return {
            "label": self._labels[best],
            "probability": self.probabilities[np.arange(self._n), best],
        }

    def _row(self, i: int) -> dict[str, Any]:
        # one row: a Python sort of C floats beats numpy's per-call overhead for the class counts
        # classifiers have; sorted(reverse=True) is stable, like argsort(-p, kind="stable") below
        row = self.probabilities[i].tolist()
        top = sorted(range(len(row)), key=row.__getitem__, reverse=True)[: self._k]
        best = top[0] if self._threshold is None else int(row[1] >= self._threshold)
        return self._answer(row, top, best)

    def _all_rows(self) -> list[dict[str, Any]]:
        order = np.argsort(-self.probabilities, axis=1, kind="stable")[:, : self._k].tolist()
        rows = self.probabilities.tolist()  # python floats once, not per element
        best = [top[0] for top in order] if self._threshold is None else self.best.tolist()
        return [self._answer(r, t, b) for r, t, b in zip(rows, order, best)]

    def _answer(self, row: list[float], top: list[int], best: int) -> dict[str, Any]:
        labels = self._label_list
        return {
            "label": labels[best],
            "probability": row[best],
            "top_k": [{"label": labels[c], "probability": row[c]} for c in top],
        }


class RegressionAnswers(Answers):
    """value per row, with low/high/level when the model has an interval."""

    def __init__(self, values: np.ndarray, low: np.ndarray | None, high: np.ndarray | None, level: float | None):
        super().__init__(len(values))
        self.values, self.low, self.high, self.level = values, low, high, level

    def columns(self) -> dict[str, np.ndarray]:
        cols = {"value": self.values}
        if self.low is not None and self.high is not None:
            cols.update(low=self.low, high=self.high, level=np.full(self._n, self.level))
        return cols

    def _all_rows(self) -> list[dict[str, Any]]:
        if self.low is None or self.high is None:
            return [{"value": v} for v in self.values.tolist()]
        level = self.level
        return [
            {"value": v, "low": lo, "high": hi, "level": level}
            for v, lo, hi in zip(self.values.tolist(), self.low.tolist(), self.high.tolist())
        ]

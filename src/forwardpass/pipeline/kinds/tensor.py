"""``pre: {kind: tensor}`` (the default): no pre-processing; instances are rows of the model's input tensors.

    model.predict(np.zeros((8, 4), np.float32))    # tensors go straight to the model (Model.predict)
    model.predict([[0.1, 0.2, 0.3, 0.4]])          # instances: one row each, stacked into the batch
    model.predict([{"ids": [1, 2], "mask": [1, 1]}])  # several inputs: one mapping per instance

This is KServe's ``:predict`` row format ("instances"); V2 infer carries the tensors themselves. The
stacked tensors are checked like any other (Model.check: dtype, shape, NaN), so a bad row gets the
error V2 gives for the same tensor.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from forwardpass.config import PreOptions, TensorSpec
from forwardpass.errors import InvalidInput
from forwardpass.pipeline.pre import Plan, Preprocessor, some

INLINE_ELEMENTS = 20_000  # numbers stacked on the event loop: ~0.3 ms of np.asarray over nested lists


class TensorPre(PreOptions):
    """No pre-processing: requests carry the model's input tensors (or rows of them)."""

    kind: Literal["tensor"] = "tensor"


class NoPre(Preprocessor):
    """Instances are rows of the inputs: a nested list per row (one input), or a mapping of input name to row."""

    schema = TensorPre

    def __init__(self, config: PreOptions, specs: Sequence[TensorSpec], folder: Path):
        super().__init__(config, specs, folder)
        self.specs = list(specs)
        self._batched = all(s.shape[:1] == [-1] for s in self.specs)

    def is_single(self, data: Any) -> bool:
        if isinstance(data, Mapping):
            return True
        if isinstance(data, (list, tuple)) and data and isinstance(data[0], Mapping):
            return False  # a list of mappings: instances
        one = self.specs[0] if len(self.specs) == 1 else None
        return one is not None and _depth(data) == len(one.shape) - 1

    def plan(self, instances: Sequence[Any]) -> Plan:
        some(instances)
        if not self._batched and len(instances) != 1:
            raise InvalidInput(("instances",), f"this model takes no batch dimension: send one instance, got "
                               f"{len(instances)}")  # fmt: skip
        columns = {s.name: [self._value(i, s, item) for i, item in enumerate(instances)] for s in self.specs}
        cost = len(instances) * max(1, _width(columns[self.specs[0].name][0]))
        return Plan(cost, "elements", cost > INLINE_ELEMENTS, lambda: self._stack(columns))

    def _value(self, i: int, spec: TensorSpec, item: Any) -> Any:
        if isinstance(item, Mapping):
            names = [s.name for s in self.specs]
            unknown = [k for k in item if k not in names]
            if unknown:
                raise InvalidInput(("instances", i, str(unknown[0])), f"unknown input; the model takes {names}")
            if spec.name not in item:
                raise InvalidInput(("instances", i, spec.name), "missing input")
            return item[spec.name]
        if len(self.specs) != 1:
            raise InvalidInput(("instances", i), f"the model takes {len(self.specs)} inputs "
                               f"{[s.name for s in self.specs]}: send a mapping of input name to value",
                               type(item).__name__)  # fmt: skip
        return item

    def _stack(self, columns: dict[str, list[Any]]) -> dict[str, np.ndarray]:
        feeds = {}
        for spec in self.specs:
            rows = columns[spec.name]
            want = spec.shape[1:] if self._batched else spec.shape  # one row's shape (-1: any size)
            try:
                array = np.array(rows, dtype=object if spec.datatype == "BYTES" else None)
            except (ValueError, TypeError):  # rows of different shapes
                array = None
            if array is None or not _fits(array.shape[1:], want):
                i, shape = next(((i, np.shape(r)) for i, r in enumerate(rows) if not _fits(np.shape(r), want)),
                                (0, np.shape(rows[0])))  # fmt: skip
                where = ("instances", i) if len(self.specs) == 1 else ("instances", i, spec.name)
                raise InvalidInput(where, f"expected shape {want} for input '{spec.name}' (-1: any size), got "
                                   f"{list(shape)}")  # fmt: skip
            feeds[spec.name] = array if self._batched else array[0]
        return feeds


def _fits(shape: Sequence[int], want: Sequence[int]) -> bool:
    return len(shape) == len(want) and all(w == -1 or w == d for d, w in zip(shape, want))


def _depth(value: Any) -> int:
    """How deep lists nest at the front of ``value`` (0 for a number)."""
    depth = 0
    while isinstance(value, (list, tuple)) and value:
        value, depth = value[0], depth + 1
    return depth


def _width(row: Any) -> int:
    """A cheap estimate of one row's element count: the product of the sizes along its first elements."""
    count = 1
    while isinstance(row, (list, tuple)) and row:
        count, row = count * len(row), row[0]
    return count

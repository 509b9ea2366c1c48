"""``pre: {kind: tabular}``: rows of named features (JSON objects, CSV rows, Arrow tables) -> one [N, F] tensor.

    pre = build_pre(TabularPre(kind="tabular"), specs, folder)
    pre([{"f0": 1, "f1": "2.5"}])          # {"input": array([[1. , 2.5]], dtype=float32)}, in declared order
    pre.columns(table)                     # a pyarrow Table, column by column: Columns(feeds, errors per row)

Features a row leaves out take their declared ``default``; a name the model does not know is refused
with the closest known one.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from forwardpass._deps import require
from forwardpass.config import PreOptions
from forwardpass.errors import InvalidInput, ModelConfigError
from forwardpass.pipeline.pre import Columns, Plan, Preprocessor, pick_input
from forwardpass.tensors import to_numpy

if TYPE_CHECKING:
    from forwardpass.config import TensorSpec

# A 30-feature row costs 0.02 ms: below this many cells the work costs less than a hop to a thread
INLINE_CELLS = 2000

_MISSING = object()


class TabularPre(PreOptions):
    """Rows as objects of named features (JSON, CSV) -> one [N, F] tensor in declared order."""

    kind: Literal["tabular"]
    input: str | None = None  # defaults to the only input that declares features

    def check_inputs(self, inputs: list[TensorSpec] | None) -> None:
        super().check_inputs(inputs)
        if inputs is not None and not any(s.features for s in inputs):
            raise ValueError("tabular pre-processing needs an input that lists its 'features'")


class Tabular(Preprocessor):
    """Rows as {feature: value} (or a list in feature order) -> one [N, F] tensor in declared order."""

    schema = TabularPre

    def __init__(self, config: TabularPre, specs: Sequence[TensorSpec], folder: Path):
        super().__init__(config, specs, folder)
        spec = pick_input(specs, config.input, "tabular", lambda s: bool(s.features))
        if not spec.features:
            raise ModelConfigError("model.yaml", "inputs", f"input '{spec.name}' lists no features", "add 'features'")
        self.input = spec.name
        self.features = [f.name for f in spec.features]
        self.defaults = [f.default for f in spec.features]
        self.allow_nan = spec.allow_nan
        self.dtype = to_numpy(spec.datatype)
        self._known = set(self.features)

    def is_single(self, data: Any) -> bool:
        if isinstance(data, Mapping):
            return True
        return isinstance(data, (list, tuple)) and bool(data) and not isinstance(data[0], (Mapping, list, tuple))

    def plan(self, instances: Sequence[Any]) -> Plan:
        cells = len(instances) * len(self.features)
        return Plan(cells, "cells", cells > INLINE_CELLS, lambda: self._rows(instances))

    def read_row(self, row: Mapping[str, Any]) -> Any:
        """The row's features (other columns, such as ids, are not features)."""
        return {k: v for k, v in row.items() if k in self._known}

    def required_columns(self) -> list[str]:
        """Features without a default: a table without one of them has no row to predict."""
        return [name for name, default in zip(self.features, self.defaults) if default is None]

    def columns(self, table: Any) -> Columns:
        """A pyarrow Table -> the [N, F] feature matrix, column by column (no per-row Python unless a column
        holds a bad cell); a bad cell, or a missing one without default, is an error for its row."""
        pa = require("pyarrow", "batch", "batch inference")
        pc = require("pyarrow.compute", "batch", "batch inference")
        n = table.num_rows
        errors: dict[int, str] = {}
        matrix = np.empty((n, len(self.features)), dtype=np.float64)
        for j, name in enumerate(self.features):
            if name not in table.column_names:
                if self.defaults[j] is None:
                    for i in range(n):
                        errors.setdefault(i, f"{name}: missing feature (no default declared)")
                    continue
                matrix[:, j] = self.defaults[j]
                continue
            column = table.column(name)
            try:
                values = pc.cast(column, pa.float64()).to_numpy(zero_copy_only=False)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                values = _cells(column.to_pylist(), name, errors)
            if column.null_count:  # a null is NaN once cast: a missing cell, or a NaN of the file's own
                for i in np.flatnonzero(np.isnan(values)).tolist():
                    if column[i].as_py() is None:
                        if self.defaults[j] is None:
                            errors.setdefault(i, f"{name}: missing feature (no default declared)")
                        else:
                            values[i] = self.defaults[j]
            if not self.allow_nan:
                for i in np.flatnonzero(~np.isfinite(values)).tolist():
                    errors.setdefault(i, f"{name}: expected a finite number (got {values[i]!r})")
            matrix[:, j] = values
        return Columns({self.input: matrix.astype(self.dtype, copy=False)}, errors)

    def _rows(self, instances: Sequence[Any]) -> dict[str, np.ndarray]:
        out = np.empty((len(instances), len(self.features)), dtype=np.float64)
        for i, row in enumerate(instances):
            if isinstance(row, Mapping):
                self._check_names(i, row)
                values = [row.get(name, _MISSING) for name in self.features]
            elif isinstance(row, (list, tuple)):
                if len(row) != len(self.features):
                    raise InvalidInput(("instances", i), f"expected {len(self.features)} values in feature order, "
                                       f"got {len(row)}")  # fmt: skip
                values = list(row)
            else:
                raise InvalidInput(("instances", i), "expected an object of named features", row)
            out[i] = [self._number(i, j, v) for j, v in enumerate(values)]
        with np.errstate(over="ignore"):  # 1e308 as float32 is inf, which the finite check then refuses, by name
            return {self.input: out.astype(self.dtype, copy=False)}

    def _check_names(self, i: int, row: Mapping[str, Any]) -> None:
        unknown = [k for k in row if k not in self._known]
        if unknown:
            close = difflib.get_close_matches(str(unknown[0]), self.features, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f"; known features: {self.features}"
            raise InvalidInput(("instances", i, str(unknown[0])), f"unknown feature{hint}", row[unknown[0]])

    def _number(self, i: int, j: int, value: Any) -> float:
        if value is _MISSING or value is None or value == "":
            default = self.defaults[j]
            if default is None:
                raise InvalidInput(("instances", i, self.features[j]), "missing feature (no default declared)")
            return default
        if isinstance(value, (int, float)):  # bool is an int: a flag feature as 0/1
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value.strip())
            except ValueError:
                raise InvalidInput(("instances", i, self.features[j]), "expected a number", value) from None
        else:
            raise InvalidInput(("instances", i, self.features[j]), "expected a number", value)
        if not self.allow_nan and not math.isfinite(number):
            raise InvalidInput(("instances", i, self.features[j]), "expected a finite number", value)
        return number


def _cells(cells: list[Any], name: str, errors: dict[int, str]) -> np.ndarray:
    """A column Arrow cannot cast (strings with a bad cell, mixed types) -> float64, cell by cell."""
    out = np.empty(len(cells), dtype=np.float64)
    for i, cell in enumerate(cells):
        if cell is None or cell == "":
            out[i] = math.nan
            continue
        try:
            out[i] = float(cell.strip() if isinstance(cell, str) else cell)
        except (TypeError, ValueError):
            errors.setdefault(i, f"{name}: expected a number (got {cell!r})")
            out[i] = 0.0
    return out

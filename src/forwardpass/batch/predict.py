"""One chunk of input rows -> an output table plus per-row errors; used by the local and the Ray engine.

A bad row (a cell that is not a number, a missing feature without default, an unreadable image, a
line that is not JSON) becomes an error record ``{"row", <id columns>, "error"}`` and the other rows
carry on. A table goes to the model's pre-processing kind as a column batch when the kind reads one
(tabular: the feature matrix column by column with pyarrow, no per-row Python unless a column holds a
bad cell); otherwise each row is read into an instance by the kind (``read_row``), and kinds that say
``per_instance`` (images, audio) are pre-processed one by one, so one broken file costs only itself.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from forwardpass._deps import require
from forwardpass.batch.io import Chunk
from forwardpass.errors import ForwardpassError, InvalidInput, format_loc
from forwardpass.pipeline.answers import ClassificationAnswers


@dataclass
class Prepared:
    """A chunk made ready for the forward pass: input tensors for the ``kept`` rows, errors for the rest."""

    chunk: Chunk
    feeds: dict[str, np.ndarray]
    kept: np.ndarray
    errors: dict[int, str]


class ChunkPredictor:
    """Holds a loaded Model; ``predict(chunk)`` -> (pyarrow Table, error records)."""

    def __init__(self, model: Any, *, id_columns: list[str] | None = None, batch_size: int = 1024, top_k: int = 0):
        self.model, self.id_columns, self.batch_size, self.top_k = model, id_columns or [], batch_size, top_k
        self.pa = require("pyarrow", "batch", "batch inference")

    def predict(self, chunk: Chunk) -> tuple[Any, list[dict[str, Any]]]:
        return self.finish(self.prepare(chunk))

    def prepare(self, chunk: Chunk) -> Prepared:
        """Decode and pre-process: the part that can run while the previous chunk is in the forward pass."""
        errors: dict[int, str] = dict(chunk.bad)
        if isinstance(chunk.data, list):
            feeds, kept = self._rows(chunk.data, errors)
        else:
            feeds, kept = self._table(chunk.data, errors)
        return Prepared(chunk, feeds, np.asarray(kept, dtype=np.int64), errors)

    def finish(self, prepared: Prepared) -> tuple[Any, list[dict[str, Any]]]:
        """The forward pass and post-processing -> (output table, error records)."""
        chunk, feeds, kept, errors = prepared.chunk, prepared.feeds, prepared.kept, prepared.errors
        n = len(chunk)
        predictions: dict[str, Any] = {}
        if len(kept):
            predictions, refused = self._forward(feeds, len(kept))
            if refused:  # rows the model itself refused (a token id past its vocabulary): errors, like any bad row
                for position, why in refused.items():
                    errors[int(kept[position])] = why
                kept = np.delete(kept, list(refused))
        columns: dict[str, Any] = {"row": kept + chunk.start}
        for name in self.id_columns:
            columns[name] = self._ids(chunk, name, kept)
        columns.update(predictions)
        records = [{"row": chunk.start + i, **{c: self._id(chunk, c, i) for c in self.id_columns}, "error": errors[i]}
                   for i in sorted(errors) if i < n]  # fmt: skip
        return self.pa.table(columns), records

    # -- inputs -> feeds ---------------------------------------------------------------------------

    def _table(self, table: Any, errors: dict[int, str]) -> tuple[dict[str, np.ndarray], Any]:
        tensor = _tensor_spec(self.model)
        if tensor is not None and tensor.name in table.column_names:
            return self._tensor_column(table.column(tensor.name), tensor, errors)
        read = self.model.pre.columns(table)  # a kind that reads a column batch (tabular: vectorized)
        if read is None:
            return self._rows(table.to_pylist(), errors)
        for i, why in read.errors.items():  # a row the reader already refused keeps its first error
            errors.setdefault(i, why)
        kept = _kept(table.num_rows, errors)
        if len(kept) == table.num_rows:
            return read.feeds, kept
        return {name: values[kept] for name, values in read.feeds.items()}, kept

    def _tensor_column(self, column: Any, spec: Any, errors: dict[int, str]) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """A list<number> column -> the [N, F] input tensor, no pre-processing; wrong lengths and nulls are row errors."""
        pc = require("pyarrow.compute", "batch", "batch inference")
        width = spec.shape[1]
        if not self.pa.types.is_list(column.type) and not self.pa.types.is_fixed_size_list(column.type) \
                and not self.pa.types.is_large_list(column.type):  # fmt: skip
            raise InvalidInput(("input", spec.name), f"expected a list column of {width} numbers", str(column.type))
        lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
        good = ~np.isnan(lengths.astype(np.float64)) & (np.nan_to_num(lengths, nan=-1) == width)
        for i in np.flatnonzero(~good):
            errors.setdefault(int(i), f"{spec.name}: expected {width} numbers (got {column[int(i)].as_py()!r:.60})")
        kept = _kept(len(column), errors)
        values = pc.list_flatten(column if good.all() else column.filter(self.pa.array(good)))
        values = values.to_numpy(zero_copy_only=False)
        matrix = values.astype(np.float32 if spec.datatype == "FP32" else np.float64, copy=False).reshape(-1, width)
        if len(kept) != len(matrix):  # rows bad for another reason already: keep only the kept ones
            matrix = matrix[np.isin(np.flatnonzero(good), kept)]
        return {spec.name: matrix}, kept

    def _rows(self, rows: list[Any], errors: dict[int, str]) -> tuple[dict[str, np.ndarray], list[int]]:
        model = self.model
        pre = model.pre
        items = [(i, pre.read_row(row)) for i, row in enumerate(rows) if i not in errors and row is not None]
        if pre.per_instance:  # one at a time: decoding dominates, and a bad file costs only itself
            return self._one_by_one(items, errors, refusals=ForwardpassError)
        while items:  # the whole chunk at once; a bad row is taken out and the rest tried again
            try:
                return model.prepare([item for _, item in items]), [i for i, _ in items]
            except InvalidInput as exc:
                if len(exc.loc) < 2 or exc.loc[0] != "instances" or not isinstance(exc.loc[1], int):
                    return self._one_by_one(items, errors)  # a tensor the rows make together is refused
                bad = items.pop(exc.loc[1])[0]
                errors[bad] = message(exc)
        return {}, []

    def _one_by_one(self, items: list[tuple[int, Any]], errors: dict[int, str],
                    refusals: type[ForwardpassError] = InvalidInput) -> tuple[dict[str, np.ndarray], list[int]]:  # fmt: skip
        """Each row pre-processed alone: a bad file costs only itself, and a refusal of the stacked tensor lands on
        the rows that caused it; ``refusals`` are the errors that fail a row rather than the chunk."""
        parts, kept = [], []
        for i, item in items:
            try:
                parts.append(self.model.prepare([item]))
                kept.append(i)
            except refusals as exc:
                errors[i] = message(exc)
        return ({k: np.concatenate([p[k] for p in parts]) for k in parts[0]} if parts else {}), kept

    # -- feeds -> prediction columns ---------------------------------------------------------------

    def _forward(self, feeds: dict[str, np.ndarray], n: int) -> tuple[dict[str, Any], dict[int, str]]:
        """Prediction columns for the rows the model answers, and errors (by position) for those it refuses."""
        parts: list[dict[str, Any]] = []
        refused: dict[int, str] = {}
        label_list = None
        for answers in self._answers(feeds, n, refused):
            if isinstance(answers, ClassificationAnswers):  # class indices now, label strings once per chunk
                best, label_list = answers.best, answers.class_names
                cols = {"label": best, "probability": answers.probabilities[np.arange(len(best)), best]}
            elif isinstance(answers, dict):  # no post-processing: the output tensors, a row each
                cols = {name: array.tolist() if array.ndim > 1 else array for name, array in answers.items()}
            else:
                cols = dict(answers.columns())
            if self.top_k > 1 and isinstance(answers, ClassificationAnswers):
                order = np.argsort(-answers.probabilities, axis=1, kind="stable")[:, : self.top_k]
                cols["top_labels"] = answers.labels_of(order).tolist()
                cols["top_probabilities"] = np.take_along_axis(answers.probabilities, order, axis=1).tolist()
            parts.append(cols)
        out: dict[str, Any] = {}
        for name in parts[0] if parts else ():
            values = [p[name] for p in parts]
            out[name] = np.concatenate(values) if isinstance(values[0], np.ndarray) else [v for p in values for v in p]
        if label_list is not None:  # an Arrow take from the class names: no numpy str array, no per-row objects
            out["label"] = self.pa.array(label_list, self.pa.string()).take(out["label"])
        return out, refused

    def _answers(self, feeds: dict[str, np.ndarray], n: int, refused: dict[int, str]) -> Iterator[Any]:
        """Answers per batch; a batch the model refuses is run row by row, and the rows it refuses recorded."""
        for start in range(0, n, self.batch_size):
            batch = {k: v[start : start + self.batch_size] for k, v in feeds.items()}
            try:
                yield self.model.predict(batch)
                continue
            except InvalidInput:
                if len(next(iter(batch.values()))) == 1:
                    raise
            for row in range(start, min(n, start + self.batch_size)):
                try:
                    yield self.model.predict({k: v[row : row + 1] for k, v in feeds.items()})
                except InvalidInput as exc:
                    refused[row] = message(exc)

    # -- ids --------------------------------------------------------------------------------------

    def _ids(self, chunk: Chunk, name: str, kept: np.ndarray) -> Any:
        if isinstance(chunk.data, list):
            return [None if chunk.data[i] is None else chunk.data[i].get(name) for i in kept.tolist()]
        if name not in chunk.data.column_names:
            raise InvalidInput(("id_column",), f"no column '{name}' in the input; columns: {chunk.data.column_names}")
        column = chunk.data.column(name)
        return column if len(kept) == len(column) else column.take(self.pa.array(kept))

    @staticmethod
    def _id(chunk: Chunk, name: str, i: int) -> Any:
        if isinstance(chunk.data, list):
            return None if chunk.data[i] is None else chunk.data[i].get(name)
        return chunk.data.column(name)[i].as_py() if name in chunk.data.column_names else None


def missing_columns(model: Any, columns: list[str]) -> list[str]:
    """Columns a table input (Parquet, a CSV header) lacks that the model's pre-processing needs.

    [] when a tensor column named after the model's input feeds it directly, or when its kind reads no
    named columns (images, text, audio). Checked once before the job starts, so a file without a needed
    column is one error, not every row failed.
    """
    tensor = _tensor_spec(model)
    if tensor is not None and tensor.name in columns:
        return []
    have = set(columns)
    return [name for name in model.pre.required_columns() if name not in have]


def check_columns(model: Any, path: str, columns: list[str], id_columns: list[str]) -> None:
    """Before any work: a table input must have every feature column without a default, and the id columns."""
    if not columns:  # not a table with a schema (JSONL, images, prompts): rows are checked one by one
        return
    shown = ", ".join(repr(c) for c in columns[:12]) + (f", ... ({len(columns)} columns)" if len(columns) > 12 else "")
    missing = missing_columns(model, columns)
    if missing:
        names = ", ".join(repr(m) for m in missing)
        raise InvalidInput(("input",), f"{path} has no column {names}: model '{model.name}' reads "
                           f"{'it as a feature' if len(missing) == 1 else 'them as features'} and declares no "
                           f"default; the file has {shown}; add the column, or give the feature a default in "
                           "the model's model.yaml")  # fmt: skip
    for name in id_columns:
        if name not in columns:
            raise InvalidInput(("id_column",), f"{path} has no column '{name}' to carry into the output; the file "
                               f"has {shown}")  # fmt: skip


def _tensor_spec(model: Any) -> Any:
    """The model's one input when it is a [-1, F] tensor: a list column of that name feeds it directly."""
    inputs = model.inputs
    if len(inputs) == 1 and len(inputs[0].shape) == 2 and inputs[0].shape[1] > 0:
        return inputs[0]
    return None


def _kept(n: int, errors: dict[int, str]) -> np.ndarray:
    """Row indices 0..n-1 that have no error, ascending."""
    if not errors:
        return np.arange(n, dtype=np.int64)
    return np.setdiff1d(np.arange(n, dtype=np.int64), np.fromiter(errors, dtype=np.int64, count=len(errors)))


def message(exc: ForwardpassError) -> str:
    """The error without its 'instances[i]' part (the row is its own field in the errors file)."""
    if isinstance(exc, InvalidInput):
        loc = exc.loc[2:] if len(exc.loc) >= 2 and exc.loc[0] == "instances" and isinstance(exc.loc[1], int) else exc.loc
        where = format_loc(loc)
        got = "" if exc.input is InvalidInput._MISSING else f" (got {exc.input!r:.80})"
        return f"{where}: {exc.msg}{got}" if where else f"{exc.msg}{got}"
    return exc.message

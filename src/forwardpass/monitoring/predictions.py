"""The prediction log, and a model's quality once the true answers arrive.

**The log** keeps a sample of served requests with their answers in Parquet files, for evaluation and
retraining. It is off unless model.yaml asks for it:

    prediction_log: {rate: 0.05}   # 5% of requests; also max_mb (256), rows_per_file (10000), flush_seconds (10)

A logged row is one instance: ``time``, ``id`` (the request's id: the server gives one to a request of a
logged model that came without, and returns it), ``row`` (its index in the request), ``model``, ``version``,
``key`` (the caller's key id), ``latency_ms``, ``inputs`` and ``outputs`` (JSON text), and the answer:
``prediction`` (a class label, as text) with ``class_index``, or ``value`` (regression). Serving
appends a sampled request to a list; one writer thread takes the list four times a second, turns it
into rows, and writes ``<state>/predictions/<model>/<UTC time>-<pid>-<n>.parquet`` once
``rows_per_file`` rows wait or the oldest has waited ``flush_seconds``, and on shutdown. A file
appears whole (written aside, then renamed); past ``max_mb`` the folder's oldest files are deleted.

**Feedback** (``POST /v2/models/{m}/feedback``) gives true labels for logged request ids. ``Quality.add``
finds the logged answers, keeps each label with whether the answer was right (classification) or its
absolute error (regression) in ``<state>/quality.sqlite``, keyed by (model, id, row) so that a label sent
twice counts once; ``Quality.series`` gives accuracy and mean absolute error per hour or day of the
predictions, and ``Quality.summary`` what /metrics exports.
"""

from __future__ import annotations

import base64
import logging
import os
import random
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from forwardpass._deps import require
from forwardpass.errors import InvalidInput, shown
from forwardpass.monitoring.usage import open_db

log = logging.getLogger("forwardpass.predictions")

MAX_FEEDBACK = 100_000  # labels in one feedback request


@dataclass(frozen=True)
class Answer:
    """The answer a model gave, read with its own post-processing (its output choice and threshold): what
    the client got is what the log keeps."""

    model: Any  # anything with Model's postprocess(outputs)

    def read(self, outputs: Mapping[str, np.ndarray], rows: int) -> tuple[list[str | None], list[int | None],
                                                                         list[float | None]]:  # fmt: skip
        """Per row: the predicted label, its class index, and the predicted value (None where not that kind)."""
        none: list[Any] = [None] * rows
        try:
            answers = self.model.postprocess(outputs)
        except Exception:  # a passthrough model, or outputs its post-processing cannot read: no answer column
            return none, none, none
        best = getattr(answers, "best", None)
        columns = answers.columns() if hasattr(answers, "columns") else {}
        if best is not None and "label" in columns and len(best) == rows:
            return [str(v) for v in columns["label"].tolist()], [int(i) for i in best.tolist()], none
        if "value" in columns and len(columns["value"]) == rows:
            return none, none, np.asarray(columns["value"], np.float64).reshape(rows, -1)[:, 0].tolist()
        return none, none, none


@dataclass
class _Pending:
    """A logged request, as serving handed it over (turned into rows by the writer thread)."""

    time: float
    id: str
    key: str | None
    latency_ms: float
    rows: int
    inputs: Mapping[str, np.ndarray] | list[Any]  # V2 tensors by name, or :predict instances
    outputs: Mapping[str, np.ndarray]


@dataclass
class PredictionLog:
    """One model's log (see the module docstring): ``sampled()`` on the request path, ``add`` to log one."""

    folder: Path
    model: str
    version: int
    answer: Answer
    rate: float
    max_bytes: int
    rows_per_file: int = 10_000
    flush_seconds: float = 10.0
    _rows: list[dict[str, Any]] = field(default_factory=list)
    _since: float = 0.0
    _files: int = 0
    written: int = 0  # rows written to files
    dropped: int = 0  # requests not logged because the writer was behind

    def sampled(self) -> bool:
        return self.rate >= 1.0 or random.random() < self.rate

    def add(self, request_id: str, key: str | None, latency_s: float, rows: int,
            inputs: Mapping[str, np.ndarray] | list[Any], outputs: Mapping[str, np.ndarray]) -> None:  # fmt: skip
        """Log one request (a list append: the writer thread does the rest)."""
        WRITER.submit(self, _Pending(time.time(), request_id, key, latency_s * 1000, rows, inputs, outputs))

    def flush(self) -> None:
        """Write what waits now, and return when it is on disk (feedback reads the files)."""
        WRITER.flush(self)

    # -- the writer thread's side ------------------------------------------------------------------

    def _take(self, entry: _Pending) -> None:
        predictions, classes, values = self.answer.read(entry.outputs, entry.rows)
        ins = _per_row(entry.inputs, entry.rows)
        outs = _per_row(entry.outputs, entry.rows)
        for r in range(entry.rows):
            self._rows.append({
                "time": entry.time, "id": entry.id, "row": r, "model": self.model, "version": self.version,
                "key": entry.key, "latency_ms": entry.latency_ms, "inputs": _json(ins[r]), "outputs": _json(outs[r]),
                "prediction": predictions[r], "class_index": classes[r], "value": values[r],
            })  # fmt: skip
        if len(self._rows) == entry.rows:
            self._since = time.monotonic()

    def _due(self, now: float) -> bool:
        return bool(self._rows) and (len(self._rows) >= self.rows_per_file or now - self._since >= self.flush_seconds)

    def _write(self) -> None:
        if not self._rows:
            return
        pa = require("pyarrow", "batch", "the prediction log's Parquet files")
        pq = require("pyarrow.parquet", "batch", "the prediction log's Parquet files")
        rows, self._rows = self._rows, []
        columns = {name: [r[name] for r in rows] for name in SCHEMA_FIELDS}
        columns["time"] = [int(t * 1_000_000) for t in columns["time"]]
        table = pa.table(columns, schema=schema())
        self.folder.mkdir(parents=True, exist_ok=True)
        self._files += 1
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(rows[0]["time"]))
        name = f"{stamp}.{int(rows[0]['time'] * 1e6) % 1_000_000:06d}Z-{os.getpid()}-{self._files}.parquet"
        aside = self.folder / f".{name}.tmp"  # hidden: readers of the folder skip it until it is whole
        try:
            pq.write_table(table, aside, compression="zstd")
            os.replace(aside, self.folder / name)
        finally:
            aside.unlink(missing_ok=True)
        self.written += len(rows)
        self._bound()

    def _bound(self) -> None:
        """Delete the oldest files until the folder is under max_bytes (the newest file always stays)."""
        files = sorted(self.folder.glob("*.parquet"))
        sizes = []
        for f in files:
            try:
                sizes.append(f.stat().st_size)
            except FileNotFoundError:  # another worker's bound took it
                sizes.append(0)
        total = sum(sizes)
        for f, size in zip(files[:-1], sizes[:-1]):
            if total <= self.max_bytes:
                break
            f.unlink(missing_ok=True)
            total -= size


SCHEMA_FIELDS = ("time", "id", "row", "model", "version", "key", "latency_ms", "inputs", "outputs", "prediction",
                 "class_index", "value")  # fmt: skip


def schema() -> Any:
    pa = require("pyarrow", "batch", "the prediction log's Parquet files")
    return pa.schema([
        ("time", pa.timestamp("us", tz="UTC")), ("id", pa.string()), ("row", pa.int32()), ("model", pa.string()),
        ("version", pa.int32()), ("key", pa.string()), ("latency_ms", pa.float64()), ("inputs", pa.string()),
        ("outputs", pa.string()), ("prediction", pa.string()), ("class_index", pa.int64()), ("value", pa.float64()),
    ])  # fmt: skip


def _nbytes(data: Mapping[str, np.ndarray] | list[Any]) -> int:
    if isinstance(data, list):
        return 64 * len(data)  # instances: JSON already in memory; counted by number
    return sum(a.nbytes for a in data.values() if isinstance(a, np.ndarray))


def _per_row(data: Mapping[str, np.ndarray] | list[Any], rows: int) -> list[Any]:
    """Row r of each tensor (a tensor without that many rows is kept whole on every row), or instance r."""
    if isinstance(data, list):
        return data
    out: list[dict[str, Any]] = [{} for _ in range(rows)]
    for name, array in data.items():
        split = isinstance(array, np.ndarray) and array.ndim > 0 and len(array) == rows
        for r in range(rows):
            out[r][name] = array[r] if split else array
    return out


def _plain(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (bytes, bytearray, memoryview)):
        raw = bytes(value)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return {"b64": base64.b64encode(raw).decode()}
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(type(value).__name__)


def _json(value: Any) -> str:
    if isinstance(value, dict):
        value = {k: _plain(v) if isinstance(v, (np.ndarray, np.generic)) else v for k, v in value.items()}
    return orjson.dumps(value, default=_plain, option=orjson.OPT_SERIALIZE_NUMPY).decode()


class _Writer:
    """One daemon thread writing every log of this process. Serving appends to a list (no thread woken per
    request); the thread takes the list every ``TICK`` seconds. Past ``depth`` requests waiting, requests are
    not logged (counted in ``dropped``)."""

    TICK = 0.25
    MAX_BYTES = 64 * 2**20  # the arrays of requests waiting, at most (an image model's are large)

    def __init__(self, depth: int = 4096):
        self.depth = depth
        self._pending: list[tuple[PredictionLog, _Pending]] = []
        self._pending_bytes = 0
        self._lock = threading.Lock()  # the pending list
        self._round_lock = threading.Lock()  # one round at a time: the thread's, or flush()'s
        self._logs: dict[int, PredictionLog] = {}  # logs with rows not yet in a file (held until written)
        self._thread: threading.Thread | None = None

    def submit(self, target: PredictionLog, entry: _Pending) -> None:
        size = _nbytes(entry.inputs) + _nbytes(entry.outputs)
        with self._lock:
            if len(self._pending) >= self.depth or self._pending_bytes + size > self.MAX_BYTES:
                target.dropped += 1
                return
            self._pending.append((target, entry))
            self._pending_bytes += size
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="forwardpass-predictions", daemon=True)
                self._thread.start()

    def flush(self, only: PredictionLog | None = None) -> None:
        """Everything submitted so far written to files, now: every log's (shutdown), or ``only``'s (feedback)."""
        self._round(every_log=only is None, also=only)

    def _run(self) -> None:
        while True:
            time.sleep(self.TICK)
            self._round(every_log=False)

    def _round(self, every_log: bool, also: PredictionLog | None = None) -> None:
        with self._round_lock:
            with self._lock:
                pending, self._pending, self._pending_bytes = self._pending, [], 0
            for target, entry in pending:
                self._logs[id(target)] = target
                try:
                    target._take(entry)
                except Exception:  # a request that cannot be logged must not stop the log
                    log.exception("prediction log: a request of %s could not be logged", target.model)
                if len(target._rows) >= target.rows_per_file:
                    self._write(target)
            del pending
            now = time.monotonic()
            for target in list(self._logs.values()):
                if every_log or target is also or target._due(now):
                    self._write(target)
            self._logs = {k: t for k, t in self._logs.items() if t._rows}


    @staticmethod
    def _write(target: PredictionLog) -> None:
        try:
            target._write()
        except Exception:
            target._rows.clear()  # dropped, not retried forever
            log.exception("prediction log: writing %s's file failed", target.model)


WRITER = _Writer()


def log_for(model: Any, state_dir: Path) -> PredictionLog | None:
    """The prediction log of a loaded model version, or None when model.yaml leaves it off (rate 0)."""
    config = model.config.prediction_log
    if config.rate <= 0:
        return None
    require("pyarrow", "batch", "the prediction log (model.yaml prediction_log)")
    return PredictionLog(state_dir / "predictions" / model.name, model.name, model.version, Answer(model),
                         config.rate, int(config.max_mb * 2**20), config.rows_per_file,
                         config.flush_seconds)  # fmt: skip


def read_log(folder: Path, ids: Sequence[str] | None = None, columns: Sequence[str] | None = None) -> Any:
    """A model's logged rows as a pyarrow Table (only those of ``ids`` when given)."""
    pa = require("pyarrow", "batch", "reading the prediction log")
    pq = require("pyarrow.parquet", "batch", "reading the prediction log")
    files = sorted(folder.glob("*.parquet")) if folder.is_dir() else []
    tables = []
    wanted = set(ids) if ids is not None else None
    for f in files:
        try:
            table = pq.read_table(f, columns=list(columns) if columns else None)
        except FileNotFoundError:  # deleted by the disk bound since the listing
            continue
        if wanted is not None:
            pc = require("pyarrow.compute", "batch", "reading the prediction log")
            table = table.filter(pc.is_in(table["id"], value_set=pa.array(sorted(wanted), pa.string())))
        if table.num_rows:
            tables.append(table)
    if not tables:
        fields = schema()
        return fields.empty_table() if not columns else pa.schema([fields.field(c) for c in columns]).empty_table()
    return pa.concat_tables(tables)


# -- quality: labels that arrive later ---------------------------------------------------------------

_QUALITY_SCHEMA = """
CREATE TABLE IF NOT EXISTS feedback (
    model TEXT NOT NULL, version INTEGER NOT NULL, key TEXT NOT NULL, id TEXT NOT NULL, row INTEGER NOT NULL,
    predicted_at REAL NOT NULL, received_at REAL NOT NULL, prediction TEXT, label TEXT NOT NULL,
    correct INTEGER, error REAL,
    PRIMARY KEY (model, key, id, predicted_at, row)
);
CREATE INDEX IF NOT EXISTS feedback_time ON feedback (model, predicted_at);
"""
_BUCKETS = {"hour": "%Y-%m-%dT%H:00Z", "day": "%Y-%m-%d"}


class Quality:
    """Labels joined with the prediction log, kept in ``path`` (quality.sqlite): see the module docstring."""

    def __init__(self, path: Path, predictions: Path):
        self.path, self.predictions = path, predictions
        self._db: Any = None
        self._lock = threading.Lock()
        self._summary: tuple[float, list[dict[str, Any]]] = (0.0, [])

    def _connection(self) -> Any:
        if self._db is None:
            self._db = open_db(self.path, _QUALITY_SCHEMA)
        return self._db

    def add(self, model: str, kind: str, ids: Sequence[Any], labels: Sequence[Any],
            flush: PredictionLog | None = None, key: str | None = None) -> dict[str, Any]:  # fmt: skip
        """Join ``labels`` (one per id: a value, or a list of one per row of a request of several rows) with the
        logged answers of ``ids``; keep them; return what matched and this batch's accuracy or error.
        ``key``: only answers logged for this key id match (None: any key's, as for an admin key)."""
        ids, labels = _check_feedback(ids, labels)
        if flush is not None:
            flush.flush()
        table = read_log(self.predictions / model, ids, ["time", "id", "row", "version", "key", "prediction",
                                                         "class_index", "value"])  # fmt: skip
        newest: dict[str, list[dict[str, Any]]] = {}  # id -> the rows of its newest logged request, in order
        for entry in table.to_pylist():
            if key is not None and entry["key"] != key:  # a caller labels its own requests only
                continue
            rows = newest.get(entry["id"])
            if rows is None or entry["time"] > rows[0]["time"]:  # a reused id: its latest request counts
                newest[entry["id"]] = [entry]
            elif entry["time"] == rows[0]["time"]:
                rows.append(entry)
        now = time.time()
        kept, unmatched = [], []
        for i, (request_id, label) in enumerate(zip(ids, labels)):
            logged = sorted(newest.get(request_id, []), key=lambda e: e["row"])
            count = len(logged) if logged else None
            given = label if isinstance(label, list) else [label]
            if count is None or len(given) != count:
                unmatched.append({"id": request_id, "reason": "not in the prediction log (not sampled, not yet "
                                  "written by another worker, past max_mb, or sent with another key)" if count is None else
                                  f"the request had {count} rows: send a list of {count} labels"})  # fmt: skip
                continue
            for entry, value in zip(logged, given):
                correct, error = _judge(kind, entry, value, i)
                kept.append((model, entry["version"], entry["key"] or "", request_id, entry["row"],
                             entry["time"].timestamp(), now, entry["prediction"], str(value), correct, error))  # fmt: skip
        with self._lock:
            db = self._connection()
            db.execute("BEGIN IMMEDIATE")
            db.executemany("INSERT OR REPLACE INTO feedback VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", kept)
            db.execute("COMMIT")
        self._summary = (0.0, [])
        judged = [k[9] for k in kept if k[9] is not None]  # correct, then error: the table's last two columns
        errors = [k[10] for k in kept if k[10] is not None]
        return {"model_name": model, "received": len(ids), "matched": len(ids) - len(unmatched), "labels": len(kept),
                "accuracy": sum(judged) / len(judged) if judged else None,
                "mean_absolute_error": sum(errors) / len(errors) if errors else None,
                "unmatched": unmatched[:100]}  # fmt: skip

    def series(self, model: str, version: int | None = None, by: str = "hour") -> list[dict[str, Any]]:
        """Accuracy (classification) and mean absolute error (regression) per hour or day of the predictions."""
        if by not in _BUCKETS:
            raise InvalidInput(("by",), f"expected one of {sorted(_BUCKETS)}", by)
        query = (f"SELECT version, strftime('{_BUCKETS[by]}', predicted_at, 'unixepoch') AS bucket, COUNT(*), "
                 "AVG(correct), AVG(error) FROM feedback WHERE model = ?" + (" AND version = ?" if version is not None
                 else "") + " GROUP BY version, bucket ORDER BY bucket, version")  # fmt: skip
        with self._lock:
            found = self._connection().execute(query, (model,) if version is None else (model, version)).fetchall()
        return [{"version": v, "time": b, "labels": n, "accuracy": a, "mean_absolute_error": e}
                for v, b, n, a, e in found]  # fmt: skip

    def summary(self, max_age: float = 5.0) -> list[dict[str, Any]]:
        """Per model and version: labels, accuracy, mean absolute error (what /metrics shows; re-read every 5 s)."""
        at, found = self._summary
        if time.monotonic() - at < max_age:
            return found
        if not self.path.exists():
            return []
        with self._lock:
            rows = self._connection().execute("SELECT model, version, COUNT(*), AVG(correct), AVG(error), "
                                              "COALESCE(SUM(correct), 0) FROM feedback GROUP BY model, "
                                              "version").fetchall()  # fmt: skip
        found = [{"model": m, "version": v, "labels": n, "accuracy": a, "mean_absolute_error": e, "correct": c}
                 for m, v, n, a, e, c in rows]  # fmt: skip
        self._summary = (time.monotonic(), found)
        return found

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None


def _check_feedback(ids: Any, labels: Any) -> tuple[list[str], list[Any]]:
    if not isinstance(ids, list) or not ids:
        raise InvalidInput(("ids",), "expected a non-empty list of request ids", shown(ids))
    if not isinstance(labels, list) or len(labels) != len(ids):
        raise InvalidInput(("labels",), f"expected a list of {len(ids)} labels, one per id",
                           shown(labels) if not isinstance(labels, list) else f"{len(labels)} labels")  # fmt: skip
    if len(ids) > MAX_FEEDBACK:
        raise InvalidInput(("ids",), f"at most {MAX_FEEDBACK} ids a request", len(ids))
    for i, request_id in enumerate(ids):
        if isinstance(request_id, bool) or not isinstance(request_id, (str, int)):
            raise InvalidInput(("ids", i), "expected a request id (a string)", shown(request_id))
    checked: list[Any] = []
    for i, label in enumerate(labels):
        values = label if isinstance(label, list) else [label]
        if not values or any(isinstance(v, (dict, list)) or v is None for v in values):
            raise InvalidInput(("labels", i), "expected a label (a string or number), or a list of one per row",
                               shown(label))  # fmt: skip
        plain = [_plain_label(v, i) for v in values]
        checked.append(plain if isinstance(label, list) else plain[0])
    return [str(i) for i in ids], checked


def _plain_label(value: Any, i: int) -> Any:
    """A label as the answer would read it: 1.0 is class 1 (Parquet and pandas write whole numbers as floats)."""
    if isinstance(value, float):
        if not np.isfinite(value):
            raise InvalidInput(("labels", i), "expected a finite number or a class name", shown(value))
        if value.is_integer():
            return int(value)
    return value


def _judge(kind: str, entry: Mapping[str, Any], label: Any, i: int) -> tuple[int | None, float | None]:
    """(right or wrong, absolute error) of a logged answer against its true label."""
    if kind == "regression" or (entry["value"] is not None and entry["prediction"] is None):
        if isinstance(label, bool) or not isinstance(label, (int, float)):
            raise InvalidInput(("labels", i), "expected the true value (a number) for a regression model", shown(label))
        return None, abs(float(label) - entry["value"]) if entry["value"] is not None else None
    if entry["prediction"] is None:
        return None, None
    text = str(label)
    return int(text == entry["prediction"] or (entry["class_index"] is not None and text == str(entry["class_index"]))), None

"""Drift: how far a model's recent inputs and answers have moved from those it was built on.

A *reference* (``reference.json`` in the version folder, written when a model is imported or built)
holds per feature the quantile bin edges of the training data, each bin's share, and a sample of
values; and the share of each predicted class (or the bins of predicted values). A *profile* turns
a batch of input tensors into one row of numbers per instance: a tabular model's features as they
are, per channel the mean and standard deviation of an image, the length of a token sequence.

Live, a ``DriftMonitor`` keeps the profiles of the last ``window`` rows served. Serving only hands
it the batch (``observe``: a list append, no thread woken); one thread wakes ten times a second,
profiles what waits in one go (batches of the same shape concatenated) and stores it, so the hot path
pays about a microsecond and no statistics, and never waits for the GIL behind a profiler woken per
request. Past ``PENDING_BYTES`` waiting, batches are not profiled (counted: sampling under load).
On request (/v2/models/{m}/drift, /metrics) it compares the window with the reference: the
population stability index per feature on the reference's bins, the Kolmogorov-Smirnov statistic
against the reference sample (scipy's ``ks_2samp``), and the PSI of the predictions. A PSI of 0.1
is moderate drift and 0.25 significant, by default (model.yaml ``drift:``).

    reference = Reference.build(profile(x_train), names, predictions=classes, labels=labels)
    reference.save(version_folder / "reference.json")
    report = compare(reference, profile(x_live), predictions_live)   # what `forwardpass drift` prints
"""

from __future__ import annotations

import json
import logging
import threading
import time
import weakref
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from forwardpass._deps import require
from forwardpass.errors import InvalidInput, ModelConfigError

log = logging.getLogger("forwardpass.drift")

REFERENCE_FILE = "reference.json"
BINS = 10
SAMPLE = 500  # reference values kept per feature for the KS test
_MAX_FILE = 16 * 2**20  # a reference file is data: read only this much
_EPS = 1e-4  # a bin's share floor: an empty bin would make the PSI infinite
PENDING_BYTES = 32 * 2**20  # served batches held for one monitor's profiler at most (images are large)
TICK = 0.1  # seconds between the profiler's rounds


def profile(array: np.ndarray, image: tuple[int, str] | None = None) -> tuple[np.ndarray, list[str]]:
    """(rows x numbers, their names) for a batch of one input tensor (see the module docstring).

    ``image``: (channels, layout) when the tensor holds images (``NCHW``, ``NHWC``, or ``flat``: each row
    an image's pixels, channel last), profiled per channel as mean and standard deviation."""
    if image is not None and array.dtype.kind in "fiu" and array.ndim in (2, 4):
        channels, layout = image
        x = array.astype(np.float64, copy=False)
        if layout == "NCHW" and x.ndim == 4:
            x = x.reshape(len(x), channels, -1).transpose(0, 2, 1)
        else:  # NHWC, or flat: pixels with their channels last
            x = x.reshape(len(x), -1, channels)
        stats = np.concatenate([x.mean(axis=1), x.std(axis=1)], axis=1)
        return stats, [f"channel {c} mean" for c in range(channels)] + [f"channel {c} std" for c in range(channels)]
    if array.ndim == 2 and array.dtype.kind == "f":
        return array.astype(np.float64, copy=False), [f"x{i}" for i in range(array.shape[1])]
    if array.ndim == 2 and array.dtype.kind in "iu":  # token ids: a text's length (padding is 0)
        return np.count_nonzero(array, axis=1).astype(np.float64)[:, None], ["length"]
    if array.ndim == 1 and array.dtype.kind == "f":
        return array.astype(np.float64)[:, None], ["x0"]
    return np.zeros((len(array), 0)), []


@dataclass
class Bins:
    """Quantile bins of one column of reference data: interior edges, each bin's share, a sample of values."""

    edges: np.ndarray
    expected: np.ndarray
    sample: np.ndarray

    @classmethod
    def of(cls, values: np.ndarray, rng: np.random.Generator) -> Bins:
        values = values[np.isfinite(values)]
        edges = np.unique(np.quantile(values, np.linspace(0, 1, BINS + 1)[1:-1])) if len(values) else np.zeros(0)
        counts = np.bincount(np.searchsorted(edges, values, side="right"), minlength=len(edges) + 1)
        sample = rng.choice(values, min(SAMPLE, len(values)), replace=False) if len(values) else values
        return cls(edges, counts / max(1, counts.sum()), np.sort(sample))

    def shares(self, values: np.ndarray) -> np.ndarray:
        values = values[np.isfinite(values)]
        counts = np.bincount(np.searchsorted(self.edges, values, side="right"), minlength=len(self.edges) + 1)
        return counts / max(1, counts.sum())

    def to_json(self) -> dict[str, Any]:
        # edges and values exact: a served float32 value equal to an edge must fall in the bin it fell in here
        return {"edges": [float(v) for v in self.edges], "expected": _floats(self.expected),
                "sample": [float(v) for v in self.sample]}  # fmt: skip

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> Bins:
        return cls(np.asarray(doc["edges"], np.float64), np.asarray(doc["expected"], np.float64),
                   np.asarray(doc["sample"], np.float64))  # fmt: skip


def psi(expected: np.ndarray, actual: np.ndarray) -> float:
    """Population stability index of two share vectors over the same bins."""
    e, a = np.maximum(expected, _EPS), np.maximum(actual, _EPS)
    return float(np.sum((a - e) * np.log(a / e)))


@dataclass
class Reference:
    """What a model version was built on: per-feature bins, and the predictions' distribution."""

    names: list[str]
    features: list[Bins]
    rows: int
    classes: np.ndarray | None = None  # share of each predicted class, by class index
    labels: list[str] | None = None
    values: Bins | None = None  # predicted values (regression)

    @classmethod
    def build(cls, rows: np.ndarray, names: Sequence[str], *, classes: np.ndarray | None = None,
              n_classes: int | None = None, labels: Sequence[str] | None = None,
              values: np.ndarray | None = None, seed: int = 0) -> Reference:  # fmt: skip
        """From a profile of the training (or calibration) rows and the model's predictions on them."""
        rng = np.random.default_rng(seed)
        bins = [Bins.of(rows[:, i], rng) for i in range(rows.shape[1])]
        shares = None
        if classes is not None:
            counts = np.bincount(np.asarray(classes, np.int64), minlength=n_classes or 0)
            shares = counts / max(1, counts.sum())
        return cls(list(names), bins, len(rows), shares, list(labels) if labels is not None else None,
                   Bins.of(np.asarray(values, np.float64).ravel(), rng) if values is not None else None)  # fmt: skip

    def save(self, path: Path) -> None:
        path.write_bytes(self.to_bytes())

    def to_bytes(self) -> bytes:
        doc = {"format": "forwardpass-drift-reference/1", "rows": self.rows,
               "features": [{"name": n, **b.to_json()} for n, b in zip(self.names, self.features, strict=True)],
               "prediction": ({"classes": _floats(self.classes), "labels": self.labels} if self.classes is not None
                              else {"values": self.values.to_json()} if self.values is not None else None)}  # fmt: skip
        return json.dumps(doc).encode()

    @classmethod
    def load(cls, path: Path) -> Reference:
        """A reference file, read as data (bounded, every field checked); ModelConfigError names what is wrong."""
        try:
            with path.open("rb") as f:
                raw = f.read(_MAX_FILE + 1)
            if len(raw) > _MAX_FILE:
                raise ValueError(f"over {_MAX_FILE} bytes")
            doc = json.loads(raw)
            features = doc["features"]
            names = [str(f["name"]) for f in features]
            bins = [Bins.from_json(f) for f in features]
            for b in bins:
                if len(b.expected) != len(b.edges) + 1 or not np.all(np.isfinite(b.edges)):
                    raise ValueError("a feature's bins do not match its edges")
            prediction = doc.get("prediction") or {}
            classes = np.asarray(prediction["classes"], np.float64) if "classes" in prediction else None
            values = Bins.from_json(prediction["values"]) if "values" in prediction else None
            return cls(names, bins, int(doc["rows"]), classes, prediction.get("labels"), values)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ModelConfigError(str(path), "", f"not a drift reference ({exc})",
                                   "rebuild it (forwardpass import writes one) or delete it") from None  # fmt: skip


@dataclass
class Thresholds:
    moderate: float = 0.1
    significant: float = 0.25


def compare(reference: Reference, rows: np.ndarray, classes: np.ndarray | None = None,
            values: np.ndarray | None = None, thresholds: Thresholds | None = None,
            ks: bool = True) -> dict[str, Any]:  # fmt: skip
    """PSI and KS per feature, the predictions' PSI, and the verdict: ``ok``, ``moderate`` or ``drifting``
    (``ks=False``: the PSI alone, a fraction of a millisecond)."""
    stats = require("scipy.stats", "server", "drift's Kolmogorov-Smirnov test") if ks else None
    limits = thresholds or Thresholds()
    features = []
    for i, (name, bins) in enumerate(zip(reference.names, reference.features, strict=True)):
        live = rows[:, i] if i < rows.shape[1] else np.zeros(0)
        live = live[np.isfinite(live)]
        entry: dict[str, Any] = {"name": name, "psi": None, "ks": None, "ks_p_value": None}
        if len(live) and len(bins.sample):
            entry["psi"] = round(psi(bins.expected, bins.shares(live)), 6)
            if stats is not None:
                test = stats.ks_2samp(bins.sample, live)
                entry["ks"], entry["ks_p_value"] = round(float(test.statistic), 6), float(test.pvalue)
        entry["status"] = _status(entry["psi"], limits)
        features.append(entry)
    prediction: dict[str, Any] | None = None
    if reference.classes is not None and classes is not None and len(classes):
        counts = np.bincount(classes.astype(np.int64), minlength=len(reference.classes))[: len(reference.classes)]
        shares = counts / max(1, counts.sum())
        value = round(psi(reference.classes, shares), 6)
        prediction = {"psi": value, "status": _status(value, limits), "expected": _floats(reference.classes),
                      "actual": _floats(shares), "labels": reference.labels}  # fmt: skip
    elif reference.values is not None and values is not None and len(values):
        value = round(psi(reference.values.expected, reference.values.shares(values)), 6)
        prediction = {"psi": value, "status": _status(value, limits)}
    worst = max([f["psi"] for f in features if f["psi"] is not None] + ([prediction["psi"]] if prediction else []),
                default=None)  # fmt: skip
    bounds = {"moderate": limits.moderate, "significant": limits.significant}
    return {"rows": len(rows), "status": _status(worst, limits), "max_psi": worst, "features": features,
            "prediction": prediction, "thresholds": bounds}


def _status(value: float | None, limits: Thresholds) -> str:
    if value is None:
        return "unknown"
    return "drifting" if value >= limits.significant else "moderate" if value >= limits.moderate else "ok"


def _floats(values: Any) -> list[float]:
    return [float(f"{v:.6g}") for v in np.asarray(values, np.float64).ravel()]


@dataclass
class _Window:
    rows: np.ndarray  # window x numbers, a ring
    classes: np.ndarray
    values: np.ndarray
    filled: int = 0
    at: int = 0


@dataclass(eq=False)  # compared and hashed by identity: the profiler keeps a weak set of monitors
class DriftMonitor:
    """One served version's live window and its comparison with the reference (see the module docstring)."""

    reference: Reference
    input_name: str
    image: tuple[int, str] | None = None  # (channels, layout) of an image input
    output: str | None = None  # the output read for prediction drift
    kind: str = ""  # "classification" (argmax of the output) or "regression"
    window: int = 2048
    min_rows: int = 100  # fewer rows than this: status "unknown" (too few to judge)
    thresholds: Thresholds = field(default_factory=Thresholds)

    def __post_init__(self) -> None:
        n = len(self.reference.names)
        self._ring = _Window(np.zeros((self.window, n)), np.zeros(self.window, np.int64), np.zeros(self.window))
        self._lock = threading.Lock()
        self.observed = 0  # rows profiled since the start
        self.dropped = 0  # batches not profiled because the profiler was behind (sampling under load)
        self.status = "unknown"  # the verdict on the PSI, renewed by the profiler at most once a second
        self.max_psi: float | None = None
        self.last: dict[str, Any] | None = None  # the latest comparison (what /metrics shows)
        self._judged = 0.0
        self._pending: list[tuple[np.ndarray, np.ndarray | None]] = []  # served, not yet profiled
        self._pending_bytes = 0
        self._pending_lock = threading.Lock()
        PROFILER.watch(self)

    def observe(self, feeds: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]) -> None:
        """A served batch, kept for the profiler thread's next round (nothing computed here, no thread woken)."""
        array = feeds.get(self.input_name)
        if array is None:
            return
        with self._pending_lock:
            if self._pending_bytes + array.nbytes > PENDING_BYTES:
                self.dropped += 1
                return
            self._pending.append((array, outputs.get(self.output) if self.output else None))
            self._pending_bytes += array.nbytes

    def profile_pending(self) -> None:
        """Profile every batch waiting (the profiler thread's round): runs of the same shape as one batch."""
        with self._pending_lock:
            pending, self._pending, self._pending_bytes = self._pending, [], 0
        start = 0
        while start < len(pending):
            first = pending[start][0]
            end = start + 1
            while end < len(pending) and _joins(pending[end], pending[start]):
                end += 1
            run = pending[start:end]
            if len(run) == 1:
                self.record(first, run[0][1])
            else:
                outputs = [o for _, o in run if o is not None]  # all or none (_joins)
                self.record(np.concatenate([a for a, _ in run]), np.concatenate(outputs) if outputs else None)
            start = end

    def record(self, array: np.ndarray, output: np.ndarray | None) -> None:
        """Profile a batch and put it in the window (the profiler thread calls this)."""
        if len(array) > self.window:  # only the last window's rows can stay: profile no more than those
            array = array[-self.window :]
            output = None if output is None or len(output) < self.window else output[-self.window :]
        rows, _ = profile(array, self.image)
        if rows.shape[1] != len(self.reference.names):
            return
        n = len(rows)
        classes = values = None
        if output is not None and len(output) == n:
            if self.kind == "classification" and output.ndim == 2:
                classes = output.argmax(axis=1)
            elif self.kind == "regression":
                values = output.reshape(n, -1)[:, 0]
        with self._lock:
            ring = self._ring
            index = (ring.at + np.arange(n)) % self.window
            ring.rows[index] = rows
            if classes is not None:
                ring.classes[index] = classes
            if values is not None:
                ring.values[index] = values
            ring.at = (ring.at + n) % self.window
            ring.filled = min(self.window, ring.filled + n)
            self.observed += n
        now = time.monotonic()
        if now - self._judged >= 1.0:
            self._judged = now
            self.last = self._compare(ks=False)
            self.status, self.max_psi = self.last["status"], self.last["max_psi"]

    def judge(self, batches: Iterable[tuple[np.ndarray, np.ndarray | None]]) -> dict[str, Any]:
        """Rows from elsewhere (``forwardpass drift MODEL DATA``: a file's batches of input tensor and output)
        against the reference, KS included; the live window is left alone."""
        profiles, classes, values = [], [], []
        for array, output in batches:
            rows, _ = profile(array, self.image)
            profiles.append(rows)
            if output is not None and len(output) == len(rows):
                if self.kind == "classification" and output.ndim == 2:
                    classes.append(output.argmax(axis=1))
                elif self.kind == "regression":
                    values.append(output.reshape(len(rows), -1)[:, 0])
        n = len(self.reference.names)
        rows = np.concatenate(profiles) if profiles else np.zeros((0, n))
        if rows.shape[1] != n:
            raise InvalidInput(("data",), f"profiles to {rows.shape[1]} numbers a row, the reference has {n} "
                               f"({', '.join(self.reference.names[:5])}...): is this the model's data?")  # fmt: skip
        found = compare(self.reference, rows, np.concatenate(classes) if classes else None,
                        np.concatenate(values) if values else None, self.thresholds, ks=True)  # fmt: skip
        found["reference_rows"] = self.reference.rows
        return found

    def report(self) -> dict[str, Any]:
        """The window against the reference (a few milliseconds: call it off the event loop)."""
        found = self._compare(ks=True)
        self.last, self.status, self.max_psi = found, found["status"], found["max_psi"]
        found.update(window=self.window, observed=self.observed, dropped_batches=self.dropped,
                     reference_rows=self.reference.rows)  # fmt: skip
        return found

    def _compare(self, ks: bool) -> dict[str, Any]:
        with self._lock:
            ring = self._ring
            rows, classes, values = ring.rows[: ring.filled].copy(), ring.classes[: ring.filled].copy(), \
                ring.values[: ring.filled].copy()  # fmt: skip
        found = compare(self.reference, rows, classes if self.kind == "classification" else None,
                        values if self.kind == "regression" else None, self.thresholds, ks)  # fmt: skip
        if len(rows) < self.min_rows:
            found["status"] = "unknown"
        return found


def _joins(a: tuple[np.ndarray, np.ndarray | None], b: tuple[np.ndarray, np.ndarray | None]) -> bool:
    """Whether two served batches concatenate: inputs and outputs alike in dtype and all but the first axis."""
    (x, y), (u, v) = a, b
    if x.dtype != u.dtype or x.shape[1:] != u.shape[1:] or x.ndim == 0:
        return False
    if y is None or v is None:
        return y is None and v is None
    return y.dtype == v.dtype and y.shape[1:] == v.shape[1:]


class _Profiler:
    """One daemon thread that profiles every monitor's waiting batches each ``TICK`` seconds."""

    def __init__(self) -> None:
        self._monitors: weakref.WeakSet[DriftMonitor] = weakref.WeakSet()  # an unloaded version's goes with it
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # the set of monitors
        self._round_lock = threading.Lock()  # one round at a time: the thread's, or wait()'s

    def watch(self, monitor: DriftMonitor) -> None:
        with self._lock:
            self._monitors.add(monitor)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="forwardpass-drift", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            time.sleep(TICK)
            self._round()

    def _round(self) -> None:
        with self._lock:
            monitors = list(self._monitors)
        with self._round_lock:
            for monitor in monitors:
                try:
                    monitor.profile_pending()
                except Exception:  # a bad batch must not stop drift monitoring for every model
                    log.exception("drift: profiling the batches of %s failed", monitor.input_name)
        del monitors

    def wait(self) -> None:
        """Profile everything served so far, now (tests, benchmarks)."""
        self._round()


PROFILER = _Profiler()


def monitor_for(model: Any) -> DriftMonitor | None:
    """The drift monitor of a loaded model version: None without a reference.json, with ``drift.enabled``
    false, or for a model of several inputs (its profile would be ambiguous)."""
    config = model.config
    path = Path(model.folder) / str(model.version) / REFERENCE_FILE
    if not config.drift.enabled or len(model.inputs) != 1 or not path.is_file():
        return None
    try:
        reference = Reference.load(path)
    except ModelConfigError as exc:  # the model serves; only its drift is not watched
        log.warning("drift: %s; %s v%d is served without drift monitoring", exc.message, model.name, model.version)
        return None
    post = config.post
    output = getattr(post, "output", None) if post is not None else None
    if output is None and post is not None and getattr(post, "kind", "") in ("classification", "regression"):
        output = model.outputs[-1].name if model.outputs else None
    kind = getattr(post, "kind", "") if post is not None else ""
    return DriftMonitor(reference, model.inputs[0].name, image_of(config.pre), output, kind, config.drift.window,
                        config.drift.min_rows, Thresholds(config.drift.moderate, config.drift.significant))  # fmt: skip


def image_of(pre: Any) -> tuple[int, str] | None:
    """(channels, layout) of an image pre-processing (model.yaml's ``pre``, parsed or as a dict), None for others."""
    def get(key: str, default: Any) -> Any:
        return pre.get(key, default) if isinstance(pre, dict) else getattr(pre, key, default)

    if get("kind", None) != "image":
        return None
    return (1 if get("color", "RGB") == "L" else 3), get("layout", "NCHW")

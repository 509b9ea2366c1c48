"""Prometheus text for /metrics, formatted from forwardpass.stats only when scraped.

Several processes serve one endpoint when ``forwardpass serve --workers N`` forks workers, or Ray Serve runs
replicas: ``merge`` makes their expositions one, and ``Peers`` lets each worker see the others' (each writes
its own to the state folder every second), so a scrape, or the dashboard's charts, count every request
whichever worker answers it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from forwardpass.stats import Histogram, Stats


def render(stats: Stats, quality: list[dict[str, Any]] | None = None) -> bytes:
    """Prometheus text exposition format of every model's statistics (and ``quality``: Quality.summary())."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(stats, quality or []))
    return generate_latest(registry)


class _Collector:
    def __init__(self, stats: Stats, quality: list[dict[str, Any]]):
        self.stats, self.quality = stats, quality

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        m = self.stats
        labels = ["model", "version"]
        requests = CounterMetricFamily("forwardpass_requests", "Inference requests by model, version and HTTP status",
                                       labels=[*labels, "status"])  # fmt: skip
        hits = CounterMetricFamily("forwardpass_cache_hits", "Response cache hits", labels=labels)
        misses = CounterMetricFamily("forwardpass_cache_misses", "Response cache misses", labels=labels)
        rows = CounterMetricFamily("forwardpass_inferred_rows", "Rows (batch elements) inferred", labels=labels)
        hists = {
            "total": HistogramMetricFamily("forwardpass_request_duration_seconds", "Request latency, receipt to response",
                                           labels=labels),  # fmt: skip
            "queue": HistogramMetricFamily("forwardpass_queue_duration_seconds", "Time waiting for a batch",
                                           labels=labels),  # fmt: skip
            "compute": HistogramMetricFamily("forwardpass_compute_duration_seconds", "Forward pass per batch",
                                             labels=labels),  # fmt: skip
            "batch_rows": HistogramMetricFamily("forwardpass_batch_size", "Rows per executed batch", labels=labels),
        }
        by_status: dict[tuple[str, str, str], int] = {}
        for (name, version), s in m.models.items():
            for status, count in s.by_status.items():
                by_status[name, str(version), str(status)] = count
        for (label, version_label), count in m.unexpected_errors.items():  # 500s outside a V2 model's statistics
            key = (label, str(version_label), "500")
            by_status[key] = by_status.get(key, 0) + count
        for status_series, count in sorted(by_status.items()):
            requests.add_metric(list(status_series), count)
        for (name, version), s in sorted(m.models.items()):
            series = [name, str(version)]
            hits.add_metric(series, s.cache_hits)
            misses.add_metric(series, s.cache_misses)
            rows.add_metric(series, s.inference_count)
            for attr, family in hists.items():
                h: Histogram = getattr(s, attr)
                family.add_metric(series, h.cumulative(), h.sum)
        live = GaugeMetricFamily("forwardpass_sequences_live", "A stateful model's sequences with a state kept",
                                 labels=labels)  # fmt: skip
        for (name, version), s in sorted(m.models.items()):
            if s.sequences is not None:  # counted now: reading it frees the sequences idle past their timeout
                live.add_metric([name, str(version)], s.sequences.live)
        yield from (requests, hits, misses, rows, *hists.values(), live)
        yield from _drift(m)
        yield from _quality(self.quality)
        yield GaugeMetricFamily("forwardpass_inflight_requests", "Requests being served now", value=m.inflight)
        if m.generation:
            yield from _generation(m)


def _drift(m: Stats) -> Iterator[Metric]:
    """Drift against each version's reference, as the profiler last judged it (nothing computed here)."""
    psi = GaugeMetricFamily("forwardpass_drift_psi", "Population stability index of an input feature, recent "
                            "window vs reference", labels=["model", "version", "feature"])  # fmt: skip
    ks = GaugeMetricFamily("forwardpass_drift_ks", "Kolmogorov-Smirnov statistic of an input feature (when last "
                           "reported at /drift)", labels=["model", "version", "feature"])  # fmt: skip
    prediction = GaugeMetricFamily("forwardpass_prediction_drift_psi", "PSI of the predictions", labels=["model", "version"])
    drifting = GaugeMetricFamily("forwardpass_model_drifting", "1 when the version's drift is significant",
                                 labels=["model", "version"])  # fmt: skip
    window = GaugeMetricFamily("forwardpass_drift_window_rows", "Rows in the drift window", labels=["model", "version"])
    for (name, version), s in sorted(m.models.items()):
        monitor = s.drift
        if monitor is None:
            continue
        series = [name, str(version)]
        drifting.add_metric(series, float(monitor.status == "drifting"))
        last = monitor.last
        if last is None:
            continue
        window.add_metric(series, last["rows"])
        for feature in last["features"]:
            if feature["psi"] is not None:
                psi.add_metric([*series, feature["name"]], feature["psi"])
            if feature["ks"] is not None:
                ks.add_metric([*series, feature["name"]], feature["ks"])
        if last["prediction"] is not None:
            prediction.add_metric(series, last["prediction"]["psi"])
    yield from (psi, ks, prediction, drifting, window)


def _quality(summary: list[dict[str, Any]]) -> Iterator[Metric]:
    """The answers' quality against labels sent later (/feedback; monitoring/predictions.py)."""
    labels = ["model", "version"]
    count = CounterMetricFamily("forwardpass_feedback_labels", "True labels received for logged predictions",
                                labels=labels)  # fmt: skip
    correct = CounterMetricFamily("forwardpass_feedback_correct", "Logged answers their true label confirmed (a "
                                  "classifier's accuracy over a window: rate of this / rate of feedback_labels)",
                                  labels=labels)  # fmt: skip
    accuracy = GaugeMetricFamily("forwardpass_model_accuracy", "Share of logged answers their true label "
                                 "confirmed", labels=labels)  # fmt: skip
    error = GaugeMetricFamily("forwardpass_model_mean_absolute_error", "Mean absolute error of logged answers "
                              "against their true values", labels=labels)  # fmt: skip
    for entry in summary:
        series = [entry["model"], str(entry["version"])]
        count.add_metric(series, entry["labels"])
        correct.add_metric(series, entry["correct"])
        if entry["accuracy"] is not None:
            accuracy.add_metric(series, entry["accuracy"])
        if entry["mean_absolute_error"] is not None:
            error.add_metric(series, entry["mean_absolute_error"])
    yield from (count, correct, accuracy, error)


def _generation(m: Stats) -> Iterator[Metric]:
    """Language models: tokens, per-token latencies, queue and slots, prefix cache."""
    labels = ["model", "version"]
    p = "forwardpass_generation_"

    def family(kind: type, name: str, doc: str, attr: Any) -> Metric:
        metric = kind(p + name, doc, labels=labels)
        for (model, version), g in sorted(m.generation.items()):
            value = attr(g)
            if isinstance(value, Histogram):
                metric.add_metric([model, str(version)], value.cumulative(), value.sum)
            else:
                metric.add_metric([model, str(version)], value)
        return metric

    yield family(CounterMetricFamily, "prompt_tokens", "Prompt tokens received", lambda g: g.prompt_tokens)
    yield family(CounterMetricFamily, "generated_tokens", "Tokens generated", lambda g: g.generated_tokens)
    yield family(GaugeMetricFamily, "tokens_per_second", "Tokens generated per second, last 10 s, all streams",
                 lambda g: g.tokens_per_second())  # fmt: skip
    yield family(HistogramMetricFamily, "time_to_first_token_seconds", "Request queued -> first token",
                 lambda g: g.ttft)  # fmt: skip
    yield family(HistogramMetricFamily, "inter_token_latency_seconds", "Between two tokens of one stream",
                 lambda g: g.itl)  # fmt: skip
    yield family(HistogramMetricFamily, "queue_duration_seconds", "Waiting for a slot", lambda g: g.queue_time)
    yield family(HistogramMetricFamily, "decode_step_seconds", "One batched decode call", lambda g: g.step_time)
    yield family(GaugeMetricFamily, "queue_depth", "Requests waiting for a slot", lambda g: g.queued)
    yield family(GaugeMetricFamily, "active_sequences", "Sequences holding a slot", lambda g: g.active)
    yield family(CounterMetricFamily, "cancelled", "Requests cancelled (client gone)", lambda g: g.cancelled)
    yield family(CounterMetricFamily, "decode_rows", "Sequence rows decoded (rows per step = this / steps)",
                 lambda g: g.decode_rows)  # fmt: skip
    yield family(CounterMetricFamily, "decode_steps", "Batched decode calls", lambda g: g.decode_steps)
    yield family(CounterMetricFamily, "prefix_cache_hits", "Requests that reused a cached prompt prefix",
                 lambda g: g.prefix_hits)  # fmt: skip
    yield family(CounterMetricFamily, "prefix_cache_misses", "Requests with no cached prefix", lambda g: g.prefix_misses)
    yield family(CounterMetricFamily, "prefix_cache_saved_tokens", "Prompt tokens not recomputed: from the prefix "
                 "cache, or a request's first choice (n > 1)", lambda g: g.prefix_saved_tokens)  # fmt: skip
    yield family(GaugeMetricFamily, "prefix_cache_bytes", "Memory held by the prefix cache", lambda g: g.prefix_cache_bytes)
    finished = CounterMetricFamily(p + "requests", "Finished generations by finish reason", labels=[*labels, "reason"])
    for (model, version), g in sorted(m.generation.items()):
        for reason, count in sorted(g.finish_reasons.items()):
            finished.add_metric([model, str(version), reason], count)
    yield finished


# Read from the one feedback database every process shares: taken from the first exposition only.
SHARED = {"forwardpass_feedback_labels", "forwardpass_feedback_correct", "forwardpass_model_accuracy",
          "forwardpass_model_mean_absolute_error"}  # fmt: skip
# Each process's own judgement of its own rows: the worst one stands (summing statistics means nothing).
WORST = {"forwardpass_drift_psi", "forwardpass_drift_ks", "forwardpass_prediction_drift_psi", "forwardpass_model_drifting"}


def merge(texts: list[bytes]) -> bytes:
    """Prometheus expositions of several processes as one: samples with the same labels are summed (counts,
    histograms, gauges such as requests in flight), other labels kept side by side (each model's own); drift
    statistics take the worst process's value, and the shared feedback figures come from the first text."""
    from prometheus_client.parser import text_string_to_metric_families

    families: dict[str, Metric] = {}
    values: dict[tuple[str, str, tuple[tuple[str, str], ...]], float] = {}
    for index, text in enumerate(texts):
        for family in text_string_to_metric_families(text.decode()):
            if family.name in SHARED and index > 0:
                continue
            families.setdefault(family.name, Metric(family.name, family.documentation, family.type))
            combine = max if family.name in WORST else _sum
            for sample in family.samples:
                key = (family.name, sample.name, tuple(sorted(sample.labels.items())))
                values[key] = combine(values[key], sample.value) if key in values else sample.value
    for (family_name, sample_name, labels), value in values.items():
        families[family_name].add_sample(sample_name, dict(labels), value)

    class Merged:
        def collect(self) -> list[Metric]:
            return list(families.values())

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Merged())
    return bytes(generate_latest(registry))


def _sum(a: float, b: float) -> float:
    return a + b


class Peers:
    """The workers of one server (``--workers N``) publish their expositions to a folder they share, so that
    whichever worker a scrape reaches answers for all of them.

        peers = Peers(state / "metrics-8000")
        peers.publish(render(stats))        # every second, by each worker (atomic: written, then renamed)
        merge([render(stats), *peers.others()])
    """

    EVERY = 1.0  # seconds between a worker's publications: how stale a peer's figures can be
    FRESH = 5.0  # a file older than this is a worker that is gone

    def __init__(self, folder: Path):
        self.folder = folder
        self.own = folder / f"{os.getpid()}.prom"

    @staticmethod
    def reset(folder: Path) -> None:
        """Before the workers start: the files of an earlier run removed."""
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob("*.prom"):
            stale.unlink(missing_ok=True)

    def publish(self, text: bytes) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        partial = self.own.with_suffix(".tmp")
        partial.write_bytes(text)
        os.replace(partial, self.own)

    def others(self) -> list[bytes]:
        """The other live workers' last expositions."""
        found, now = [], time.time()
        for path in self.folder.glob("*.prom"):
            if path == self.own:
                continue
            with contextlib.suppress(OSError):  # a worker that just left
                if now - path.stat().st_mtime < self.FRESH:
                    found.append(path.read_bytes())
        return found

    def withdraw(self) -> None:
        self.own.unlink(missing_ok=True)

    async def run(self, stats: Stats) -> None:
        """Publish this worker's statistics every EVERY seconds until cancelled; the file goes with it."""
        try:
            while True:
                text = render(stats)  # on the loop: the statistics are the loop's (a few ms)
                await asyncio.to_thread(self.publish, text)
                await asyncio.sleep(self.EVERY)
        finally:
            self.withdraw()


def peers_of(config: Any) -> Peers | None:
    """A server's workers' shared metrics folder (in its state folder, by port), when it has several workers."""
    from forwardpass.server.tenancy import state_dir

    return Peers(state_dir(config) / f"metrics-{config.port}") if config.workers > 1 else None

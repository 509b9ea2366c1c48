"""Prometheus text for /metrics, formatted from forwardpass.stats only when scraped."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from forwardpass.stats import Histogram, Stats


def render(stats: Stats) -> bytes:
    """Prometheus text exposition format of every model's statistics."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(stats))
    return generate_latest(registry)


class _Collector:
    def __init__(self, stats: Stats):
        self.stats = stats

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
        for (name, version), s in sorted(m.models.items()):
            key = [name, str(version)]
            for status, count in sorted(s.by_status.items()):
                requests.add_metric([*key, str(status)], count)
            hits.add_metric(key, s.cache_hits)
            misses.add_metric(key, s.cache_misses)
            rows.add_metric(key, s.inference_count)
            for attr, family in hists.items():
                h: Histogram = getattr(s, attr)
                family.add_metric(key, h.cumulative(), h.sum)
        yield from (requests, hits, misses, rows, *hists.values())
        yield GaugeMetricFamily("forwardpass_inflight_requests", "Requests being served now", value=m.inflight)

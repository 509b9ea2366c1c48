"""A Redis Streams worker: events from a source stream through the model to a sink stream, at least once.

    forwardpass stream iris --source redis://127.0.0.1:6379/readings --group scorers \\
        --sink redis://127.0.0.1:6379/scores [--consumer w1] [--dead-letter readings:dead]

Each round: take over events another consumer left pending longer than ``claim_idle_ms`` (XAUTOCLAIM:
Redis 7.0 has it, a dead worker's events are not lost), read new ones (XREADGROUP, ``batch_size`` at a
time), run them through the engine as one batch, then write each result to the sink with the source
id in it (``source_id``) and acknowledge (XACK). When source and sink are on one server the write and
the XACK are one MULTI/EXEC transaction, so a crash leaves either both or neither: exactly one result
per event. Otherwise the sink is written first (at least once: a result may be written twice, with the
same ``source_id``), ids go into a done-set on the sink's server, and a worker skips ids it says were written.

An event is a stream entry whose fields are the model's instance (a tabular model's feature names ->
values), or one ``data`` field holding the instance as JSON. An event the model refuses stays pending and
is retried after ``claim_idle_ms``; after ``max_deliveries`` it goes to the dead-letter stream with its
error, and is acknowledged, while the rest flow.

Traps worth knowing (Redis's own semantics, not ours):
- ``XADD ... MAXLEN`` / ``XTRIM`` delete entries even when they are pending: trim the source only past
  what every group has acknowledged (``XINFO GROUPS``: ``last-delivered-id``, ``pending``).
- ``XGROUP DELCONSUMER`` discards that consumer's pending entries: they are never delivered again.
- There is no NACK: an event is retried only by claiming it after it has been idle (what this worker does).

SIGTERM or SIGINT: the batch in hand is finished and acknowledged, then the worker exits 0.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

from forwardpass._deps import require
from forwardpass.errors import ForwardpassError, InvalidInput
from forwardpass.repository import Repository

log = logging.getLogger("forwardpass.streaming")


@dataclass
class WorkerOptions:
    """Where events come from and go, and how the worker paces itself."""

    source: str  # redis://HOST:PORT/STREAM
    sink: str
    group: str = "forwardpass"
    consumer: str | None = None  # default: host-pid
    dead_letter: str | None = None  # default: <source stream>:dead
    batch_size: int = 256
    max_deliveries: int = 3
    claim_idle_ms: int = 30_000
    block_ms: int = 500  # how long one XREADGROUP waits for new events
    metrics_port: int | None = None  # Prometheus metrics on http://127.0.0.1:PORT/metrics


@dataclass
class WorkerStats:
    """What the worker has done (the metrics: events/s, latency, dead letters, what it skipped)."""

    events: int = 0
    batches: int = 0
    dead_letters: int = 0
    skipped: int = 0  # events whose result the done-set says was written already
    claimed: int = 0
    started: float = field(default_factory=time.monotonic)
    latency_ms: list[float] = field(default_factory=list)  # source id time -> result written, last 10,000


def _stream(url: str, what: str) -> tuple[str, str]:
    """redis://HOST:PORT[/DB]/STREAM -> (connection URL, stream name)."""
    parsed = urlparse(url)
    if parsed.scheme not in ("redis", "rediss") or not parsed.hostname or not parsed.path.strip("/"):
        raise InvalidInput((what,), "expected redis://HOST:PORT/STREAM", url)
    parts = parsed.path.strip("/").split("/")
    db = parts[0] if len(parts) > 1 and parts[0].isdigit() else "0"
    name = "/".join(parts[1:] if len(parts) > 1 and parts[0].isdigit() else parts)
    return f"{parsed.scheme}://{parsed.netloc}/{db}", name


class Worker:
    """One consumer of a group; ``run()`` until SIGTERM (or ``stop`` is set)."""

    def __init__(self, repository: Repository, model: str, options: WorkerOptions,
                 stop: threading.Event | None = None):  # fmt: skip
        self.redis = require("redis", "redis", "the Redis Streams worker")
        self.repository, self.model, self.options = repository, model, options
        self.stop = stop or threading.Event()
        source_url, self.source = _stream(options.source, "source")
        sink_url, self.sink = _stream(options.sink, "sink")
        self.same_server = source_url == sink_url
        self.r = self.redis.Redis.from_url(source_url)
        self.w = self.r if self.same_server else self.redis.Redis.from_url(sink_url)
        self.consumer = options.consumer or f"{socket.gethostname()}-{os.getpid()}"
        self.dead = options.dead_letter or f"{self.source}:dead"
        self.done = f"{self.sink}:done"  # source ids whose result is in the sink (a sorted set, by time)
        self.stats = WorkerStats()

    # -- the loop ----------------------------------------------------------------------------------

    def run(self) -> WorkerStats:
        """Serve until stopped; the batch in hand is always finished and acknowledged first."""
        from forwardpass.embedded import Embedded

        self._on_signals()
        try:
            self.r.xgroup_create(self.source, self.options.group, id="0", mkstream=True)
        except self.redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        if self.options.metrics_port is not None:
            self._serve_metrics(self.options.metrics_port)
        with Embedded(self.repository, load=[self.model]) as engine:
            log.info("consumer %s of group %s on %s -> %s", self.consumer, self.options.group, self.source, self.sink)
            claim_from = "0-0"
            while not self.stop.is_set():
                claim_from, claimed = self._claim(claim_from)
                events = claimed + self._read(block=not claimed)
                if events:
                    self._process(engine, events)
        return self.stats

    def status(self) -> dict[str, float]:
        """The worker's metrics now: events, events/s, end-to-end latency p50/p99 (ms), the group's pending
        count and lag (entries not yet delivered to it), dead letters."""
        st = self.stats
        lat = sorted(st.latency_ms)
        groups = {g["name"].decode() if isinstance(g["name"], bytes) else g["name"]: g
                  for g in self.r.xinfo_groups(self.source)}  # fmt: skip
        group = groups.get(self.options.group, {})
        return {"events": st.events, "events_per_second": st.events / max(time.monotonic() - st.started, 1e-9),
                "latency_p50_ms": lat[len(lat) // 2] if lat else 0.0,
                "latency_p99_ms": lat[int(0.99 * (len(lat) - 1))] if lat else 0.0,
                "pending": float(group.get("pending", 0)), "lag": float(group.get("lag") or 0),
                "dead_letters": st.dead_letters, "skipped": st.skipped, "claimed": st.claimed}  # fmt: skip

    def _serve_metrics(self, port: int) -> None:
        prometheus = require("prometheus_client", "server", "the worker's --metrics-port")
        from prometheus_client.core import GaugeMetricFamily

        worker = self

        class Collector:
            def collect(self) -> Any:
                for name, value in worker.status().items():
                    family = GaugeMetricFamily(f"forwardpass_stream_{name}", f"Redis stream worker: {name}",
                                               labels=["model", "consumer"])  # fmt: skip
                    family.add_metric([worker.model, worker.consumer], value)
                    yield family

        registry = prometheus.CollectorRegistry()
        registry.register(Collector())
        prometheus.start_http_server(port, addr="127.0.0.1", registry=registry)

    def _on_signals(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: self.stop.set())

    def _claim(self, start: str) -> tuple[str, list[tuple[bytes, dict[bytes, bytes]]]]:
        """Events other consumers left pending past claim_idle_ms (a crashed worker's), now ours."""
        answer = self.r.xautoclaim(self.source, self.options.group, self.consumer, self.options.claim_idle_ms,
                                   start_id=start, count=self.options.batch_size)  # fmt: skip
        next_start, entries = answer[0], answer[1]
        entries = [(i, f) for i, f in entries if f is not None]  # trimmed away while pending: nothing to run
        self.stats.claimed += len(entries)
        return (next_start.decode() if isinstance(next_start, bytes) else str(next_start)), entries

    def _read(self, block: bool) -> list[tuple[bytes, dict[bytes, bytes]]]:
        wait = self.options.block_ms if block else None
        answer = self.r.xreadgroup(self.options.group, self.consumer, {self.source: ">"}, count=self.options.batch_size,
                                   block=wait)  # fmt: skip
        return [entry for _, entries in answer or [] for entry in entries]

    # -- one batch ---------------------------------------------------------------------------------

    def _process(self, engine: Any, events: list[tuple[bytes, dict[bytes, bytes]]]) -> None:
        ids = [i.decode() for i, _ in events]
        # one server: a result, its ack are one transaction, so nothing acknowledged is ever pending again, and
        # nothing pending has a result; two servers: the done-set says which results were written already
        written = [None] * len(ids) if self.same_server else self.w.zmscore(self.done, ids)
        todo = [(sid, fields) for sid, (_, fields), score in zip(ids, events, written) if score is None]
        already = [sid for sid, score in zip(ids, written) if score is not None]
        self.stats.skipped += len(already)
        results: dict[str, Any] = {}
        failed: dict[str, str] = {}
        instances = []
        for sid, fields in todo:
            try:
                instances.append((sid, _instance(fields)))
            except InvalidInput as exc:
                failed[sid] = exc.message
        while instances:  # the batch at once; an instance the model refuses is taken out, the rest run again
            try:
                answers = engine.predict(self.model, [inst for _, inst in instances])
                results.update(zip((sid for sid, _ in instances), _rows(answers, len(instances))))
                break
            except InvalidInput as exc:
                if len(exc.loc) < 2 or exc.loc[0] != "instances" or not isinstance(exc.loc[1], int):
                    failed.update((sid, exc.message) for sid, _ in instances)
                    break
                sid, _ = instances.pop(exc.loc[1])
                failed[sid] = exc.message
            except ForwardpassError as exc:  # not the events' fault (the model is loading): retried later
                log.error("batch of %d events failed, left pending for a retry: %s", len(instances), exc)
                instances = []
        self._commit(results, already)
        if failed:
            self._failed(failed, dict((i.decode(), f) for i, f in events))
        self.stats.batches += 1

    def _commit(self, results: dict[str, Any], already: list[str]) -> None:
        """Results to the sink, their ids marked done, the events acknowledged: one transaction on one server."""
        now_ms = time.time() * 1000
        sink = self.w.pipeline(transaction=self.same_server)
        for sid, answer in results.items():
            sink.xadd(self.sink, {"source_id": sid, "result": _json(answer)})
        if results and not self.same_server:
            sink.zadd(self.done, {sid: now_ms for sid in results})
        if self.same_server:
            if results or already:
                sink.xack(self.source, self.options.group, *results, *already)
            sink.execute()
        else:
            sink.execute()  # written before acknowledged: a crash between them repeats (the done-set skips it)
            if results or already:
                self.r.xack(self.source, self.options.group, *results, *already)
        self.stats.events += len(results)
        for sid in results:
            self.stats.latency_ms.append(now_ms - int(sid.split("-")[0]))
        del self.stats.latency_ms[:-10_000]

    def _failed(self, failed: dict[str, str], fields: dict[str, dict[bytes, bytes]]) -> None:
        """Refused events: left pending for a retry, or, past max_deliveries, dead-lettered and acknowledged."""
        for sid, why in failed.items():
            info = self.r.xpending_range(self.source, self.options.group, min=sid, max=sid, count=1)
            deliveries = info[0]["times_delivered"] if info else self.options.max_deliveries
            if deliveries < self.options.max_deliveries:
                continue  # XAUTOCLAIM gives it back after claim_idle_ms
            entry = {b"source_id": sid.encode(), b"error": why.encode(), b"deliveries": str(deliveries).encode()}
            entry.update({b"field:" + k: v for k, v in fields[sid].items()})
            dead = self.r.pipeline(transaction=True)
            dead.xadd(self.dead, entry)
            dead.xack(self.source, self.options.group, sid)
            dead.execute()
            self.stats.dead_letters += 1
            log.warning("event %s went to %s after %d deliveries: %s", sid, self.dead, deliveries, why)


try:
    from orjson import dumps as _orjson

    def _json(value: Any) -> bytes:
        return _orjson(value)
except ImportError:  # orjson comes with forwardpass[server]; json is the fallback

    def _json(value: Any) -> bytes:
        return json.dumps(value).encode()


def _instance(fields: dict[bytes, bytes]) -> Any:
    """A stream entry's fields -> the model's instance (a ``data`` field holds JSON; else field -> value)."""
    if set(fields) == {b"data"}:
        try:
            return json.loads(fields[b"data"])
        except ValueError as exc:
            shown = fields[b"data"][:40].decode("utf-8", "replace")
            raise InvalidInput(("data",), f"expected JSON: {exc}", shown) from None
    return {k.decode("utf-8", "replace"): v.decode("utf-8", "replace") for k, v in fields.items()}


def _rows(answers: Any, n: int) -> list[Any]:
    """Engine.predict's answers, one per event (a model without post-processing answers {output: rows})."""
    if isinstance(answers, dict):
        return [{name: rows[i] for name, rows in answers.items()} for i in range(n)]
    return list(answers)

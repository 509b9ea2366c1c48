"""Metering: what each key used of each model, per day (UTC), kept in SQLite so that restarts keep it.

The event loop only adds to a dictionary; a thread writes the sums every ``interval`` seconds in one
transaction (WAL, upserts that add, so workers sharing the file never overwrite each other), and once
more on close (SIGTERM drains, then closes). A SIGKILL loses at most the last ``interval`` seconds.

    meter = Meter(state_dir / "usage.sqlite", interval=1.0)
    meter.record("alice-1", "digits", rows=32, seconds=0.004)
    meter.record("alice-1", "smollm2", prompt_tokens=37, cached_tokens=32, completion_tokens=64, seconds=0.9)
    meter.query(key="alice-1", start="2026-12-01", end="2026-12-31")   # rows of usage, this worker's unwritten too
    meter.close()
"""

from __future__ import annotations

import datetime as dt
import logging
import sqlite3
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

log = logging.getLogger("forwardpass.usage")

COUNTS = ("requests", "rows", "prompt_tokens", "cached_tokens", "completion_tokens", "compute_seconds", "errors")
_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS usage (
    key TEXT NOT NULL, model TEXT NOT NULL, day TEXT NOT NULL,
    {", ".join(f"{c} {'REAL' if c == 'compute_seconds' else 'INTEGER'} NOT NULL DEFAULT 0" for c in COUNTS)},
    PRIMARY KEY (key, model, day)
)"""
_ADD = ", ".join(f"{c} = {c} + excluded.{c}" for c in COUNTS)
_UPSERT = (f"INSERT INTO usage (key, model, day, {', '.join(COUNTS)}) VALUES (?, ?, ?{', ?' * len(COUNTS)}) "
           f"ON CONFLICT (key, model, day) DO UPDATE SET {_ADD}")  # fmt: skip


_day = [-1, ""]  # the day number (UTC) last asked for, and its ISO date


def today() -> str:
    """Today's ISO date (UTC); on the request path, so computed once a day."""
    number = int(time.time() // 86400)
    if number != _day[0]:
        _day[1] = (dt.date(1970, 1, 1) + dt.timedelta(days=number)).isoformat()
        _day[0] = number
    return str(_day[1])


def month_start(day: str) -> str:
    return day[:8] + "01"


def next_month(day: str) -> str:
    """The first day of the month after ``day`` (an ISO date): when a monthly quota resets."""
    year, month = int(day[:4]), int(day[5:7])
    return f"{year + month // 12:04d}-{month % 12 + 1:02d}-01"


def open_usage(path: Path) -> sqlite3.Connection:
    """The usage file, created if need be (see open_db)."""
    return open_db(path, _SCHEMA)


def open_db(path: Path, schema: str) -> sqlite3.Connection:
    """A state file shared by the workers, created with ``schema`` if need be, in WAL mode. Workers starting
    together may find it locked while one of them switches it to WAL (that ignores the busy timeout): they
    wait for it, up to 30 s."""
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
    deadline = time.monotonic() + 30
    while True:
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: a process crash loses nothing committed
            db.executescript(schema)
            return db
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                db.close()
                raise
            time.sleep(0.01)


class Meter:
    """Usage sums per (key, model, day), written to SQLite off the event loop (see the module docstring)."""

    def __init__(self, path: Path, interval: float = 1.0, clock: Any = today):
        self.path, self.interval, self._today = path, interval, clock
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = open_usage(path)
        self._db_lock = threading.Lock()  # the writer thread and close() share the connection
        self._lock = threading.Lock()
        self._pending: dict[tuple[str, str, str], list[float]] = {}  # unwritten sums
        self._month_base: dict[str, tuple[int, int]] = {}  # key -> (requests, tokens) this month, as written
        self._month_local: dict[str, list[int]] = {}  # this worker's since that was read
        self._month = month_start(self._today())
        self._read_month()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="forwardpass-usage", daemon=True)
        self._thread.start()

    def record(self, key: str, model: str, *, rows: int = 0, prompt_tokens: int = 0, cached_tokens: int = 0,
               completion_tokens: int = 0, seconds: float = 0.0, error: bool = False) -> None:  # fmt: skip
        """Add one request's usage (a dictionary update: cheap enough for the event loop)."""
        day = self._today()
        with self._lock:
            sums = self._pending.get((key, model, day))
            if sums is None:
                sums = self._pending[key, model, day] = [0, 0, 0, 0, 0, 0.0, 0]
            sums[0] += 1
            sums[1] += rows
            sums[2] += prompt_tokens
            sums[3] += cached_tokens
            sums[4] += completion_tokens
            sums[5] += seconds
            sums[6] += error
            local = self._month_local.get(key)
            if local is None:
                local = self._month_local[key] = [0, 0]
            local[0] += 1
            local[1] += prompt_tokens + completion_tokens

    def month_used(self, key: str) -> tuple[int, int]:
        """(requests, tokens) of ``key`` this calendar month: every worker's as of the last write, and this one's since."""
        base = self._month_base.get(key, (0, 0))
        local = self._month_local.get(key)
        return (base[0] + local[0], base[1] + local[1]) if local else base

    def flush(self) -> None:
        """Write the pending sums now (the thread does this every ``interval`` seconds)."""
        with self._lock:
            pending, self._pending = self._pending, {}
        if pending:
            rows = [(*k, *(round(v, 6) if i == 5 else int(v) for i, v in enumerate(sums))) for k, sums in pending.items()]
            try:
                with self._db_lock:
                    self._db.execute("BEGIN IMMEDIATE")
                    try:
                        self._db.executemany(_UPSERT, rows)
                        self._db.execute("COMMIT")
                    except BaseException:
                        self._db.execute("ROLLBACK")
                        raise
            except sqlite3.Error:  # kept for the next try: usage is not dropped for a busy or full disk
                log.exception("usage: writing %d rows to %s failed; retrying at the next flush", len(rows), self.path)
                with self._lock:
                    for k, sums in pending.items():
                        into = self._pending.setdefault(k, [0, 0, 0, 0, 0, 0.0, 0])
                        for i, v in enumerate(sums):
                            into[i] += v
                return
        self._read_month(pending)

    def _read_month(self, written: dict[tuple[str, str, str], list[float]] | None = None) -> None:
        """This month's totals per key from the file; what was just written leaves the local counts."""
        month = month_start(self._today())
        try:
            with self._db_lock:
                found = self._db.execute("SELECT key, SUM(requests), SUM(prompt_tokens + completion_tokens) FROM usage "
                                   "WHERE day >= ? GROUP BY key", (month,)).fetchall()  # fmt: skip
        except sqlite3.Error:
            log.exception("usage: reading this month's totals from %s failed", self.path)
            return
        with self._lock:
            if month != self._month:  # a new month: last month's local counts no longer count
                self._month, self._month_local = month, {}
            for (key, _, day), sums in (written or {}).items():
                local = self._month_local.get(key)
                if local is not None and day >= month:
                    local[0] -= int(sums[0])
                    local[1] -= int(sums[2] + sums[4])
            self._month_base = {key: (int(r), int(t)) for key, r, t in found}

    def query(self, key: str | None = None, start: str | None = None, end: str | None = None) -> list[dict[str, Any]]:
        """Usage rows (key, model, day and the counts) between two ISO days, inclusive, with this worker's
        unwritten sums. Blocking: call it off the event loop."""
        with self._lock:
            pending = {k: list(v) for k, v in self._pending.items()}
        return read_usage(self.path, key, start, end, pending)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.flush()
            except Exception:  # the thread must outlive any one failure
                log.exception("usage: flush failed")

    def close(self) -> None:
        """Stop the thread and write what is pending (the server calls this when it stops)."""
        self._stop.set()
        self._thread.join(timeout=30)
        self.flush()
        with self._db_lock:
            self._db.close()


def read_usage(path: Path, key: str | None = None, start: str | None = None, end: str | None = None,
               pending: dict[tuple[str, str, str], list[float]] | None = None) -> list[dict[str, Any]]:  # fmt: skip
    """Usage rows from a usage file (``forwardpass usage`` reads it with no server), plus ``pending`` sums."""
    found: dict[tuple[str, str, str], list[float]] = {}
    if path.exists():
        where, args = [], []
        for clause, value in (("key = ?", key), ("day >= ?", start), ("day <= ?", end)):
            if value is not None:
                where.append(clause)
                args.append(value)
        sql = f"SELECT key, model, day, {', '.join(COUNTS)} FROM usage" + (" WHERE " + " AND ".join(where) if where else "")
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
        try:
            found = {(k, m, d): list(rest) for k, m, d, *rest in db.execute(sql, args)}
        finally:
            db.close()
    for (k, m, d), sums in (pending or {}).items():
        if (key is None or k == key) and (start is None or d >= start) and (end is None or d <= end):
            into = found.setdefault((k, m, d), [0] * len(COUNTS))
            for i, v in enumerate(sums):
                into[i] += v
    return [{"key": k, "model": m, "day": d, **dict(zip(COUNTS, _tidy(sums), strict=True))}
            for (k, m, d), sums in sorted(found.items(), key=lambda item: (item[0][2], item[0][0], item[0][1]))]


def totals(rows: Iterable[dict[str, Any]]) -> dict[str, float]:
    """The counts of several usage rows added up."""
    out: dict[str, float] = dict.fromkeys(COUNTS, 0)
    for row in rows:
        for c in COUNTS:
            out[c] += row[c]
    return dict(zip(COUNTS, _tidy([out[c] for c in COUNTS]), strict=True))


def _tidy(sums: list[Any]) -> list[Any]:
    return [round(float(v), 6) if i == 5 else int(v) for i, v in enumerate(sums)]


"""Rate limits: token buckets per key and dimension, shared by every worker process through one mapped file.

A bucket holds up to ``capacity`` units and refills at ``rate`` units a second; a request takes what
it needs or is refused with the exact wait until it would fit. Dimensions: ``requests`` (per second,
with a burst), ``tokens`` (prompt + completion per minute; a generation reserves its prompt and
max_tokens, then gives back what it did not use), ``rows`` (per minute), and ``streams`` (a count of
streamed answers open at once).

Why a mapped file and not SQLite: a check is two ``flock`` calls and a few ``struct`` reads and writes
on shared memory, about 3 us, where an SQLite write transaction is tens of microseconds
(``bench/limits.py`` measures both). Every worker opens the file itself after the fork, so the
``flock`` of one excludes the others; the server resets it when it starts (``SharedBuckets.reset``).

    buckets = SharedBuckets(state_dir / "limits.bin")
    limiter = Limiter(buckets)
    headers = limiter.admit(caller)                 # RateLimited (429) with Retry-After when over
    hold = limiter.reserve_tokens(caller, 500)      # ... the generation runs ...
    limiter.settle(hold, used=212)                  # 288 tokens go back
"""

from __future__ import annotations

import fcntl
import hashlib
import mmap
import os
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from forwardpass.errors import PayloadTooLarge, RateLimited
from forwardpass.monitoring.keys import Caller

Headers = list[tuple[bytes, bytes]]

_MAGIC = b"FPLIMIT1"
_HEADER = 64
_SLOT = 64  # key hash (8) | requests, tokens, rows: level, stamp (3 x 16) | open streams (8)
_SLOTS = 4096  # keys tracked at once; 256 KiB
_DIMS = {"requests": 8, "tokens": 24, "rows": 40}
_STREAMS = 56
_FULL = 1e300  # a new bucket's level: min(capacity, ...) makes it full whatever the tier says
_PAIR = struct.Struct("<dd")
_COUNT = struct.Struct("<q")
_HASH = struct.Struct("<Q")


class SharedBuckets:
    """The buckets of every key, in a file mapped by each worker (see the module docstring)."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if os.fstat(fd).st_size < _HEADER + _SLOTS * _SLOT or os.pread(fd, 8, 0) != _MAGIC:
                _initialise(fd)
            fcntl.flock(fd, fcntl.LOCK_UN)
            self._map = mmap.mmap(fd, _HEADER + _SLOTS * _SLOT)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self._offsets: dict[str, int] = {}  # key id -> its slot's offset, found once per process
        self._thread_lock = threading.Lock()  # flock excludes processes; threads of one share its open file

    @staticmethod
    def reset(path: Path) -> None:
        """A fresh file: every bucket full, no stream open (the server calls this once, before its workers start)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            _initialise(fd)
        finally:
            os.close(fd)

    def close(self) -> None:
        self._map.close()
        os.close(self._fd)

    def take(self, key: str, dim: str, amount: float, capacity: float, rate: float, now: float,
             refund: float = 0.0) -> tuple[bool, float]:  # fmt: skip
        """Take ``amount`` from a bucket if it holds that much, after giving it back ``refund`` (a lease's unused
        part): (taken, level after, or the level it lacked from)."""
        at = _DIMS[dim]
        with self._locked(key) as slot:
            level = min(capacity, self._level(slot + at, capacity, rate, now) + refund)
            taken = level >= amount
            if taken:
                level -= amount
            if taken or refund:
                _PAIR.pack_into(self._map, slot + at, level, now)
            return taken, level

    def give_back(self, key: str, dim: str, amount: float, capacity: float, rate: float, now: float) -> float:
        """Return ``amount`` to a bucket (never past its capacity); the level after."""
        at = _DIMS[dim]
        with self._locked(key) as slot:
            level = min(capacity, self._level(slot + at, capacity, rate, now) + amount)
            _PAIR.pack_into(self._map, slot + at, level, now)
            return level

    def open_stream(self, key: str, limit: int) -> int:
        """Count one more open stream if fewer than ``limit`` are open: the count after, or -1 when full."""
        with self._locked(key) as slot:
            (count,) = _COUNT.unpack_from(self._map, slot + _STREAMS)
            if count >= limit:
                return -1
            _COUNT.pack_into(self._map, slot + _STREAMS, count + 1)
            return count + 1

    def close_stream(self, key: str) -> None:
        with self._locked(key) as slot:
            (count,) = _COUNT.unpack_from(self._map, slot + _STREAMS)
            _COUNT.pack_into(self._map, slot + _STREAMS, max(0, count - 1))

    def _level(self, at: int, capacity: float, rate: float, now: float) -> float:
        level, stamp = _PAIR.unpack_from(self._map, at)
        return min(capacity, level + max(0.0, now - stamp) * rate)

    def _locked(self, key: str) -> _SlotLock:
        return _SlotLock(self, key)

    def _offset(self, key: str) -> int:
        """The key's slot (called with the lock held): open addressing on a hash of the id, claimed on first use."""
        found = self._offsets.get(key)
        if found is not None:
            return found
        wanted = _HASH.unpack(hashlib.blake2b(key.encode(), digest_size=8).digest())[0] | 1 << 63  # 0 marks a free slot
        start = wanted % _SLOTS
        for probe in range(_SLOTS):
            at = _HEADER + ((start + probe) % _SLOTS) * _SLOT
            (held,) = _HASH.unpack_from(self._map, at)
            if held == wanted:
                break
            if held == 0:
                _HASH.pack_into(self._map, at, wanted)
                now = time.monotonic()
                for dim_at in _DIMS.values():
                    _PAIR.pack_into(self._map, at + dim_at, _FULL, now)
                _COUNT.pack_into(self._map, at + _STREAMS, 0)
                break
        else:
            raise RuntimeError(f"the limits file {self.path} holds {_SLOTS} keys already; restart the server to reset it")
        self._offsets[key] = at
        return at


class _SlotLock:
    """``with`` a key's slot locked against every thread and process: yields its offset."""

    __slots__ = ("buckets", "key")

    def __init__(self, buckets: SharedBuckets, key: str):
        self.buckets, self.key = buckets, key

    def __enter__(self) -> int:
        self.buckets._thread_lock.acquire()
        fcntl.flock(self.buckets._fd, fcntl.LOCK_EX)
        return self.buckets._offset(self.key)

    def __exit__(self, *exc: object) -> None:
        fcntl.flock(self.buckets._fd, fcntl.LOCK_UN)
        self.buckets._thread_lock.release()


def _initialise(fd: int) -> None:
    """Zeros over the whole file, then the magic (written, never truncated: a process mapping it must not fault)."""
    size = _HEADER + _SLOTS * _SLOT
    if os.fstat(fd).st_size < size:
        os.ftruncate(fd, size)
    os.pwrite(fd, bytes(size), 0)
    os.pwrite(fd, _MAGIC, 0)


@dataclass
class TokenHold:
    """Tokens a generation reserved; ``Limiter.settle`` gives back what it did not use (once)."""

    caller: Caller
    amount: int
    settled: bool = False


LEASE_SECONDS = 0.01  # a worker may take this long's refill of a fast bucket at once ...
LEASE_SHARE = 0.05  # ... and at most this share of its capacity


class Limiter:
    """A tier's limits applied to a caller, with OpenAI's x-ratelimit-* headers (and ``-rows`` for rows).

    Requests and rows of a fast tier are taken in leases: a worker takes ``LEASE_SECONDS`` of the bucket's
    refill at once (at most ``LEASE_SHARE`` of its capacity) and spends it without the shared lock, so that
    workers do not queue on one flock (a worker preempted while holding it stalls the others for a time
    slice). A lease is only taken where it holds two requests or more and the bucket has room for it; near
    the limit every take is exact again, and an expired lease's rest goes back. So the limit is never
    exceeded; another worker may wait up to ``LEASE_SECONDS`` of refill longer than it would have.
    """

    def __init__(self, buckets: SharedBuckets, clock: Callable[[], float] = time.monotonic):
        self.buckets, self.clock = buckets, clock
        self._leases: dict[tuple[str, str], list[float]] = {}  # (key, dim) -> [left, until, level seen]
        self._lease_lock = threading.Lock()

    def _take(self, caller: Caller, dim: str, amount: float, capacity: float, rate: float) -> tuple[bool, float]:
        """``SharedBuckets.take`` through this worker's lease where the bucket is fast (see the class docstring)."""
        now = self.clock()
        lease = min(rate * LEASE_SECONDS, capacity * LEASE_SHARE)
        if lease < 2 * amount:
            return self.buckets.take(caller.id, dim, amount, capacity, rate, now)
        slot = (caller.id, dim)
        with self._lease_lock:
            held = self._leases.get(slot)
            if held is not None and held[1] > now and held[0] >= amount:
                held[0] -= amount
                return True, held[2] + held[0]  # the level when leased, with what is left of the lease
            refund = held[0] if held is not None else 0.0
            taken, level = self.buckets.take(caller.id, dim, amount + lease, capacity, rate, now, refund)
            if taken:
                self._leases[slot] = [lease, now + LEASE_SECONDS, level]
                return True, level + lease
            self._leases.pop(slot, None)
        return self.buckets.take(caller.id, dim, amount, capacity, rate, now)  # no room for a lease: exact

    def admit(self, caller: Caller) -> Headers:
        """One request of ``caller``: its headers, or RateLimited with the wait until a request fits."""
        tier = caller.tier
        if tier.requests_per_second is None:
            return []
        capacity, rate = tier.request_burst, tier.requests_per_second
        taken, level = self._take(caller, "requests", 1, capacity, rate)
        headers = _headers("requests", capacity, level, rate)
        if not taken:
            wait = (1 - level) / rate
            raise RateLimited(f"rate limit reached for key '{caller.id}' (tier '{caller.tier_name}'): "
                              f"{_number(rate)} requests/s with a burst of {int(capacity)}; retry in {wait:.2f} s",
                              wait, headers)  # fmt: skip
        return headers

    def token_capacity(self, caller: Caller) -> int | None:
        """The most tokens one generation of ``caller`` may reserve (None: no token limit)."""
        return caller.tier.tokens_per_minute

    def reserve_tokens(self, caller: Caller, amount: int) -> tuple[TokenHold | None, Headers]:
        """Reserve ``amount`` tokens (prompt + the most it may generate): the hold to settle, or RateLimited."""
        per_minute = caller.tier.tokens_per_minute
        if per_minute is None:
            return None, []
        rate = per_minute / 60.0
        taken, level = self.buckets.take(caller.id, "tokens", amount, per_minute, rate, self.clock())
        headers = _headers("tokens", per_minute, level, rate)
        if not taken:
            wait = (amount - level) / rate
            raise RateLimited(f"token rate limit reached for key '{caller.id}' (tier '{caller.tier_name}'): "
                              f"{per_minute} tokens/min, this request needs {amount} (prompt + max_tokens) and "
                              f"{int(level)} are left; retry in {wait:.2f} s or lower max_tokens",
                              wait, headers)  # fmt: skip
        return TokenHold(caller, amount), headers

    def settle(self, hold: TokenHold | None, used: int) -> None:
        """Charge ``used`` tokens of a reservation: the rest goes back to the bucket."""
        if hold is None or hold.settled:
            return
        hold.settled = True
        unused = hold.amount - used
        per_minute = hold.caller.tier.tokens_per_minute
        if unused > 0 and per_minute is not None:
            self.buckets.give_back(hold.caller.id, "tokens", unused, per_minute, per_minute / 60.0, self.clock())

    def take_rows(self, caller: Caller, rows: int) -> Headers:
        """Charge ``rows`` rows of a V2 or :predict request; RateLimited when the bucket lacks them."""
        per_minute = caller.tier.rows_per_minute
        if per_minute is None:
            return []
        rate = per_minute / 60.0
        if rows > per_minute:
            raise PayloadTooLarge(f"the request has {rows} rows, more than key '{caller.id}' may send in a minute "
                                  f"({per_minute}, tier '{caller.tier_name}'); split it into smaller requests")  # fmt: skip
        taken, level = self._take(caller, "rows", rows, per_minute, rate)
        headers = _headers("rows", per_minute, level, rate)
        if not taken:
            wait = (rows - level) / rate
            raise RateLimited(f"row rate limit reached for key '{caller.id}' (tier '{caller.tier_name}'): {per_minute} "
                              f"rows/min, this request has {rows} and {int(level)} are left; retry in {wait:.2f} s",
                              wait, headers)  # fmt: skip
        return headers

    def open_stream(self, caller: Caller) -> Callable[[], None] | None:
        """Count a streamed answer of ``caller``: the function that closes it (call it once), or RateLimited."""
        limit = caller.tier.concurrent_streams
        if limit is None:
            return None
        if self.buckets.open_stream(caller.id, limit) < 0:
            raise RateLimited(f"key '{caller.id}' has {limit} streams open, the most its tier '{caller.tier_name}' "
                              "allows; close one, or retry when one ends", 1.0)  # fmt: skip
        closed = False

        def close() -> None:
            nonlocal closed
            if not closed:
                closed = True
                self.buckets.close_stream(caller.id)

        return close


_NAMES = {dim: tuple(b"x-ratelimit-%s-%s" % (part, dim.encode()) for part in (b"limit", b"remaining", b"reset"))
          for dim in ("requests", "tokens", "rows")}  # fmt: skip


def _headers(dim: str, capacity: float, level: float, rate: float) -> Headers:
    limit, remaining, reset = _NAMES[dim]
    return [(limit, b"%d" % capacity), (remaining, b"%d" % (level if level > 0 else 0)),
            (reset, duration((capacity - level) / rate).encode())]  # fmt: skip


def duration(seconds: float) -> str:
    """OpenAI's reset format: '0s', '250ms', '1.5s', '6m0s', '1h2m3s'."""
    if seconds <= 0:
        return "0s"
    if seconds < 1:
        return f"{max(1, round(seconds * 1000))}ms"
    if seconds < 60:
        return f"{seconds:.3g}s"
    whole = round(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return (f"{hours}h" if hours else "") + f"{minutes}m{secs}s"


def _number(value: float) -> str:
    return f"{value:g}"

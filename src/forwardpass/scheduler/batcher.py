"""Dynamic batching decisions as a pure function of the queue and the clock.

``plan(queue, now, policy)`` says which queued requests to run together now, which have
timed out, and when to look again. It never sleeps or reads a clock, so it is unit-tested
with plain numbers; scheduler/dynamic.py applies it on the event loop.

Rules (Triton's dynamic batcher, batching by rows):
- requests merge only when their non-batch shapes and datatypes agree (``signature``);
  the oldest request's group goes first, in arrival order;
- a batch never exceeds ``max_batch_size`` rows;
- with no queue delay, whatever is queued runs as soon as an instance is free;
- with a delay, a batch waits for more rows until the oldest request has waited
  ``max_queue_delay`` or the batch is full; preferred sizes dispatch as soon as reached,
  and when the delay ends the largest preferred prefix is taken if there is one;
- a request past its deadline is expired instead of run.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Policy:
    """How one model version batches."""

    max_batch_size: int = 64
    max_queue_delay: float = 0.0  # seconds
    preferred_batch_sizes: tuple[int, ...] = ()


@dataclass
class Pending:
    """A queued request: its row count, merge signature, arrival time and deadline."""

    rows: int
    signature: Hashable
    enqueued: float
    deadline: float | None = None
    payload: Any = field(default=None, compare=False)


@dataclass(frozen=True)
class Decision:
    """take: queue indices to run now (in order); expired: indices past their deadline;
    wake_at: when to decide again if nothing new arrives (None: only on arrival)."""

    take: tuple[int, ...] = ()
    expired: tuple[int, ...] = ()
    wake_at: float | None = None


def plan(queue: Sequence[Pending], now: float, policy: Policy) -> Decision:
    """Decide what to run from ``queue`` (oldest first) at time ``now``."""
    expired = tuple(i for i, p in enumerate(queue) if p.deadline is not None and p.deadline <= now)
    live = [i for i in range(len(queue)) if i not in expired] if expired else list(range(len(queue)))
    if not live:
        return Decision(expired=expired)
    head = queue[live[0]]
    group: list[int] = []
    rows = 0
    full = False
    for i in live:
        item = queue[i]
        if item.signature != head.signature:
            continue
        if rows + item.rows > policy.max_batch_size and group:
            full = True  # the next same-shape request does not fit: this batch cannot grow
            break
        group.append(i)
        rows += item.rows
    full = full or rows >= policy.max_batch_size
    next_deadline = min((d for i in live if (d := queue[i].deadline) is not None), default=None)

    if policy.max_queue_delay <= 0 or full:
        return Decision(take=tuple(group), expired=expired)
    preferred = sorted(s for s in policy.preferred_batch_sizes if s <= policy.max_batch_size)
    if preferred and rows >= preferred[-1]:
        return Decision(take=_preferred_prefix(queue, group, preferred), expired=expired)
    due = head.enqueued + policy.max_queue_delay
    if now >= due:
        take = _preferred_prefix(queue, group, preferred) if preferred else tuple(group)
        return Decision(take=take, expired=expired)
    wake = due if next_deadline is None else min(due, next_deadline)
    return Decision(expired=expired, wake_at=wake)


def _preferred_prefix(queue: Sequence[Pending], group: list[int], preferred: list[int]) -> tuple[int, ...]:
    """The longest prefix of ``group`` whose rows are a preferred size; the whole group if none is."""
    rows, best = 0, 0
    for n, i in enumerate(group, start=1):
        rows += queue[i].rows
        if rows in preferred:
            best = n
    return tuple(group[: best or len(group)])

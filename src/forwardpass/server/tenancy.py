"""Tenants on the HTTP path: each request's caller, its tier's limits, and what it used, metered per key.

``Keys.guard`` (server/auth.py) identifies the caller and calls ``Tenancy.admit``, which checks the
monthly quota and the request rate and hangs a ``Charge`` on the request. Handlers add to it what
only they know (the model, rows, a generation's tokens, an open stream); ``App.dispatch`` calls
``finish`` with the response: x-ratelimit-* headers, tokens settled, the stream closed, usage
recorded. A streamed answer finishes when its last chunk went out or its client left.

With no limited tier in use, a request costs a dictionary update (metering) and nothing more.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from forwardpass.errors import Forbidden, InvalidInput, QuotaExceeded, shown
from forwardpass.monitoring import default_state_dir
from forwardpass.monitoring.keys import ANONYMOUS, Caller, Tiers
from forwardpass.monitoring.limits import Headers, Limiter, SharedBuckets, TokenHold
from forwardpass.monitoring.usage import Meter, next_month, open_usage, today, totals
from forwardpass.server import metrics
from forwardpass.server.config import ServeConfig
from forwardpass.server.http import Finally, Request, Response, StreamingResponse

log = logging.getLogger("forwardpass.server")


@dataclass(slots=True)
class Charge:
    """One request's usage as it is served (see the module docstring)."""

    caller: Caller
    started: float
    model: str = ""
    metered: bool = False  # an inference request (metadata and listings are not metered)
    rows: int = 0
    sequences: Sequence[Any] = ()  # a generation's choices: tokens are read from them when it ends
    prompt_tokens: int = 0
    headers: Headers = field(default_factory=list)
    hold: TokenHold | None = None
    close_stream: Callable[[], None] | None = None


class Tenancy:
    """Limits and metering for the callers ``Keys`` identifies."""

    def __init__(self, tiers: Tiers, meter: Meter | None, limits_path: Path | None):
        self.tiers, self.meter = tiers, meter
        self._limits_path = limits_path
        self._limiter: Limiter | None = None

    @classmethod
    def none(cls) -> Tenancy:
        """No metering and the built-in tiers (handlers built without a server's tenancy)."""
        return cls(Tiers.load(None), None, None)

    @property
    def limiter(self) -> Limiter:
        """The shared buckets, opened on the first limited caller (an unlimited server never maps the file)."""
        if self._limiter is None:
            if self._limits_path is None:
                raise RuntimeError("rate limits need a state folder (FORWARDPASS_STATE_DIR)")
            self._limiter = Limiter(SharedBuckets(self._limits_path))
        return self._limiter

    def applies(self, caller: Caller) -> bool:
        """Whether a caller's requests need a Charge: usage is metered, or its tier limits something."""
        return self.meter is not None or caller.tier.limited or caller.tier.monthly_requests is not None \
            or caller.tier.monthly_tokens is not None  # fmt: skip

    def admit(self, request: Request, caller: Caller, metered: bool, model: str = "") -> Charge:
        """A request of ``caller`` (``metered``: an inference route, recorded in usage): QuotaExceeded (403) past
        the monthly quota, RateLimited (429) past the rate."""
        tier = caller.tier
        if self.meter is not None and (tier.monthly_requests is not None or tier.monthly_tokens is not None):
            used_requests, used_tokens = self.meter.month_used(caller.id)
            for used, quota, what in ((used_requests, tier.monthly_requests, "requests"),
                                      (used_tokens, tier.monthly_tokens, "tokens")):  # fmt: skip
                if quota is not None and used >= quota:
                    resets = next_month(today())
                    raise QuotaExceeded(f"key '{caller.id}' has used its monthly quota of {quota} {what} (tier "
                                        f"'{caller.tier_name}'); it resets on {resets} (UTC)", resets)  # fmt: skip
        charge = Charge(caller, time.monotonic(), model, metered)
        if tier.requests_per_second is not None:
            charge.headers = self.limiter.admit(caller)
        request.charge = charge
        return charge

    def rows(self, request: Request, model: str, rows: int) -> None:
        """A V2 or :predict request's rows: metered, and taken from the tier's rows per minute."""
        charge = request.charge
        if charge is None:
            return
        charge.model, charge.rows = model, rows
        if charge.caller.tier.rows_per_minute is not None:
            charge.headers += self.limiter.take_rows(charge.caller, rows)

    def generation(self, request: Request, model: str, seq: Any, n: int, max_tokens_given: bool) -> None:
        """Reserve a generation's tokens (its prompt, and ``n`` choices of at most ``seq.limit`` tokens) before it
        is submitted. A reservation past the tier's tokens per minute shortens ``seq.limit`` when the client set
        no max_tokens, and is refused naming max_tokens when it did."""
        charge = request.charge
        if charge is None:
            return
        charge.model = model
        per_minute = charge.caller.tier.tokens_per_minute
        if per_minute is None:
            return
        prompt = len(seq.prompt)
        if prompt + n * seq.limit > per_minute:
            fits = (per_minute - prompt) // n
            if max_tokens_given or fits < 1:
                field_name = "max_tokens" if max_tokens_given and fits >= 1 else "messages"
                raise InvalidInput((field_name,), f"this request needs up to {prompt + n * seq.limit} tokens (prompt "
                                   f"{prompt} + {n} x max_tokens {seq.limit}); key '{charge.caller.id}' may use "
                                   f"{per_minute} a minute (tier '{charge.caller.tier_name}')"
                                   + (f": ask for max_tokens <= {fits}" if fits >= 1 else ": shorten the prompt"),
                                   seq.limit)  # fmt: skip
            seq.limit = fits
        charge.hold, headers = self.limiter.reserve_tokens(charge.caller, prompt + n * seq.limit)
        charge.headers += headers

    def model(self, request: Request, model: str) -> None:
        """The model a request named in its body (the OpenAI API's), for usage."""
        if request.charge is not None:
            request.charge.model = model

    def sequences(self, request: Request, sequences: Sequence[Any]) -> None:
        """The generation's choices, read when the request ends (tokens used, tokens cached)."""
        if request.charge is not None:
            request.charge.sequences = sequences

    def tokens(self, request: Request, model: str, prompt_tokens: int) -> None:
        """An embedding request: its input tokens, metered."""
        charge = request.charge
        if charge is not None:
            charge.model, charge.prompt_tokens = model, prompt_tokens

    def stream(self, request: Request) -> None:
        """A streamed answer opens: counted against the tier's concurrent streams until it ends."""
        charge = request.charge
        if charge is not None and charge.caller.tier.concurrent_streams is not None:
            charge.close_stream = self.limiter.open_stream(charge.caller)

    def finish(self, request: Request, response: Response | StreamingResponse) -> Response | StreamingResponse:
        """The response with its x-ratelimit-* headers; a whole answer is settled now, a streamed one when it ends."""
        charge = request.charge
        if charge is None:
            return response
        if charge.headers:
            response.headers.extend(charge.headers)
        if isinstance(response, StreamingResponse) and response.status < 400:
            response.chunks = Finally(response.chunks, lambda: self._settle(charge, 200))
        else:
            self._settle(charge, response.status)
        return response

    def _settle(self, charge: Charge, status: int) -> None:
        """Give back unused tokens, close the stream, record usage (once per request)."""
        prompt = charge.prompt_tokens
        cached = completion = 0
        if charge.sequences:
            first = charge.sequences[0]
            prompt, cached = len(first.prompt), first.cached_tokens
            completion = sum(len(s.tokens) for s in charge.sequences)
        if charge.hold is not None:
            self.limiter.settle(charge.hold, prompt + completion)
        if charge.close_stream is not None:
            charge.close_stream()
        if self.meter is not None and charge.metered:
            self.meter.record(charge.caller.id, charge.model, rows=charge.rows, prompt_tokens=prompt,
                              cached_tokens=cached, completion_tokens=completion,
                              seconds=time.monotonic() - charge.started, error=status >= 400)  # fmt: skip

    def close(self) -> None:
        if self.meter is not None:
            self.meter.close()

    # -- GET /v1/usage --------------------------------------------------------------------------

    async def usage(self, request: Request) -> Response:
        """Usage rows per key, model and day with their cost (the price table of tiers.yaml), and the totals.

        ``?key=ID&from=YYYY-MM-DD&to=YYYY-MM-DD``, all optional. A key sees its own usage only; an admin key,
        or anyone on a server whose keys are off, sees every key's."""
        if self.meter is None:
            raise InvalidInput(("metering",), "this server does not meter usage (started with metering off)")
        query = request.query("key=ID&from=YYYY-MM-DD&to=YYYY-MM-DD")
        unknown = sorted(set(query) - {"key", "from", "to"})
        if unknown:
            raise InvalidInput((unknown[0],), "unknown query parameter; /v1/usage takes key, from and to")
        start, end = (_day(query, name) for name in ("from", "to"))
        caller = request.charge.caller if request.charge is not None else None
        key = query.get("key")
        if caller is not None and not caller.admin and caller.id != ANONYMOUS:
            if key is not None and key != caller.id:
                raise Forbidden(f"key '{caller.id}' may read its own usage only (an admin key reads every key's)")
            key = caller.id
        rows = await asyncio.to_thread(self.meter.query, key, start, end)
        cost = self.tiers.add_costs(rows)
        return Response.json({"object": "list", "data": rows, "totals": {**totals(rows), "cost": cost},
                              "flush_interval_seconds": self.meter.interval})  # fmt: skip


def _day(query: dict[str, str], name: str) -> str | None:
    value = query.get(name)
    if value is None:
        return None
    try:
        return dt.date.fromisoformat(value).isoformat()
    except ValueError:
        raise InvalidInput((name,), "expected a day as YYYY-MM-DD (UTC)", shown(value)) from None


def state_dir(config: ServeConfig) -> Path:
    """Where usage and the shared limits live: ``state_dir``, else $FORWARDPASS_HOME/state."""
    return config.state_dir if config.state_dir is not None else default_state_dir()


def prepare_state(config: ServeConfig) -> None:
    """Before the workers start (``serve`` calls it once): a fresh limits file, the usage file made, the
    workers' metrics folder emptied."""
    path = state_dir(config) / "limits.bin"
    if path.exists():
        SharedBuckets.reset(path)
    if config.metering:
        open_usage(state_dir(config) / "usage.sqlite").close()
    peers = metrics.peers_of(config)
    if peers is not None:  # the metrics files of an earlier run's workers
        metrics.Peers.reset(peers.folder)


def tenancy_from_config(config: ServeConfig) -> Tenancy:
    """The server's tenancy: tiers.yaml, the usage meter (unless metering is off), the limits file's place."""
    folder = state_dir(config)
    meter = Meter(folder / "usage.sqlite", config.usage_flush_interval) if config.metering else None
    return Tenancy(Tiers.load(config.tiers_file), meter, folder / "limits.bin")

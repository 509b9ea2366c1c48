"""Model control: what gets loaded at start, hot reload from the folder, explicit load and unload.

    watcher = Watcher(repository, registry, serve, model_control="poll", poll_interval=2.0)
    await watcher.start()        # the start-up load the control mode asks for, then polling
    await watcher.load("iris")   # an explicit (re)load: LoadFailed names the reason
    await watcher.stop()

``model_control`` follows Triton's modes: ``poll`` loads every model and follows the folder every
``poll_interval`` seconds; ``explicit`` loads only ``load_models`` ("*": all) and then what
load()/unload() ask; ``none`` loads every model once and refuses load()/unload(). In every mode an
explicit unload() stays unloaded until an explicit load().

New versions are built and warmed before they replace the old ones, which finish their queues and
are then released (their memory handed back to the OS).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from typing import Any

from forwardpass import _memory
from forwardpass.engine.registry import Registry, Served
from forwardpass.errors import Forbidden, ForwardpassError, LoadFailed
from forwardpass.model import Model
from forwardpass.repository import Repository, check_name
from forwardpass.stats import Stats
from forwardpass.tasks import generative
from forwardpass.tensors import zeros

log = logging.getLogger("forwardpass.engine")

CONTROL_MODES = ("poll", "explicit", "none")
RETRY_MAX = 60.0  # seconds: the longest wait before another try of a load that failed for a passing cause


class Watcher:
    """Loads, reloads and unloads models into the registry; ``serve`` wraps a loaded Model for the data plane."""

    def __init__(self, repository: Repository, registry: Registry, serve: Callable[[Model], Served], *,
                 stats: Stats, executor: Executor, model_control: str = "poll", poll_interval: float = 2.0,
                 load_models: Sequence[str] = (), drain_timeout: float = 30.0):  # fmt: skip
        if model_control not in CONTROL_MODES:
            raise ValueError(f"model_control must be one of {CONTROL_MODES}, got {model_control!r}")
        self.repository, self.registry, self._serve = repository, registry, serve
        self.stats, self._executor = stats, executor
        self.model_control, self.poll_interval = model_control, poll_interval
        self.load_models, self.drain_timeout = list(load_models), drain_timeout
        self._seen: dict[str, tuple[Any, ...]] = {}  # what the folder looked like when last loaded
        self._poller: asyncio.Task[None] | None = None
        self._draining: set[asyncio.Task[None]] = set()
        self._retry: dict[str, tuple[float, float]] = {}  # name -> (when to try again, the delay before that)

    # -- lifecycle ---------------------------------------------------------------------------------

    async def start(self) -> None:
        """Load the models the control mode says (failures are logged and shown by the index), then poll."""
        names = self.repository.names()
        if self.model_control == "explicit" and "*" not in self.load_models:
            for name in self.load_models:
                self.repository.folder(name)  # a name that is not there fails the start, loudly
            names = [n for n in names if n in self.load_models]
        for name in names:
            try:
                await self._load(name)
            except ForwardpassError as exc:
                log.error("model %s not loaded: %s", name, exc)
        self.registry.ready = True
        if self.model_control == "poll" and self.poll_interval > 0:
            self._poller = asyncio.create_task(self._poll_forever())

    async def stop(self, timeout: float) -> None:
        """Stop polling; finish every queue (served and retiring) and close the language models."""
        if self._poller is not None:
            self._poller.cancel()
        closing = [asyncio.to_thread(g.close, timeout) for g in self.registry.generators().values()]
        await asyncio.gather(*(s.batcher.drain(timeout) for s in self.registry.all_served()), *self._draining, *closing)

    # -- explicit control --------------------------------------------------------------------------

    async def load(self, name: str) -> list[int]:
        """An explicit (re)load, as the repository API asks: serve the model from disk, and from now on
        follow it again if it was unloaded. LoadFailed (Triton's ``failed to load 'X'``) names the reason."""
        self._check_control("load")
        check_name(name)
        self.repository.folder(name)  # ModelNotFound for unknown names, as is
        self.registry.unloaded.discard(name)
        try:
            return await self._load(name)
        except ForwardpassError as exc:
            raise LoadFailed(f"failed to load '{name}': {self.registry.redact(exc.message)}") from None

    async def unload(self, name: str) -> None:
        """An explicit unload: stop serving a model until an explicit load(); queued requests still finish."""
        self._check_control("unload")
        check_name(name)
        self.repository.folder(name)
        self.registry.unloaded.add(name)
        await self._unload(name)

    def _check_control(self, action: str) -> None:
        if self.model_control == "none":
            raise Forbidden(f"repository control is off: this server runs with --model-control none, so models "
                            f"are loaded once at start and a {action} request is refused")  # fmt: skip

    # -- hot reload --------------------------------------------------------------------------------

    async def poll_once(self) -> None:
        """Load what changed on disk: new models, new or removed versions, edited model.yaml."""
        on_disk = set(self.repository.names())
        now = time.monotonic()
        for name in sorted(on_disk - self.registry.unloaded):
            retry = self._retry.get(name)
            if self._fingerprint(name) != self._seen.get(name) or (retry is not None and now >= retry[0]):
                try:
                    await self._load(name)
                    self._retry.pop(name, None)
                except ForwardpassError as exc:
                    self._seen[name] = self._fingerprint(name)  # do not retry a broken folder every poll...
                    self._retry_later(name, exc, now)  # ...unless the cause may pass (a remote that is down)
                    log.error("reload of %s failed, still serving the previous versions: %s", name, exc)
        for name in self.registry.serving() - on_disk:
            await self._unload(name)

    def _retry_later(self, name: str, exc: ForwardpassError, now: float) -> None:
        """Schedule another try of a load whose failure may pass by itself, backing off to RETRY_MAX seconds."""
        if getattr(exc, "retry_after", None) is None:
            self._retry.pop(name, None)
            return
        delay = min(RETRY_MAX, 2 * self._retry[name][1]) if name in self._retry else self.poll_interval
        self._retry[name] = (now + delay, delay)

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval)
            try:
                await self.poll_once()
            except Exception:  # a poll must never take the server down
                log.exception("model repository poll failed")

    # -- loading -----------------------------------------------------------------------------------

    async def _load(self, name: str) -> list[int]:
        """(Re)load a model from disk and serve it; old versions finish their queues, then go."""
        check_name(name)
        seen = self._fingerprint(name)
        self.registry.loading.add(name)
        try:
            try:
                config = self.repository.config(name)
                versions = self.repository.selected_versions(name, config)
            except ForwardpassError as exc:
                self.registry.fail(name, 0, str(exc))
                raise
            if generative(config) and versions:
                versions = [await self._load_generator(name, max(versions))]
            else:
                models = await asyncio.gather(*(asyncio.to_thread(self._open, name, v) for v in versions))
                fresh = {}
                for m in models:
                    try:
                        fresh[m.version] = self._serve(m)
                    except ForwardpassError as exc:  # a model.yaml its graph does not fit (sequence: names)
                        self.registry.fail(name, m.version, str(exc))
                        raise
                self.retire(self.registry.put(name, fresh))
        finally:
            self.registry.loading.discard(name)
        self._seen[name] = seen
        log.info("serving %s versions %s", name, versions)
        return versions

    def _open(self, name: str, version: int) -> Model:
        """One version loaded and warmed up (on a worker thread); a failure is recorded for the index."""
        try:
            model = self.repository.open(name, version)
        except ForwardpassError as exc:
            self.registry.fail(name, version, str(exc))
            raise
        _warm_up(model)
        return model

    async def _load_generator(self, name: str, version: int) -> int:
        """Language models are served by a continuous-batching scheduler (the OpenAI-compatible API), not V2."""
        from forwardpass.generation.scheduler import GenerationScheduler, warm_up

        def start() -> GenerationScheduler:
            llm = self._open_generator(name, version)
            scheduler = GenerationScheduler(llm, stats=self.stats.generation_stats(name, version))
            warm_up(scheduler)
            return scheduler

        scheduler = await asyncio.to_thread(start)
        old = self.registry.put_generator(name, scheduler)
        if old is not None:
            self._executor.submit(_close_and_release, old, self.drain_timeout)
        log.info("serving %s version %s (generation, %d slots)", name, version, scheduler.slots)
        return version

    def _open_generator(self, name: str, version: int) -> Any:
        try:
            return self.repository.open(name, version)
        except ForwardpassError as exc:
            self.registry.fail(name, version, str(exc))
            raise

    async def _unload(self, name: str) -> None:
        served, generator = self.registry.pop(name)
        if generator is not None:
            self._executor.submit(_close_and_release, generator, self.drain_timeout)
        self._seen.pop(name, None)
        self.retire(served)

    def retire(self, old: list[Served]) -> None:
        """Versions no longer served: each finishes its queue, then its memory goes back to the OS."""
        for served in old:
            task = asyncio.create_task(self._drain_and_release(served))
            self._draining.add(task)
            task.add_done_callback(self._draining.discard)

    async def _drain_and_release(self, served: Served) -> None:
        await served.batcher.drain()
        served.model.runtime.close()
        del served  # the last reference to its sessions: give their memory back to the OS
        await asyncio.to_thread(_memory.release)

    def _fingerprint(self, name: str) -> tuple[Any, ...]:
        folder = self.repository.path / name
        try:
            parts: list[Any] = [(folder / "model.yaml").stat().st_mtime_ns]
            for child in sorted(folder.iterdir()):
                if child.name.isascii() and child.name.isdigit() and child.is_dir():
                    onnx = child / "model.onnx"
                    parts.append((child.name, onnx.stat().st_mtime_ns if onnx.is_file() else 0))
            return tuple(parts)
        except OSError:
            return ()


def _close_and_release(scheduler: Any, timeout: float) -> None:
    scheduler.close(timeout)
    del scheduler  # the last reference to its sessions and KV cache: give their memory back to the OS
    _memory.release()


def _warm_up(model: Model) -> None:
    """One forward pass on zeros so the first request does not pay for allocation."""
    try:
        model.runtime.run({s.name: zeros(s.datatype, s.shape) for s in model.inputs})
    except Exception as exc:  # a model may reject zeros (a sample rate of 0): warm-up is best effort
        log.debug("warm-up of %s skipped: %s", model.name, exc)

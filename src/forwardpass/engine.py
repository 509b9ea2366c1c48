"""The data plane: every entrypoint (HTTP V2, the human endpoint, later batch and streaming) calls here.

    engine = Engine(Repository("models"))
    await engine.start()                                   # load, warm up, start hot reload
    outputs = await engine.infer("digits", None, request)  # a parsed V2 request
    answers = await engine.predict("iris", None, [{"sepal length (cm)": 5.1, ...}])
    await engine.stop()                                    # drain queues

Each served model version has one DynamicBatcher; the response cache sits in front of it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from forwardpass import _memory
from forwardpass.errors import (
    Forbidden,
    ForwardpassError,
    InvalidInput,
    LoadFailed,
    ModelNotFound,
    ModelNotReady,
    ModelUnavailable,
    WrongEndpoint,
)  # fmt: skip
from forwardpass.inference import InferRequest, InputTensor, OutputTensor, RequestedOutput
from forwardpass.model import Model
from forwardpass.pipeline import Plan
from forwardpass.repository import Repository, check_name
from forwardpass.runtime.onnx import AUTO_THREADS_THRESHOLD_MS, available_cores
from forwardpass.scheduler import DynamicBatcher, Policy, ResponseCache, cache_key
from forwardpass.scheduler.dynamic import BatcherClosed
from forwardpass.stats import ModelStats, Stats
from forwardpass.tensors import from_numpy, zeros

log = logging.getLogger("forwardpass.engine")


@dataclass
class Served:
    """A model version being served: the model, its batcher and its statistics."""

    model: Model
    batcher: DynamicBatcher
    stats: ModelStats
    batchable: bool
    cache_enabled: bool
    all_outputs: dict[bool, list[RequestedOutput]]  # what "no outputs listed" means, JSON and binary


CONTROL_MODES = ("poll", "explicit", "none")


class Engine:
    """Serves a repository: batchers per model version, response cache, hot reload.

    ``model_control`` follows Triton's modes: ``poll`` loads every model and follows the folder every
    ``poll_interval`` seconds; ``explicit`` loads only ``load_models`` ("*": all) and then what
    load()/unload() ask; ``none`` loads every model once and refuses load()/unload(). In every mode an
    explicit unload() stays unloaded until an explicit load().
    """

    def __init__(
        self,
        repository: Repository,
        *,
        cache_bytes: int = 64 * 2**20,
        poll_interval: float = 2.0,
        stats: Stats | None = None,
        model_control: str = "poll",
        load_models: Sequence[str] = (),
    ):
        if model_control not in CONTROL_MODES:
            raise ValueError(f"model_control must be one of {CONTROL_MODES}, got {model_control!r}")
        _memory.tune()
        self.repository = repository
        self.stats = stats or Stats()
        self.cache = ResponseCache(cache_bytes)
        self.poll_interval = poll_interval
        self.model_control = model_control
        self.load_models = list(load_models)
        self.ready = False
        self._unloaded: set[str] = set()  # unloaded on request: the poller leaves them alone
        self._loading: set[str] = set()
        self._served: dict[str, dict[int, Served]] = {}
        self._generators: dict[str, Any] = {}  # language models: name -> GenerationScheduler
        self.drain_timeout = 30.0
        self._seen: dict[str, tuple[Any, ...]] = {}  # what the folder looked like when last loaded
        self._executor = ThreadPoolExecutor(max_workers=max(2, available_cores()), thread_name_prefix="forwardpass")
        self._poller: asyncio.Task[None] | None = None
        # requests the HTTP layer has received and not yet answered, when it can tell (its own
        # protocol can; ASGI servers cannot, and the batcher then yields once to find out)
        self.pending: Callable[[], int] | None = None
        self._draining: set[asyncio.Task[None]] = set()

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        """Load the models the control mode says (failures are logged and reported by index()), then turn ready."""
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
        self.ready = True
        if self.model_control == "poll" and self.poll_interval > 0:
            self._poller = asyncio.create_task(self._poll_forever())

    async def stop(self, timeout: float = 30.0) -> None:
        """Stop hot reload, finish queued requests, release threads."""
        self.ready = False
        if self._poller is not None:
            self._poller.cancel()
        batchers = [s.batcher for versions in self._served.values() for s in versions.values()]
        await asyncio.gather(*(b.drain(timeout) for b in batchers), *self._draining,
                             *(asyncio.to_thread(g.close, timeout) for g in self._generators.values()))  # fmt: skip
        self._executor.shutdown(wait=False)

    # -- what is served ------------------------------------------------------------------------

    def served(self, name: str, version: int | None = None) -> Served:
        """The served version (newest when None); otherwise ModelNotFound (no such model or version),
        WrongEndpoint (a language model), ModelNotReady (loading: retry) or ModelUnavailable (unloaded, failed)."""
        versions = self._served.get(name)
        if versions:
            key = max(versions) if version is None else version
            served = versions.get(key)
            if served is not None:
                return served
        if name in self._generators:
            raise _language_model_elsewhere(name)
        self.repository.folder(name)  # InvalidModelName / ModelNotFound for unknown names
        if version is not None and version not in self.repository.versions(name):
            raise ModelNotFound(f"model '{name}' has no version {version}")
        which = f"model '{name}'" + (f" version {version}" if version else "")
        if not self.ready or name in self._loading:
            raise ModelNotReady(f"{which} is loading; retry in a moment", retry_after=1.0)
        if self._task(name) == "generation":
            raise _language_model_elsewhere(name)
        raise ModelUnavailable(f"{which} is not loaded: {self._why_not_loaded(name, version)}")

    def _task(self, name: str) -> str | None:
        try:
            return self.repository.config(name).task
        except ForwardpassError:
            return None

    def _why_not_loaded(self, name: str, version: int | None) -> str:
        if name in self._unloaded:
            return f"it was unloaded; load it with POST /v2/repository/models/{name}/load"
        reasons = [s.reason for s in self.repository.status() if s.name == name and s.reason
                   and (version is None or s.version == version)]  # fmt: skip
        return ("it failed to load: " + self._redact(reasons[-1])) if reasons else "it is not loaded"

    def _redact(self, message: str) -> str:
        """A message without the repository's absolute path (clients need not know the server's folders)."""
        root = str(self.repository.path.resolve())
        return message.replace(root + "/", "").replace(root, "<repository>")

    def names(self) -> list[str]:
        """Models with at least one version served."""
        return sorted(n for n, v in self._served.items() if v)

    def versions(self, name: str) -> list[int]:
        """Versions of a model being served."""
        return sorted(self._served.get(name, {}))

    def index(self) -> list[dict[str, Any]]:
        """Every model version on disk with its state (the repository extension's index)."""
        out = []
        for status in self.repository.status():
            state = "READY" if status.version in self._served.get(status.name, {}) else status.state
            state = "UNAVAILABLE" if state == "UNLOADED" and status.reason else state
            entry = {"name": status.name, "version": str(status.version), "state": state}
            if status.reason:
                entry["reason"] = self._redact(status.reason)
            out.append(entry)
        return out

    # -- loading and hot reload ------------------------------------------------------------------

    async def load(self, name: str) -> list[int]:
        """An explicit (re)load, as the repository API asks: serve the model from disk, and from now on
        follow it again if it was unloaded. LoadFailed (Triton's ``failed to load 'X'``) names the reason."""
        self._check_control("load")
        check_name(name)
        self.repository.folder(name)  # ModelNotFound for unknown names, as is
        self._unloaded.discard(name)
        try:
            return await self._load(name)
        except ForwardpassError as exc:
            raise LoadFailed(f"failed to load '{name}': {self._redact(exc.message)}") from None

    async def _load(self, name: str) -> list[int]:
        """(Re)load a model from disk and serve it; old versions finish their queues, then go."""
        check_name(name)
        seen = self._fingerprint(name)
        self._loading.add(name)
        try:
            if self.repository.config(name).task == "generation":
                return await self._load_generator(name, seen)
            versions = await asyncio.to_thread(self.repository.reload, name)
            fresh = {v: self._serve(self.repository.get(name, v)) for v in versions}
            await asyncio.gather(*(asyncio.to_thread(_warm_up, s.model) for s in fresh.values()))
        finally:
            self._loading.discard(name)
        old = self._served.get(name, {})
        self._served[name] = fresh
        self._seen[name] = seen
        self._retire(old.values())
        log.info("serving %s versions %s", name, versions)
        return versions

    def _check_control(self, action: str) -> None:
        if self.model_control == "none":
            raise Forbidden(f"repository control is off: this server runs with --model-control none, so models "
                            f"are loaded once at start and a {action} request is refused")  # fmt: skip

    async def _load_generator(self, name: str, seen: tuple[Any, ...]) -> list[int]:
        """Language models are served by the OpenAI-compatible API (a continuous-batching scheduler), not V2."""
        from forwardpass.generation.scheduler import GenerationScheduler, warm_up

        versions = await asyncio.to_thread(self.repository.reload, name)
        version = max(versions)
        llm = self.repository.get(name, version)

        def start() -> GenerationScheduler:
            scheduler = GenerationScheduler(llm, stats=self.stats.generation_stats(name, version))
            warm_up(scheduler)
            return scheduler

        scheduler = await asyncio.to_thread(start)
        old = self._generators.get(name)
        self._generators[name] = scheduler
        self._seen[name] = seen
        if old is not None:
            self._executor.submit(_close_and_release, old, self.drain_timeout)
        log.info("serving %s version %s (generation, %d slots)", name, version, scheduler.slots)
        return [version]

    def generator(self, name: str) -> Any:
        """The GenerationScheduler of a served language model; ModelNotFound / ModelNotReady otherwise."""
        found = self._generators.get(name)
        if found is not None:
            return found
        self.repository.folder(name)  # InvalidModelName / ModelNotFound for unknown names
        if self.repository.config(name).task != "generation":
            raise ModelNotFound(f"model '{name}' is not a language model (task {self.repository.config(name).task}); "
                                f"use /v2/models/{name}/infer")  # fmt: skip
        if not self.ready or name in self._loading:
            raise ModelNotReady(f"model '{name}' is loading; retry in a moment", retry_after=1.0)
        raise ModelUnavailable(f"model '{name}' is not loaded: {self._why_not_loaded(name, None)}")

    def generators(self) -> dict[str, Any]:
        """Served language models by name."""
        return dict(self._generators)

    async def unload(self, name: str) -> None:
        """An explicit unload: stop serving a model until an explicit load(); queued requests still finish."""
        self._check_control("unload")
        check_name(name)
        self.repository.folder(name)
        self._unloaded.add(name)
        await self._unload(name)

    async def _unload(self, name: str) -> None:
        generator = self._generators.pop(name, None)
        if generator is not None:
            self._executor.submit(_close_and_release, generator, self.drain_timeout)
        old = self._served.pop(name, {})
        self._seen.pop(name, None)
        self.repository.unload(name)
        self._retire(old.values())

    def _retire(self, old: Any) -> None:
        for served in old:
            task = asyncio.create_task(self._drain_and_release(served))
            self._draining.add(task)
            task.add_done_callback(self._draining.discard)

    async def _drain_and_release(self, served: Served) -> None:
        await served.batcher.drain()
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

    async def poll_once(self) -> None:
        """Load what changed on disk: new models, new or removed versions, edited model.yaml."""
        on_disk = set(self.repository.names())
        for name in sorted(on_disk - self._unloaded):
            if self._fingerprint(name) != self._seen.get(name):
                try:
                    await self._load(name)
                except ForwardpassError as exc:
                    self._seen[name] = self._fingerprint(name)  # do not retry a broken folder every poll
                    log.error("reload of %s failed, still serving the previous versions: %s", name, exc)
        for name in (set(self._served) | set(self._generators)) - on_disk:
            await self._unload(name)

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval)
            try:
                await self.poll_once()
            except Exception:  # a poll must never take the server down
                log.exception("model repository poll failed")

    def _crowded(self) -> bool:
        # other requests are in flight: queue, so that they batch together
        return (self.pending() if self.pending is not None else self.stats.inflight) > 1

    def _serve(self, model: Model) -> Served:
        config = model.config
        batchable = all(s.shape[:1] == [-1] for s in model.inputs) and all(s.shape[:1] == [-1] for s in model.outputs)
        names = [s.name for s in model.outputs]
        run_list = model.runtime.prepare(names)

        def run(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            return dict(zip(names, run_list(feeds)))

        probe = model.runtime.probe_ms
        inline = config.instances == 1 and probe is not None and probe < AUTO_THREADS_THRESHOLD_MS
        stats = self.stats.stats(model.name, model.version)
        policy = Policy(
            max_batch_size=config.batching.max_batch_size if batchable else 1,
            max_queue_delay=config.batching.max_queue_delay_ms / 1000,
            preferred_batch_sizes=tuple(config.batching.preferred_batch_sizes),
        )
        batcher = DynamicBatcher(
            run, policy, instances=config.instances, inline=inline, max_queue_size=config.batching.max_queue_size,
            executor=self._executor, on_batch=stats.batch, crowded=self._crowded, settle=self.pending is None,
        )  # fmt: skip
        every = {b: [RequestedOutput(n, b) for n in names] for b in (False, True)}
        return Served(model, batcher, stats, batchable, config.cache.enabled, every)

    # -- inference -------------------------------------------------------------------------------

    async def infer(
        self, name: str, version: int | None, request: InferRequest, served: Served | None = None
    ) -> tuple[Served, list[OutputTensor]]:
        """A V2 inference: tensors (or BYTES into pre-processing) in, the requested outputs out.

        ``served`` is the version the caller resolved before reading the body; if it is replaced
        meanwhile and no version was asked for, the request moves to the new one.
        """
        served = served or self.served(name, version)
        try:
            return await self._infer(served, request)
        except BatcherClosed:
            if version is not None:
                raise
            return await self._infer(self.served(name), request)

    async def _infer(self, served: Served, request: InferRequest) -> tuple[Served, list[OutputTensor]]:
        name = served.model.name
        start = time.monotonic()
        try:
            model = served.model
            wanted = self._requested_outputs(served, request)
            feeds = self._feeds(model, request)
            if isinstance(feeds, Plan):
                feeds = await self._run_plan(feeds)
            key = None
            if served.cache_enabled:
                key = cache_key(name, model.version, ((t.name, t.datatype, t.shape, _bytes(t)) for t in request.inputs),
                                _cache_params(request.parameters), [(o.name, o.classification) for o in wanted])  # fmt: skip
            outputs, queued, cached = await self._run(served, feeds, key, request.parameters.get("timeout"))
            result = [self._output(model, o, outputs[o.name]) for o in wanted]
            rows = _rows(feeds)
        except BatcherClosed:
            raise  # retried on the current version: not a failure of this one
        except ForwardpassError as exc:
            served.stats.request(exc.status, time.monotonic() - start)
            raise
        served.stats.request(200, time.monotonic() - start, queued, rows, cached)
        return served, result

    async def predict(
        self, name: str, version: int | None, instances: list[Any], top_k: int | None = None
    ) -> tuple[Served, list[dict[str, Any]]]:
        """The human endpoint: instances through pre-processing, the model and post-processing."""
        try:
            return await self._predict(self.served(name, version), instances, top_k)
        except BatcherClosed:
            if version is not None:
                raise
            return await self._predict(self.served(name), instances, top_k)

    async def _predict(self, served: Served, instances: list[Any], top_k: int | None) -> tuple[Served, list[dict[str, Any]]]:
        start = time.monotonic()
        try:
            if not isinstance(instances, list):
                raise InvalidInput(("instances",), "expected a list", type(instances).__name__)
            feeds = await self._run_plan(served.model.plan(instances))
            outputs, queued, _ = await self._run(served, feeds, None, None)
            answers = served.model.postprocess(outputs, top_k)
            answers = answers.to_list() if hasattr(answers, "to_list") else {k: v.tolist() for k, v in answers.items()}
        except BatcherClosed:
            raise  # retried on the current version: not a failure of this one
        except ForwardpassError as exc:
            served.stats.request(exc.status, time.monotonic() - start)
            raise
        served.stats.request(200, time.monotonic() - start, queued, _rows(feeds))
        return served, answers

    async def _run(
        self, served: Served, feeds: dict[str, np.ndarray], key: bytes | None, timeout_us: Any
    ) -> tuple[dict[str, np.ndarray], float, bool]:
        if key is not None:
            hit = self.cache.get(key)
            if hit is not None:
                served.stats.cache_hits += 1
                return hit, 0.0, True
            served.stats.cache_misses += 1
        timeout_ms = served.model.config.batching.timeout_ms
        if timeout_us is not None:
            if not isinstance(timeout_us, (int, float)) or timeout_us <= 0:
                raise InvalidInput(("parameters", "timeout"), "expected microseconds > 0", timeout_us)
            timeout_ms = timeout_us / 1000
        deadline = None if timeout_ms is None else time.monotonic() + timeout_ms / 1000
        # batchable: the batcher merges by (input, dtype, non-batch shape), computed only if it queues
        signature: Hashable | None = None if served.batchable else object()
        outputs, queued, _ = await served.batcher.submit(feeds, _rows(feeds) if served.batchable else 1, signature,
                                                         deadline)  # fmt: skip
        if key is not None:
            self.cache.put(key, outputs)
        return outputs, queued, False

    async def _run_plan(self, plan: Plan) -> dict[str, np.ndarray]:
        """Pre-processing whose cost grows with the request (decoding, resizing, tokenizing) runs on a
        worker thread, so that one large request never holds up the event loop; tiny work runs here."""
        if not plan.off_loop:
            return plan.run()
        return await asyncio.get_running_loop().run_in_executor(self._executor, plan.run)

    def _feeds(self, model: Model, request: InferRequest) -> dict[str, np.ndarray] | Plan:
        """Request tensors -> validated model inputs; raw BYTES -> the plan of the declared pre-processing."""
        specs = {s.name: s for s in model.inputs}

        def raw_data(t: InputTensor) -> bool:  # BYTES where the model takes no BYTES: images, text, audio
            return t.datatype == "BYTES" and (t.name not in specs or specs[t.name].datatype != "BYTES")

        if model.pre.takes_raw and any(raw_data(t) for t in request.inputs):
            if len(request.inputs) != 1:
                raise InvalidInput(("inputs",), f"send one BYTES input of raw {model.pre_kind} data for this model's "
                                   f"pre-processing, got {len(request.inputs)} inputs")  # fmt: skip
            tensor = request.inputs[0]
            raw = tensor.array.reshape(-1).tolist()
            return model.plan([_text(tensor.name, v) for v in raw] if model.pre_kind == "text" else raw)
        feeds = {}
        for t in request.inputs:
            spec = specs.get(t.name)
            if spec is None:
                raise InvalidInput(("inputs", t.name), f"unknown input; the model takes {list(specs)}")
            if t.datatype != spec.datatype:
                raise InvalidInput(("inputs", t.name, "datatype"), f"expected {spec.datatype}", t.datatype)
            array = t.array
            if t.datatype == "BYTES":  # ONNX Runtime's string tensors take str
                array = np.array([_text(t.name, v) for v in array.reshape(-1).tolist()], dtype=object).reshape(array.shape)
            feeds[t.name] = array
        return model.check(feeds)

    def _requested_outputs(self, served: Served, request: InferRequest) -> list[RequestedOutput]:
        if request.outputs is None:
            return served.all_outputs[request.binary_output]
        names = [s.name for s in served.model.outputs]
        for o in request.outputs:
            if o.name not in names:
                raise InvalidInput(("outputs", o.name), f"unknown output; the model has {names}")
        return request.outputs

    def _output(self, model: Model, wanted: RequestedOutput, array: np.ndarray) -> OutputTensor:
        if wanted.classification:
            if array.dtype.kind not in "iuf":
                raise InvalidInput(("outputs", wanted.name, "parameters", "classification"),
                                   f"ranks numbers, and output '{wanted.name}' is {from_numpy(array.dtype)}: "
                                   "ask for classification on a score output")  # fmt: skip
            # as Triton: top k per batch row when the model batches (max_batch_size > 0), else of the whole output
            batched = all(s.shape[:1] == [-1] for s in (*model.inputs, *model.outputs)) and array.ndim > 0
            classes = _classes(array, wanted.classification, model.labels, batched)
            return OutputTensor(wanted.name, "BYTES", classes, wanted.binary)
        return OutputTensor(wanted.name, from_numpy(array.dtype), array, wanted.binary)


def _classes(array: np.ndarray, k: int, labels: list[str] | None, batched: bool) -> np.ndarray:
    """Triton's classification extension: the top k as 'value:index[:label]' strings, [rows, k] or [k]."""
    rows = array.reshape(len(array), -1) if batched else array.reshape(1, -1)
    k = min(k, rows.shape[1])
    # stable on the negated scores: ties keep index order; float64 so that unsigned scores negate too
    order = np.argsort(-rows.astype(np.float64), axis=1, kind="stable")[:, :k]
    out = np.empty((len(rows), k), dtype=object)
    for r, (row, idx) in enumerate(zip(rows.tolist(), order.tolist())):
        for j, c in enumerate(idx):
            label = f":{labels[c]}" if labels and c < len(labels) else ""
            out[r, j] = f"{row[c]:f}:{c}{label}".encode()
    return out if batched else out.reshape(k)


def _language_model_elsewhere(name: str) -> WrongEndpoint:
    return WrongEndpoint(f"model '{name}' is a language model: use the OpenAI-compatible API (POST /v1/chat/completions "
                         "or /v1/completions), not V2 infer or :predict")  # fmt: skip


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


def _text(name: str, value: Any) -> str:
    if not isinstance(value, bytes):
        return str(value)
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidInput(("inputs", name, "data"), "expected UTF-8 text", value[:16]) from None


def _rows(feeds: dict[str, np.ndarray]) -> int:
    first = next(iter(feeds.values()))
    return int(first.shape[0]) if first.ndim else 1


def _bytes(tensor: Any) -> bytes | memoryview:
    if tensor.raw is not None:
        return tensor.raw
    if tensor.datatype == "BYTES":
        return b"\x00".join(len(v).to_bytes(4, "little") + v for v in tensor.array.reshape(-1).tolist())
    return np.ascontiguousarray(tensor.array).tobytes()


def _cache_params(parameters: dict[str, Any]) -> dict[str, Any]:
    # transport details do not change an answer
    return {k: v for k, v in parameters.items() if k not in ("binary_data_output", "timeout")}

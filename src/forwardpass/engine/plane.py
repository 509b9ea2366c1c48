"""The data plane: requests in, answers out, through each served version's batcher and the response cache.

    plane = DataPlane(registry, stats, executor)
    served = plane.serve(model)                          # a loaded Model wrapped with its batcher
    served, outputs = await plane.infer(served, request)  # a parsed V2 request -> output tensors
    served, answers = await plane.predict(served, instances)

Validation happens once, in order: the request's shape here (inputs named and typed as the model
declares), the model's inputs in ``Model.check`` (dtypes, shapes, NaN), the forward pass's own refusals
in the runtime (mapped to InvalidInput there). Every entrypoint reaches the model through here or
through ``Model``'s synchronous facade over the same steps (plan, check, run, postprocess).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Hashable
from concurrent.futures import Executor
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from forwardpass.engine.registry import Served
from forwardpass.engine.sequences import Sequences, Step
from forwardpass.errors import ForwardpassError, InvalidInput
from forwardpass.inference import InferRequest, InputTensor, OutputTensor, RequestedOutput
from forwardpass.model import Model
from forwardpass.monitoring import default_state_dir
from forwardpass.monitoring.drift import monitor_for
from forwardpass.monitoring.predictions import log_for
from forwardpass.pipeline import Plan
from forwardpass.runtime.onnx import AUTO_THREADS_THRESHOLD_MS
from forwardpass.scheduler import DynamicBatcher, Policy, ResponseCache, cache_key
from forwardpass.scheduler.dynamic import BatcherClosed
from forwardpass.stats import Stats
from forwardpass.tensors import from_numpy


class DataPlane:
    """Runs requests on served versions: pre-processing plans, the response cache, dynamic batching, stats."""

    def __init__(self, stats: Stats, executor: Executor, cache: ResponseCache,
                 pending: Callable[[], int] | None = None, state_dir: Path | None = None):  # fmt: skip
        self.stats, self.cache, self._executor = stats, cache, executor
        self.state_dir = state_dir  # where prediction logs go (None: $FORWARDPASS_HOME/state)
        # requests the HTTP layer has received and not yet answered, when it can tell (its own
        # protocol can; ASGI servers cannot, and the batcher then yields once to find out)
        self._pending = pending

    def count_pending(self, pending: Callable[[], int]) -> None:
        """Tell the batchers built from now on how many requests the HTTP layer holds (see _crowded)."""
        self._pending = pending

    def _crowded(self) -> bool:
        # other requests are in flight: queue, so that they batch together
        return (self._pending() if self._pending is not None else self.stats.inflight) > 1

    def serve(self, model: Model) -> Served:
        """A loaded model version with its batcher, ready for requests."""
        config = model.config
        names = [s.name for s in model.outputs]
        run_list = model.runtime.prepare(names)
        sequences = Sequences(model, config.sequence) if config.sequence is not None else None
        if sequences is None:
            batchable = all(s.shape[:1] == [-1] for s in (*model.inputs, *model.outputs))

            def run(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
                return dict(zip(names, run_list(feeds)))
        else:  # steps of different sequences batch: states stacked batch first, moved to their axis around the pass
            seq = sequences
            states = {st.input for st in seq.config.state} | seq.state_outputs
            batchable = all(s.shape[:1] == [-1] for s in (*model.inputs, *model.outputs)
                            if s.name not in states and s.name not in seq.config.constants)  # fmt: skip

            def run(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
                return seq.from_model(dict(zip(names, run_list(seq.to_model(feeds)))))

        drift = monitor_for(model)  # reference.json: served batches go to the drift profiler (a queue put)
        if drift is not None:
            plain = run

            def run(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
                outputs = plain(feeds)
                drift.observe(feeds, outputs)
                return outputs

        probe = model.runtime.probe_ms
        inline = config.instances == 1 and probe is not None and probe < AUTO_THREADS_THRESHOLD_MS
        stats = self.stats.stats(model.name, model.version)
        stats.sequences, stats.drift = sequences, drift
        policy = Policy(
            max_batch_size=config.batching.max_batch_size if batchable else 1,
            max_queue_delay=config.batching.max_queue_delay_ms / 1000,
            preferred_batch_sizes=tuple(config.batching.preferred_batch_sizes),
        )
        batcher = DynamicBatcher(
            run, policy, instances=config.instances, inline=inline, max_queue_size=config.batching.max_queue_size,
            executor=self._executor, on_batch=stats.batch, crowded=self._crowded, settle=self._pending is None,
        )  # fmt: skip
        answered = [n for n in names if sequences is None or n not in sequences.state_outputs]
        if sequences is not None and sequences.config.events is not None:
            answered.append(sequences.config.events.name)  # the events each step completes (BYTES, JSON each)
        every = {b: [RequestedOutput(n, b) for n in answered] for b in (False, True)}
        cache = config.cache.enabled and sequences is None  # a stateful model's answer depends on its state
        predictions = log_for(model, self.state_dir or default_state_dir())  # model.yaml prediction_log
        return Served(model, batcher, stats, batchable, cache, every, sequences, drift, predictions)

    async def infer(self, served: Served, request: InferRequest) -> tuple[Served, list[OutputTensor]]:
        name = served.model.name
        start = time.monotonic()
        try:
            model = served.model
            wanted = self._requested_outputs(served, request)
            if served.sequences is not None or request.parameters.get("sequence_id"):
                return await self._step(served, request, wanted, start)
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
            if served.log is not None and served.log.sampled():
                if request.id is None:  # the response returns it: feedback names the request by it
                    request.id = uuid.uuid4().hex
                served.log.add(request.id, request.caller, time.monotonic() - start, rows,
                               {t.name: t.array for t in request.inputs}, outputs)  # fmt: skip
        except BatcherClosed:
            raise  # retried on the current version: not a failure of this one
        except ForwardpassError as exc:
            served.stats.request(exc.status, time.monotonic() - start)
            raise
        served.stats.request(200, time.monotonic() - start, queued, rows, cached)
        return served, result

    async def _step(self, served: Served, request: InferRequest, wanted: list[RequestedOutput],
                    start: float) -> tuple[Served, list[OutputTensor]]:  # fmt: skip
        """One step of a stateful model's sequence (Triton's sequence batcher: engine/sequences.py)."""
        model, sequences = served.model, served.sequences
        step = Step.from_parameters(request.parameters)
        if sequences is None:
            raise InvalidInput(("parameters", "sequence_id"), f"model '{model.name}' keeps no state between requests "
                               "(its model.yaml has no sequence: section): leave out the sequence parameters")  # fmt: skip
        if step is None:
            raise InvalidInput(("parameters", "sequence_id"), f"model '{model.name}' is stateful: name the request's "
                               "sequence with parameters sequence_id (and sequence_start: true on its first request, "
                               "sequence_end: true on its last)")  # fmt: skip
        feeds = self._feeds(model, request, sequences.filled)
        if isinstance(feeds, Plan):
            feeds = await self._run_plan(feeds)
        async with sequences.step(step) as context:
            outputs, queued, _ = await self._run(served, {**feeds, **context.feeds}, None,
                                                 request.parameters.get("timeout"))  # fmt: skip
            events = context.done(outputs)
        if sequences.config.events is not None:
            outputs = {**outputs, sequences.config.events.name: np.array(
                [orjson.dumps({"event": e.kind, "time": round(e.time, 6)}) for e in events], dtype=object)}
        result = [self._output(model, o, outputs[o.name]) for o in wanted]
        served.stats.request(200, time.monotonic() - start, queued, _rows(feeds))
        return served, result

    async def predict(self, served: Served, instances: list[Any], top_k: int | None, request_id: str | None = None,
                      caller: str | None = None) -> tuple[Served, Any]:  # fmt: skip
        """Answers as JSON-ready data: a list of answers, or {output: rows} for a model without post-processing.
        ``request_id`` and ``caller`` (the key id) go to the prediction log when the model keeps one."""
        start = time.monotonic()
        try:
            if not isinstance(instances, list):
                raise InvalidInput(("instances",), "expected a list", type(instances).__name__)
            feeds = await self._run_plan(served.model.plan(instances))
            outputs, queued, _ = await self._run(served, feeds, None, None)
            answers = served.model.postprocess(outputs, top_k)
            answers = answers.to_list() if hasattr(answers, "to_list") else {k: v.tolist() for k, v in answers.items()}
            if served.log is not None and request_id is not None and served.log.sampled():
                served.log.add(request_id, caller, time.monotonic() - start, len(instances), instances, outputs)
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

    def _feeds(self, model: Model, request: InferRequest,
               filled: frozenset[str] = frozenset()) -> dict[str, np.ndarray] | Plan:  # fmt: skip
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
            return model.plan([_text(tensor.name, v) for v in raw] if model.pre.text else raw)
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
        return model.check(feeds, filled)

    def _requested_outputs(self, served: Served, request: InferRequest) -> list[RequestedOutput]:
        if request.outputs is None:
            return served.all_outputs[request.binary_output]
        names = [s.name for s in served.model.outputs]
        if served.sequences is not None and served.sequences.config.events is not None:
            names.append(served.sequences.config.events.name)
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

"""Endpoint handlers: the Open Inference Protocol V2 (REST, binary tensors, repository and statistics
extensions), the human predict endpoint, and /metrics. Each turns a Request into a Response via the engine.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from typing import Any

import orjson

from forwardpass import __version__
from forwardpass.engine import Engine, Served
from forwardpass.errors import ForwardpassError, InvalidInput, ModelNotFound, ModelNotReady, UnsupportedMediaType
from forwardpass.server import metrics
from forwardpass.server.config import ServeConfig
from forwardpass.server.errors import error_response, shown
from forwardpass.server.http import Request, Response
from forwardpass.server.tenancy import Tenancy
from forwardpass.server.v2 import encode_response, parse_infer_off_loop

EXTENSIONS = ["binary_tensor_data", "classification", "model_repository", "statistics"]
_TRITON_TYPES = {"BOOL": "TYPE_BOOL", "BYTES": "TYPE_STRING", "FP16": "TYPE_FP16", "FP32": "TYPE_FP32",
                 "FP64": "TYPE_FP64"}  # fmt: skip
_READABLE = ("application/json", "application/octet-stream")
_NUMBER = re.compile(r"[0-9]{1,19}")  # ASCII digits only: str.isdigit() also takes '١٢' and '²'
_FORMATS = {"NCHW": "FORMAT_NCHW", "NHWC": "FORMAT_NHWC"}  # image pre-processing layout -> Triton's input format


def _version(version: str | None) -> int | None:
    if version is None:
        return None
    if not _NUMBER.fullmatch(version):
        raise ModelNotFound(f"version '{version[:40]}' is not a version number (ASCII digits, such as 1)")
    return int(version)


def _header_length(header: str | None, body_length: int) -> int | None:
    """Inference-Header-Content-Length: a byte count within the body (checked before int() reads it)."""
    if header is None:
        return None
    if not _NUMBER.fullmatch(header) or int(header) > body_length:
        raise InvalidInput(("Inference-Header-Content-Length",),
                           f"expected the JSON header's byte count, from 0 to the body's {body_length} bytes",
                           header[:40])  # fmt: skip
    return int(header)


def _check_content_type(request: Request) -> None:
    kind = request.header(b"content-type")
    if kind is not None and kind not in _READABLE and kind.split(";")[0].strip().lower() not in _READABLE:
        raise UnsupportedMediaType(f"Content-Type '{kind}' is not readable here; send application/json, or V2 "
                                   "binary tensors with Inference-Header-Content-Length")  # fmt: skip


def _json_body(request: Request) -> Any:
    if not request.body:
        return {}
    try:
        return orjson.loads(request.body)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(("body",), f"malformed JSON: {exc}") from None


class Handlers:
    """One instance per app; handler methods are what routes.py lists."""

    def __init__(self, engine: Engine, config: ServeConfig, tenancy: Tenancy | None = None):
        self.engine, self.config = engine, config
        self.tenancy = tenancy or Tenancy.none()
        self.peers = metrics.peers_of(config)  # --workers N: every worker's statistics in each /metrics

    # -- inference ---------------------------------------------------------------------------

    async def infer(self, request: Request, model: str, version: str | None = None) -> Response:
        pinned = _version(version)
        served = self.engine.served(model, pinned)  # 404 before reading a large body
        start = time.monotonic()
        try:
            _check_content_type(request)
            body = await request.read_body(self.config.max_body_bytes)
            header = _header_length(request.header(b"inference-header-content-length"), len(body))
            parsed = await parse_infer_off_loop(body, header, self.config.max_elements)
            self.tenancy.rows(request, model, max((t.shape[0] for t in parsed.inputs if t.shape), default=1))
            if request.charge is not None:
                parsed.caller = request.charge.caller.id
            served, outputs = await self.engine.infer(model, pinned, parsed, served)
            payload, header_length = encode_response(model, served.model.version, parsed.id, outputs)
        except ForwardpassError:
            raise
        except Exception as exc:  # a bug: counted with the model's requests, answered (and logged once) here
            served.stats.request(500, time.monotonic() - start)
            return error_response(exc)
        if header_length is None:
            return Response(200, payload)
        return Response(200, payload, "application/octet-stream",
                        [(b"inference-header-content-length", str(header_length).encode())])  # fmt: skip

    async def predict(self, request: Request, model: str, version: str | None = None) -> Response:
        pinned = _version(version)
        served = self.engine.served(model, pinned)
        start = time.monotonic()
        try:
            _check_content_type(request)
            await request.read_body(self.config.max_body_bytes)
            doc = _json_body(request)
            if not isinstance(doc, dict) or "instances" not in doc:
                raise InvalidInput(("instances",), 'expected a JSON object {"instances": [...]}', shown(doc))
            params = doc.get("parameters")
            if params is not None and not isinstance(params, dict):
                raise InvalidInput(("parameters",), 'expected an object such as {"top_k": 3}', shown(params))
            top_k = (params or {}).get("top_k")
            if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
                raise InvalidInput(("parameters", "top_k"), "expected an integer >= 1", shown(top_k))
            instances = doc["instances"]
            self.tenancy.rows(request, model, len(instances) if isinstance(instances, list) else 1)
            request_id = doc.get("id")
            if request_id is not None and (isinstance(request_id, bool) or not isinstance(request_id, (str, int))):
                raise InvalidInput(("id",), "expected a string", shown(request_id))
            if request_id is None and served.log is not None:  # returned: feedback names the request by it
                request_id = uuid.uuid4().hex
            request_id = None if request_id is None else str(request_id)
            caller = request.charge.caller.id if request.charge is not None else None
            # {"b64": ...} instances are the image and audio kinds' own to read
            served, answers = await self.engine.predict(model, pinned, instances, top_k, request_id, caller)
            answer = {"model_name": model, "model_version": str(served.model.version), "predictions": answers}
            if request_id is not None:
                answer["id"] = request_id
            return Response.json(answer)
        except ForwardpassError:
            raise
        except Exception as exc:  # a bug: counted with the model's requests, answered (and logged once) here
            served.stats.request(500, time.monotonic() - start)
            return error_response(exc)

    # -- metadata ------------------------------------------------------------------------------

    async def server_metadata(self, request: Request) -> Response:
        return Response.json({"name": "forwardpass", "version": __version__, "extensions": EXTENSIONS})

    async def live(self, request: Request) -> Response:
        return Response.json({"live": True})

    async def ready(self, request: Request) -> Response:
        if not self.engine.ready:
            return Response.json({"error": "models are still loading", "ready": False}, 503)
        return Response.json({"ready": True})

    async def model_metadata(self, request: Request, model: str, version: str | None = None) -> Response:
        served = self.engine.served(model, _version(version))
        m, seq = served.model, served.sequences
        # a stateful model: what a request sends and gets (the server fills states, controls and constants)
        inputs = [{"name": s.name, "datatype": s.datatype, "shape": s.shape} for s in m.inputs
                  if seq is None or s.name not in seq.filled]  # fmt: skip
        outputs = [{"name": s.name, "datatype": s.datatype, "shape": s.shape} for s in m.outputs
                   if seq is None or s.name not in seq.state_outputs]  # fmt: skip
        if seq is not None and seq.config.events is not None:
            outputs.append({"name": seq.config.events.name, "datatype": "BYTES", "shape": [-1]})
        return Response.json({
            "name": model,
            "versions": [str(v) for v in self.engine.versions(model)] if version is None else [version],
            "platform": "onnxruntime_onnx",
            "inputs": inputs,
            "outputs": outputs,
            "parameters": {"task": m.config.task, "pre_processing": m.pre_kind, "labels": m.labels or []},
        })  # fmt: skip

    async def model_ready(self, request: Request, model: str, version: str | None = None) -> Response:
        try:
            self.engine.served(model, _version(version))
        except ModelNotReady as exc:
            return Response.json({"error": exc.message, "ready": False}, 503)
        return Response.json({"name": model, "ready": True})

    async def model_config(self, request: Request, model: str, version: str | None = None) -> Response:
        served = self.engine.served(model, _version(version))
        return Response.json(_triton_config(model, served))

    async def model_stats(self, request: Request, model: str | None = None, version: str | None = None) -> Response:
        wanted = _version(version)
        if model is not None:
            self.engine.served(model, wanted)  # 404 for unknown models
        stats = [
            s.v2() for (name, v), s in sorted(self.engine.stats.models.items())
            if (model is None or name == model) and (wanted is None or v == wanted)
        ]  # fmt: skip
        return Response.json({"model_stats": stats})

    async def drift(self, request: Request, model: str, version: str | None = None) -> Response:
        """The version's recent inputs and answers against its reference: PSI and KS per feature, prediction
        drift, and the status (ok, moderate, drifting; unknown while the window holds too few rows)."""
        served = self.engine.served(model, _version(version))
        name, number = served.model.name, str(served.model.version)
        monitor = served.drift
        if monitor is None:
            return Response.json({"model_name": name, "model_version": number, "status": "no_reference",
                                  "reason": "this version has no reference.json (forwardpass import sklearn writes one "
                                  "from the training rows) or model.yaml sets drift.enabled false"})  # fmt: skip
        report = await asyncio.to_thread(monitor.report)  # a few ms of statistics: off the event loop
        return Response.json({"model_name": name, "model_version": number, **report})

    async def feedback(self, request: Request, model: str) -> Response:
        """True labels for logged requests, as JSON {"ids": [...], "labels": [...]} or a Parquet file with
        columns id and label: joined with the prediction log, kept, and answered with what matched."""
        served = self.engine.served(model)
        body = await request.read_body(self.config.max_body_bytes)
        ids: Any
        labels: Any
        if body[:4] == b"PAR1":
            ids, labels = await asyncio.to_thread(_parquet_feedback, body)
        else:
            doc = _json_body(request)
            if not isinstance(doc, dict):
                raise InvalidInput(("body",), 'expected {"ids": [...], "labels": [...]} or a Parquet file', shown(doc))
            ids, labels = doc.get("ids"), doc.get("labels")
        kind = "regression" if getattr(served.model.config.post, "kind", "") == "regression" else "classification"
        caller = request.charge.caller if request.charge is not None else None
        key = None if caller is None or caller.admin else caller.id  # a key labels its own requests; admin any
        found = await asyncio.to_thread(self.engine.quality.add, model, kind, ids, labels, served.log, key)
        if served.log is None and not found["labels"]:
            found["hint"] = (f"model '{model}' keeps no prediction log: set prediction_log: {{rate: 1.0}} (or a share) "
                             "in its model.yaml, so that answers are kept to compare labels with")  # fmt: skip
        return Response.json(found)

    async def quality(self, request: Request, model: str) -> Response:
        """Accuracy (classification) or mean absolute error (regression) per hour or day of the predictions
        (?by=day), from the labels sent to /feedback."""
        self.engine.served(model)
        query = request.query("by=hour|day&version=N")
        version = query.get("version")
        series = await asyncio.to_thread(self.engine.quality.series, model, _version(version), query.get("by", "hour"))
        labels = sum(s["labels"] for s in series)
        judged = [(s["labels"], s["accuracy"]) for s in series if s["accuracy"] is not None]
        errors = [(s["labels"], s["mean_absolute_error"]) for s in series if s["mean_absolute_error"] is not None]
        return Response.json({"model_name": model, "labels": labels,
                              "accuracy": _weighted(judged), "mean_absolute_error": _weighted(errors),
                              "series": series})  # fmt: skip

    async def metrics(self, request: Request) -> Response:
        peers = self.peers

        def shared() -> tuple[list[dict[str, Any]], list[bytes]]:  # files: off the loop
            return self.engine.quality.summary(), peers.others() if peers is not None else []  # SQLite each 5 s

        quality, others = await asyncio.to_thread(shared)
        text = metrics.render(self.engine.stats, quality)
        return Response.text(metrics.merge([text, *others]) if others else text,
                             content_type="text/plain; version=0.0.4; charset=utf-8")  # fmt: skip

    # -- repository extension ----------------------------------------------------------------------

    async def repository_index(self, request: Request) -> Response:
        await request.read_body(self.config.max_body_bytes)
        doc = _json_body(request)
        entries = self.engine.index()
        if isinstance(doc, dict) and doc.get("ready"):
            entries = [e for e in entries if e["state"] == "READY"]
        return Response.json(entries)

    async def repository_load(self, request: Request, model: str) -> Response:
        await request.read_body(self.config.max_body_bytes)
        doc = _json_body(request)
        if not isinstance(doc, dict):
            raise InvalidInput(("body",), "expected a JSON object", shown(doc))
        params = doc.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise InvalidInput(("parameters",), "expected an object", shown(params))
        for key in params or {}:
            if key == "config" or key.startswith("file:"):
                # Triton loads an override config (and files) from here; this server never does it silently
                raise InvalidInput(("parameters", key), "loading with a config override or model files is not "
                                   "supported: forwardpass loads the model folder as it is on disk; edit its "
                                   "model.yaml (or files) there, then load without parameters")  # fmt: skip
        await self.engine.load(model)
        return Response.json({})

    async def repository_unload(self, request: Request, model: str) -> Response:
        await request.read_body(self.config.max_body_bytes)
        await self.engine.unload(model)
        return Response.json({})

    async def home(self, request: Request) -> Response:
        return Response.json({
            "name": "forwardpass", "version": __version__, "ready": self.engine.ready,
            "models": {n: self.engine.versions(n) for n in self.engine.names()},
            "try": 'POST /v1/models/{model}:predict with {"instances": [...]}, or V2 at /v2/models/{model}/infer',
        })  # fmt: skip


def _weighted(parts: list[tuple[int, float]]) -> float | None:
    count = sum(n for n, _ in parts)
    return sum(n * v for n, v in parts) / count if count else None


def _parquet_feedback(body: bytes) -> tuple[list[Any], list[Any]]:
    """(ids, labels) from a Parquet file with columns id and label."""
    from forwardpass._deps import require

    pa = require("pyarrow", "batch", "feedback as a Parquet file")
    pq = require("pyarrow.parquet", "batch", "feedback as a Parquet file")
    from forwardpass.monitoring.predictions import MAX_FEEDBACK

    try:
        file = pq.ParquetFile(pa.BufferReader(body))
        names = file.schema_arrow.names
        missing = [c for c in ("id", "label") if c not in names]
        if missing:
            raise InvalidInput(("body", missing[0]), "a feedback Parquet file needs columns id and label", names)
        if file.metadata.num_rows > MAX_FEEDBACK:  # before reading: a small file may hold millions of rows
            raise InvalidInput(("body",), f"at most {MAX_FEEDBACK} labels a request", file.metadata.num_rows)
        table = file.read(columns=["id", "label"])
    except (pa.ArrowException, OSError) as exc:
        raise InvalidInput(("body",), f"not a readable Parquet file ({exc})") from None
    return table["id"].to_pylist(), table["label"].to_pylist()


def _triton_config(model: str, served: Served) -> dict[str, Any]:
    """Triton's model configuration, as perf_analyzer and tritonclient read it."""
    m, batching = served.model, served.model.config.batching
    batched = served.batchable

    def dims(shape: list[int]) -> list[int]:
        return shape[1:] if batched else shape

    def tensor(s: Any) -> dict[str, Any]:
        return {"name": s.name, "data_type": _TRITON_TYPES.get(s.datatype, f"TYPE_{s.datatype}"), "dims": dims(s.shape)}

    # Triton's image clients read each input's format: the layout image pre-processing fills it in
    layouts = m.pre.layouts()  # input name -> NCHW, NHWC or flat, for the inputs an image kind fills

    def input_tensor(s: Any) -> dict[str, Any]:
        return {**tensor(s), "format": _FORMATS.get(layouts.get(s.name, ""), "FORMAT_NONE")}

    return {
        "name": model,
        "platform": "onnxruntime_onnx",
        "backend": "onnxruntime",
        "version_policy": {"latest": {"num_versions": 1}},
        "max_batch_size": batching.max_batch_size if batched else 0,
        "input": [input_tensor(s) for s in m.inputs],
        "output": [tensor(s) for s in m.outputs],
        "dynamic_batching": {
            "preferred_batch_size": batching.preferred_batch_sizes,
            "max_queue_delay_microseconds": int(batching.max_queue_delay_ms * 1000),
        },
        "instance_group": [{"count": m.config.instances, "kind": "KIND_CPU"}],
        "response_cache": {"enable": m.config.cache.enabled},
    }

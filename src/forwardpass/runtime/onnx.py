"""ONNX Runtime sessions: providers, graph optimization, and thread pools sized from measured cost."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from forwardpass.errors import ModelLoadError
from forwardpass.runtime.base import TensorInfo
from forwardpass.tensors import from_ort, to_numpy

log = logging.getLogger(__name__)

_OPT_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}

# A forward pass cheaper than this (one row, one thread) gains nothing from an intra-op pool:
# waking threads costs tens of microseconds, and the other cores are better left to the server.
# Measured on 2 cores (bench/threads.py): the digits MLP (0.03 ms) and breast-cancer (0.01 ms)
# are as fast or faster with one thread.
AUTO_THREADS_THRESHOLD_MS = 1.0


def available_cores() -> int:
    """CPU cores this process may run on (respects affinity and cgroup pinning)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class OnnxRuntime:
    """One ONNX Runtime InferenceSession with typed input/output metadata.

    Usage::

        rt = OnnxRuntime("models/digits/1/model.onnx", intra_op="auto")
        (probs,) = rt.run({"input": x}, ["probabilities"])
    """

    def __init__(
        self,
        path: str | Path,
        *,
        providers: Sequence[str] = ("CPUExecutionProvider",),
        graph_optimization: str = "all",
        intra_op: int | str = "auto",
        inter_op: int = 1,
    ):
        self.path = Path(path)
        self.providers = _check_providers(providers, self.path)
        self._graph_optimization = graph_optimization
        self._inter_op = inter_op
        self.probe_ms: float | None = None
        if intra_op == "auto":
            self._session = self._open(1)
            self.probe_ms = self._probe()
            self.intra_op = 1
            if self.probe_ms is None or self.probe_ms > AUTO_THREADS_THRESHOLD_MS:
                self.intra_op = available_cores()
                self._session = self._open(self.intra_op)
        else:
            self.intra_op = int(intra_op)
            self._session = self._open(self.intra_op)
        self.inputs = [_info(i) for i in self._session.get_inputs()]
        self.outputs = [_info(o) for o in self._session.get_outputs()]
        self._run = self._session.run  # bound once: the hot path skips an attribute lookup

    def _open(self, intra_op: int) -> ort.InferenceSession:
        options = ort.SessionOptions()
        options.graph_optimization_level = _OPT_LEVELS[self._graph_optimization]
        options.intra_op_num_threads = intra_op
        options.inter_op_num_threads = self._inter_op
        options.log_severity_level = 4  # fatal only: we raise every error with its message; the log repeats it
        try:
            return ort.InferenceSession(str(self.path), sess_options=options, providers=list(self.providers))
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph/... types
            raise ModelLoadError(f"{self.path}: ONNX Runtime could not load the model: {exc}") from exc

    def _probe(self) -> float | None:
        """Median ms of a one-row forward pass on zeros; None when the model rejects zeros."""
        feeds = {}
        for node in self._session.get_inputs():
            info = _info(node)
            shape = [1 if d == -1 else d for d in info.shape]
            dtype = to_numpy(info.datatype)
            feeds[info.name] = np.full(shape, "", dtype=object) if info.datatype == "BYTES" else np.zeros(shape, dtype)
        try:
            self._session.run(None, feeds)  # warm-up: first run allocates
            times = []
            for _ in range(5):
                start = time.perf_counter()
                self._session.run(None, feeds)
                times.append(time.perf_counter() - start)
        except Exception as exc:  # a model may reject zero inputs (e.g. a sample rate of 0)
            log.debug("thread probe failed for %s: %s", self.path, exc)
            return None
        return float(np.median(times) * 1000)

    def run(self, feeds: Mapping[str, np.ndarray], output_names: Sequence[str] | None = None) -> list[np.ndarray]:
        """Forward pass; outputs in ``output_names`` order, all outputs when None."""
        return self._run(output_names, feeds)


def _info(node: ort.NodeArg) -> TensorInfo:
    shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in (node.shape or []))
    return TensorInfo(node.name, from_ort(node.type), shape)


def _check_providers(wanted: Sequence[str], path: Path) -> list[str]:
    available = ort.get_available_providers()
    missing = [p for p in wanted if p not in available]
    if missing:
        hint = " (install onnxruntime-gpu instead of onnxruntime)" if "CUDAExecutionProvider" in missing else ""
        raise ModelLoadError(
            f"{path}: model.yaml asks for execution provider(s) {missing}, but this onnxruntime build "
            f"offers only {available}{hint}; or remove them from 'providers'"
        )
    return list(wanted)

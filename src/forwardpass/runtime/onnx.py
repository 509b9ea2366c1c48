"""ONNX Runtime sessions: providers, graph optimization, and thread pools sized from measured cost."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from math import isnan
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnxruntime as ort
from onnxruntime.capi.onnxruntime_pybind11_state import Fail, InvalidArgument
from pydantic import BaseModel, ConfigDict

from forwardpass.errors import InvalidInput, ModelLoadError
from forwardpass.runtime.base import TensorInfo
from forwardpass.runtime.guard import GUARD_PREFIX, add_finite_guards
from forwardpass.tensors import from_ort, zeros

if TYPE_CHECKING:
    from forwardpass.config import ModelConfig

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
        allow_nan: Collection[str] = (),
        spinning: bool = False,
    ):
        self.path = Path(path)
        self.providers = _check_providers(providers, self.path)
        self._graph_optimization = graph_optimization
        self._inter_op = inter_op
        self._spinning = spinning
        self.probe_ms: float | None = None
        self._source: str | bytes = str(self.path)
        if self.path.is_file():  # a missing file gets ONNX Runtime's own error below
            try:
                self._source = add_finite_guards(self.path, allow_nan) or self._source
            except Exception as exc:  # onnx's DecodeError and friends: let ORT report the file
                log.debug("no finite guards for %s: %s", self.path, exc)
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
        every = [_info(o) for o in self._session.get_outputs()]
        self.outputs = [o for o in every if not o.name.startswith(GUARD_PREFIX)]
        self._guards = [o.name for o in every if o.name.startswith(GUARD_PREFIX)]
        self.guarded = frozenset(g.removeprefix(GUARD_PREFIX) for g in self._guards)
        self._prepared: dict[tuple[str, ...], Callable[[Mapping[str, np.ndarray]], list[np.ndarray]]] = {}
        self._all_outputs = [o.name for o in self.outputs]
        # The C++ binding's run, bound once: InferenceSession.run's Python wrapper re-validates the
        # feed names and builds the output list on every call (about 5-10 us, a third of a tiny model's
        # forward pass); Model.check has already validated everything it checks.
        binding = getattr(self._session, "_sess", None)
        self._run = binding.run if binding is not None and hasattr(binding, "run") else self._wrapper_run

    @property
    def threads(self) -> int:
        """Cores one forward pass keeps busy (0, ONNX Runtime's default, means all of them)."""
        return self.intra_op or available_cores()

    def close(self) -> None:
        """Drop the session (its memory goes when the last run that holds it returns)."""
        self._prepared.clear()

    def _open(self, intra_op: int) -> ort.InferenceSession:
        # Pool threads stop spinning after each run instead of spinning on and taking the cores the
        # server's event loop needs. bench/serve.py, ResNet-18-shaped CNN on 2 cores, images/s against raw
        # ONNX Runtime: spinning 0.84x at concurrency 64 and 0.94x at 1; stopped 0.90x at 64 but 0.51x at 1
        # (threads wake per parallel section). threads.spinning: true in model.yaml picks the other side.
        # ONNX Runtime's CPU arena keeps what the largest run needed: one 2M-row request left a tiny model's
        # server 96 MB larger for good, even with arena shrinkage. A one-thread model's tensors are small, and
        # without the arena glibc serves them as fast (digits, one thread: batch 1 16.1 us vs 17.2, batch 64
        # 57.9 vs 57.6), so only models that use every core keep it (their activations are large and
        # reused), and give back what a run with a large input grew it by (_options below).
        self._arena = intra_op != 1
        return open_session(self._source, self.path, intra_op=intra_op, inter_op=self._inter_op,
                            graph_optimization=self._graph_optimization, spinning=intra_op == 1 or self._spinning,
                            arena=self._arena, providers=self.providers)  # fmt: skip

    def _probe(self) -> float | None:
        """Median ms of a one-row forward pass on zeros; None when the model rejects zeros."""
        feeds = {i.name: zeros(i.datatype, i.shape) for i in map(_info, self._session.get_inputs())}
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
        key = tuple(output_names or self._all_outputs)
        run = self._prepared.get(key) or self.prepare(key)
        return run(feeds)

    def prepare(self, output_names: Sequence[str] | None = None) -> Callable[[Mapping[str, np.ndarray]], list[np.ndarray]]:
        """A run function for fixed outputs: ``run(feeds) -> [arrays]``, guards checked.

        Raises InvalidInput naming the input when a guarded float input holds NaN or infinity.
        """
        names = list(output_names or self._all_outputs)
        run, guards = _mapped(self._run), self._guards
        _options = _shrink_after_large_inputs if self._arena else _no_options
        if not guards:
            prepared = lambda feeds: run(names, feeds, _options(feeds))  # noqa: E731
        elif len(guards) == 1:  # the common case, kept to one isnan and one pop
            full, guard = names + guards, guards[0].removeprefix(GUARD_PREFIX)

            def prepared(feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
                outputs = run(full, feeds, _options(feeds))
                if isnan(outputs.pop()):
                    raise InvalidInput(("inputs", guard), "expected finite numbers, got NaN or infinity")
                return outputs
        else:
            full, n = names + guards, len(names)

            def prepared(feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
                outputs = run(full, feeds, _options(feeds))
                for guard, value in zip(guards, outputs[n:]):
                    if isnan(value):
                        raise InvalidInput(("inputs", guard.removeprefix(GUARD_PREFIX)),
                                           "expected finite numbers, got NaN or infinity")  # fmt: skip
                del outputs[n:]
                return outputs

        self._prepared[tuple(names)] = prepared
        return prepared

    def _wrapper_run(self, names: Sequence[str], feeds: Mapping[str, np.ndarray], options: Any) -> list[np.ndarray]:
        return self._session.run(names, feeds, options)


class _Options(BaseModel):  # runtime: onnx takes no options of its own (threads, providers are top level)
    model_config = ConfigDict(extra="forbid")


def from_config(config: ModelConfig, folder: Path, version: int) -> OnnxRuntime:
    """The registry's factory (``runtime: onnx``): ``<folder>/<version>/model.onnx`` with model.yaml's settings."""
    config.runtime.options(_Options, folder / "model.yaml")
    return OnnxRuntime(
        folder / str(version) / "model.onnx",
        providers=config.providers,
        graph_optimization=config.graph_optimization,
        intra_op=config.threads.intra_op,
        inter_op=config.threads.inter_op,
        allow_nan=[s.name for s in config.inputs or [] if s.allow_nan],
        spinning=config.threads.spinning,
    )


def open_session(source: str | bytes | Path, path: Path, *, intra_op: int, inter_op: int = 1,
                 graph_optimization: str = "all", spinning: bool = True, arena: bool = True,
                 providers: Sequence[str] = ("CPUExecutionProvider",), what: str = "the model",
                 custom_ops: Path | None = None) -> ort.InferenceSession:
    """An InferenceSession with forwardpass's settings; ModelLoadError naming ``path`` when ONNX Runtime refuses it.

    ``spinning=False`` stops a multi-threaded pool's threads after each run; ``arena=False`` serves tensors
    from malloc instead of ONNX Runtime's CPU arena (see OnnxRuntime._open for when each pays); ``custom_ops``
    is a custom-op library to register (forwardpass.kernels). Every session a served model runs on (models, the
    language models' decoder) comes from here.
    """
    options = ort.SessionOptions()
    options.graph_optimization_level = _OPT_LEVELS[graph_optimization]
    options.intra_op_num_threads = intra_op
    options.inter_op_num_threads = inter_op
    if not spinning:
        options.add_session_config_entry("session.force_spinning_stop", "1")
    options.enable_cpu_mem_arena = arena
    options.log_severity_level = 4  # fatal only: we raise every error with its message; the log repeats it
    try:
        if custom_ops is not None:
            options.register_custom_ops_library(str(custom_ops))
        return ort.InferenceSession(source if isinstance(source, bytes) else str(source), sess_options=options,
                                    providers=list(providers))  # fmt: skip
    except Exception as exc:  # ORT raises its own Fail/InvalidGraph/... types
        raise ModelLoadError(f"{path}: ONNX Runtime could not load {what}: {exc}") from exc


def _mapped(run: Callable[..., list[np.ndarray]]) -> Callable[..., list[np.ndarray]]:
    """``run`` with ONNX Runtime's errors for inputs that pass every check but not a kernel (a Gather index
    out of range, shapes that do not broadcast) raised as InvalidInput: the same 400 on every entrypoint."""

    def mapped(names: Sequence[str], feeds: Mapping[str, np.ndarray], options: Any) -> list[np.ndarray]:
        try:
            return run(names, feeds, options)
        except (InvalidArgument, Fail) as exc:
            raise InvalidInput(("inputs",), f"the model rejected the inputs: {ort_message(exc)}") from None

    return mapped


def ort_message(exc: Exception) -> str:
    """The useful tail of an ONNX Runtime error (node status, without source paths)."""
    text = str(exc).rsplit("Status Message: ", 1)[-1]
    return text.rsplit(" was false. ", 1)[-1].strip()


# After a run with an input this large, an arena (see _open) gives back the chunks it does not use.
SHRINK_ARENA_BYTES = 16 * 2**20
_SHRINK = ort.RunOptions()
_SHRINK.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")


def _shrink_after_large_inputs(feeds: Mapping[str, np.ndarray]) -> ort.RunOptions | None:
    for array in feeds.values():
        if array.nbytes > SHRINK_ARENA_BYTES:
            return _SHRINK
    return None


def _no_options(feeds: Mapping[str, np.ndarray]) -> None:
    return None


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

"""The Runtime protocol: what a Model needs from anything that runs a forward pass.

A runtime is chosen by model.yaml's ``runtime:`` field through the registry in ``runtime/__init__.py``
(``onnx`` by default, ``remote`` for a V2 endpoint elsewhere); ``Model`` never knows which it got.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

if TYPE_CHECKING:
    from forwardpass.config import ModelConfig


@dataclass(frozen=True)
class TensorInfo:
    """A tensor as the model file declares it (V2 datatype, -1 for dynamic dims)."""

    name: str
    datatype: str
    shape: tuple[int, ...]


class Runtime(Protocol):
    """Runs a loaded model: ``outputs = runtime.run({"input": x})``.

    ``run`` raises InvalidInput for inputs the model refuses (every entrypoint then answers the same 400),
    and other ForwardpassErrors for what is not the caller's fault (a remote that is down: 503).
    """

    inputs: Sequence[TensorInfo]
    outputs: Sequence[TensorInfo]
    guarded: frozenset[str]  # float inputs the runtime itself rejects NaN/infinity in
    probe_ms: float | None  # measured ms of a one-row forward pass; None when unknown (the engine then queues)
    threads: int  # cores one forward pass keeps busy (1: batch runs one predictor per core)

    def run(self, feeds: Mapping[str, np.ndarray], output_names: Sequence[str] | None = None) -> list[np.ndarray]:
        """Run the forward pass; returns outputs in ``output_names`` order (all outputs when None)."""
        ...

    def prepare(self, output_names: Sequence[str] | None = None) -> Callable[[Mapping[str, np.ndarray]], list[np.ndarray]]:
        """A run function bound to fixed outputs, for hot paths: ``prepare(names)(feeds)``."""
        ...

    def close(self) -> None:
        """Release what the runtime holds (sessions, connections); called when its version is retired."""
        ...


# What the registry maps a runtime name to: (model.yaml, model folder, version) -> a loaded runtime.
RuntimeFactory = Callable[["ModelConfig", Path, int], Runtime]

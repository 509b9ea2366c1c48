"""The Runtime protocol: what the engine needs from anything that runs a forward pass."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class TensorInfo:
    """A tensor as the model file declares it (V2 datatype, -1 for dynamic dims)."""

    name: str
    datatype: str
    shape: tuple[int, ...]


class Runtime(Protocol):
    """Runs a loaded model: ``outputs = runtime.run({"input": x})``."""

    inputs: Sequence[TensorInfo]
    outputs: Sequence[TensorInfo]
    guarded: frozenset[str]  # float inputs the runtime itself rejects NaN/infinity in

    def run(self, feeds: Mapping[str, np.ndarray], output_names: Sequence[str] | None = None) -> list[np.ndarray]:
        """Run the forward pass; returns outputs in ``output_names`` order (all outputs when None)."""
        ...

    def prepare(self, output_names: Sequence[str] | None = None) -> Callable[[Mapping[str, np.ndarray]], list[np.ndarray]]:
        """A run function bound to fixed outputs, for hot paths: ``prepare(names)(feeds)``."""
        ...

"""The engine's request and response types (the Open Inference Protocol's data model).

server/v2.py decodes HTTP bodies into these; the engine answers with OutputTensor lists.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class InputTensor:
    """One request input: its declared name, datatype and shape, and the decoded array."""

    name: str
    datatype: str
    shape: list[int]
    array: np.ndarray
    raw: bytes | memoryview | None = None  # the bytes as sent (binary inputs), for the cache key


@dataclass
class RequestedOutput:
    """An output the client asked for, and how."""

    name: str
    binary: bool
    classification: int = 0  # > 0: top-k "score:index[:label]" strings (Triton's classification extension)


@dataclass
class InferRequest:
    """A parsed V2 infer request."""

    id: str | None
    inputs: list[InputTensor]
    outputs: list[RequestedOutput] | None  # None: all outputs
    parameters: dict[str, Any] = field(default_factory=dict)
    binary_output: bool = False  # default for outputs not listed
    caller: str | None = None  # the caller's key id, for the prediction log


@dataclass
class OutputTensor:
    """One response output."""

    name: str
    datatype: str
    array: np.ndarray
    binary: bool

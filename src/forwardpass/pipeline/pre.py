"""The pre-processing contract: instances (rows, images, texts, clips) -> input tensors, plus the traits
entrypoints ask a kind for instead of comparing its name.

Each kind lives in its own module under ``pipeline/kinds/`` with its model.yaml schema, and is found by
name in the registry there (``build_pre``). A pre-processor turns a list of instances into
``{input name: array}`` and raises InvalidInput with the instance index and field in ``loc``::

    pre = build_pre(config.pre, specs, folder)
    feeds = pre([{"sepal length (cm)": 5.1, ...}])   # {"input": array([[5.1, ...]])}

In two steps, for an event loop: ``plan`` checks forms and bounds from headers alone (cheap),
``run`` does the work whose cost grows with the input (decoding, resizing, tokenizing)::

    plan = pre.plan(instances)        # InvalidInput past pre.max_pixels, max_seconds, ...
    feeds = await loop.run_in_executor(pool, plan.run) if plan.off_loop else plan.run()

Traits (class attributes unless said): ``takes_raw``, ``text``, ``per_instance``, ``batch``, and the
methods ``read_row``, ``columns``, ``required_columns`` and ``layouts`` (see Preprocessor).
"""

from __future__ import annotations

import abc
import base64
import binascii
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from forwardpass.errors import InvalidInput, ModelConfigError

if TYPE_CHECKING:
    from forwardpass.config import PreOptions, TensorSpec


@dataclass(frozen=True, slots=True)
class Plan:
    """One request's pre-processing: checked against the bounds, not yet run.

    ``cost`` is the size of the work in ``unit`` (pixels, samples, characters, cells), read
    from headers without decoding; ``off_loop`` is True when the work grows with the input
    and this much of it costs more than a hop to a thread: run ``run`` on a thread then.
    """

    cost: int
    unit: str
    off_loop: bool
    run: Callable[[], dict[str, np.ndarray]]


@dataclass(frozen=True, slots=True)
class BatchDefaults:
    """How batch inference sizes its work for a kind when the command line does not say.

    ``batch_size``: rows per forward pass (local engine); ``chunk_rows``: rows per part file, the unit
    of resuming; ``ray_rows``: rows per Ray Data batch (one actor call).
    """

    batch_size: int
    chunk_rows: int
    ray_rows: int


TABLE = BatchDefaults(batch_size=1024, chunk_rows=65536, ray_rows=4096)  # rows of numbers: cheap per row


@dataclass(frozen=True, slots=True)
class Columns:
    """A column batch read by a kind: input tensors with one row per table row, and the rows that failed.

    A failed row's values in ``feeds`` are meaningless; ``errors`` says why, per row index, in the words
    of the batch errors file (``"f1: expected a number (got 'x')"``).
    """

    feeds: dict[str, np.ndarray]
    errors: dict[int, str]


class Preprocessor(abc.ABC):
    """Instances -> input tensors; the base of every pre-processing kind (``pipeline/kinds/``).

    A kind declares its model.yaml schema in ``schema`` (a PreOptions with ``kind: Literal[...]``) and is
    built as ``Kind(config, specs, folder)``. Its traits, which entrypoints ask for:

    - ``takes_raw``: a V2 BYTES input carries raw instances for it (image or WAV bytes, text), not a
      tensor for the model;
    - ``text``: instances are strings: BYTES decode as UTF-8, the CLI reads a .txt file or a plain
      argument as one instance;
    - ``per_instance``: batch pre-processes one instance at a time (decoding dominates, and a bad file
      costs only itself); otherwise a whole chunk at once;
    - ``batch``: batch inference's default sizes (BatchDefaults);
    - ``read_row(row)``: a batch row (a JSONL object, an image file's ``{"path": ...}``) -> one instance;
    - ``columns(table)``: a pyarrow Table -> Columns, for kinds that read a column batch at once
      (vectorized); None: batch reads the table's rows through ``read_row``;
    - ``required_columns()``: the columns a table input must have (checked once before a batch job);
    - ``layouts()``: input name -> the image layout this kind fills it in (Triton's input format).

    The cost class (work to run off the event loop) is in each Plan. ``plan`` and ``run`` raise
    InvalidInput with ``("instances", i, ...)`` in ``loc`` for a bad instance: batch takes that row out,
    records the error for it, and runs the rest.
    """

    schema: ClassVar[type[PreOptions]]
    takes_raw: ClassVar[bool] = False
    text: ClassVar[bool] = False
    per_instance: ClassVar[bool] = False
    batch: ClassVar[BatchDefaults] = TABLE

    def __init__(self, config: PreOptions, specs: Sequence[TensorSpec], folder: Path):
        self.config = config

    @property
    def name(self) -> str:
        """The kind's name, as model.yaml's ``pre.kind`` says it."""
        return self.config.kind

    @abc.abstractmethod
    def is_single(self, data: Any) -> bool:
        """True when ``data`` is one instance rather than a list of them."""

    @abc.abstractmethod
    def plan(self, instances: Sequence[Any]) -> Plan:
        """Check forms and bounds (cheap, no decoding) and say what the work will cost."""

    def __call__(self, instances: Sequence[Any]) -> dict[str, np.ndarray]:
        """Turn a list of instances into the model's input tensors: ``plan(instances).run()``."""
        return self.plan(instances).run()

    def read_row(self, row: Mapping[str, Any]) -> Any:
        """A batch input row -> the instance this kind takes (default: the row itself)."""
        return row

    def columns(self, table: Any) -> Columns | None:
        """A pyarrow Table -> Columns read at once; None (the default): read its rows with ``read_row``."""
        return None

    def required_columns(self) -> list[str]:
        """Columns without which no row of a table input can be read (default: none)."""
        return []

    def layouts(self) -> dict[str, str]:
        """Input name -> the image layout (NCHW, NHWC, flat) this kind fills it in; {} for non-images."""
        return {}


# --- helpers the kinds share -----------------------------------------------------------------------


def pick_input(specs: Sequence[TensorSpec], wanted: str | None, kind: str,
               accept: Callable[[TensorSpec], bool]) -> TensorSpec:  # fmt: skip
    """The input ``pre.input`` names, else the only one ``accept`` takes (a ModelConfigError otherwise)."""
    if wanted is not None:
        return next(s for s in specs if s.name == wanted)
    candidates = [s for s in specs if accept(s)]
    if len(candidates) != 1:
        raise ModelConfigError(
            "model.yaml", "pre.input", f"{kind} pre-processing cannot tell which input to fill "
            f"among {[s.name for s in specs]}", "name it with pre.input",
        )  # fmt: skip
    return candidates[0]


def some(instances: Sequence[Any]) -> None:
    """InvalidInput for an empty list of instances."""
    if not instances:
        raise InvalidInput(("instances",), "expected at least one instance, got an empty list")


def file_or_data(row: Mapping[str, Any]) -> Any:
    """A batch row of a file-reading kind: ``{"path": str}`` -> a Path to read, else its ``data`` (bytes, base64)."""
    path = row.get("path")
    return Path(path) if isinstance(path, str) else row.get("data")


def raw_bytes(i: int, item: Any, expected: str, what: str) -> bytes | bytearray | memoryview:
    """Bytes, base64 text (or a data URL), {"b64": text} or a pathlib.Path -> the bytes."""
    if isinstance(item, Mapping) and isinstance(item.get("b64"), str):
        item = item["b64"]
    if isinstance(item, Path):
        try:
            return item.read_bytes()
        except OSError as exc:
            raise InvalidInput(("instances", i), f"cannot read {what} file: {exc.strerror}", str(item)) from None
    if isinstance(item, str):
        return _b64(i, item)
    if not isinstance(item, (bytes, bytearray, memoryview)):
        raise InvalidInput(("instances", i), f"expected {expected}", type(item).__name__)
    return item


def _b64(i: int, text: str) -> bytes:
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInput(("instances", i), "expected base64-encoded bytes", text) from None

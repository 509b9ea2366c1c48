"""Pre-processing declared in model.yaml: instances (rows, images, texts, clips) -> input tensors.

Each pre-processor turns a list of instances into ``{input name: array}`` and
raises InvalidInput with the instance index and field in ``loc``::

    pre = build_pre(config.pre, specs, folder)
    feeds = pre([{"sepal length (cm)": 5.1, ...}])   # {"input": array([[5.1, ...]])}

In two steps, for an event loop: ``plan`` checks forms and bounds from headers alone (cheap),
``run`` does the work whose cost grows with the input (decoding, resizing, tokenizing)::

    plan = pre.plan(instances)        # InvalidInput past pre.max_pixels, max_seconds, ...
    feeds = await loop.run_in_executor(pool, plan.run) if plan.off_loop else plan.run()
"""

from __future__ import annotations

import abc
import base64
import binascii
import difflib
import io
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import PIL.Image

from forwardpass._deps import require
from forwardpass.config import AudioPre, ImagePre, PreConfig, TabularPre, TensorSpec, TextPre
from forwardpass.errors import InvalidInput, ModelConfigError
from forwardpass.pipeline.audio import WavError, WavHeader, read_header, resample, samples
from forwardpass.tensors import to_numpy

# Work below these sizes costs less than handing it to a thread and back (about 0.09 ms here),
# so plans under them say off_loop=False. Measured per request, 2-core machine: an 8x8 PNG
# 0.07 ms (mostly per image: two are already worth the hop) and a 128x128 one 0.14 ms; 1 s of
# 16 kHz WAV 0.05 ms (0.2 ms when resampled); a 30-feature row 0.02 ms.
INLINE_PIXELS = 64 * 64  # one image at most
INLINE_SAMPLES = 4000
INLINE_CHARACTERS = 2000  # tokenized text
INLINE_CELLS = 2000  # tabular


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


class Preprocessor(Protocol):
    """Instances -> input tensors.

    ``takes_raw``: a V2 BYTES input carries raw instances for it (image or WAV bytes, text),
    not a tensor for the model.
    """

    takes_raw: bool

    def is_single(self, data: Any) -> bool:
        """True when ``data`` is one instance rather than a list of them."""
        ...

    def plan(self, instances: Sequence[Any]) -> Plan:
        """Check forms and bounds (cheap, no decoding) and say what the work will cost."""
        ...

    def __call__(self, instances: Sequence[Any]) -> dict[str, np.ndarray]:
        """Turn a list of instances into the model's input tensors: ``plan(instances).run()``."""
        ...


class _Pre(abc.ABC):
    """What every kind shares: ``pre(instances)`` is ``pre.plan(instances).run()``."""

    takes_raw = False

    @abc.abstractmethod
    def plan(self, instances: Sequence[Any]) -> Plan:
        """Check forms and bounds (cheap, no decoding) and say what the work will cost."""

    def __call__(self, instances: Sequence[Any]) -> dict[str, np.ndarray]:
        return self.plan(instances).run()


def _pick_input(specs: Sequence[TensorSpec], wanted: str | None, kind: str, accept: Callable[[TensorSpec], bool]):
    if wanted is not None:
        return next(s for s in specs if s.name == wanted)
    candidates = [s for s in specs if accept(s)]
    if len(candidates) != 1:
        raise ModelConfigError(
            "model.yaml", "pre.input", f"{kind} pre-processing cannot tell which input to fill "
            f"among {[s.name for s in specs]}", "name it with pre.input",
        )  # fmt: skip
    return candidates[0]


class NoPre(_Pre):
    """Models without declared pre-processing take tensors only (see Model.predict)."""

    def is_single(self, data: Any) -> bool:
        return False

    def plan(self, instances: Sequence[Any]) -> Plan:
        raise InvalidInput(
            ("instances",), "this model declares no pre-processing: send input tensors (a numpy array or a "
            "mapping of input name to array)", instances[0] if instances else None,
        )  # fmt: skip


# --- tabular ------------------------------------------------------------------------------------

_MISSING = object()


class Tabular(_Pre):
    """Rows as {feature: value} (or a list in feature order) -> one [N, F] tensor in declared order."""

    def __init__(self, config: TabularPre, specs: Sequence[TensorSpec]):
        spec = _pick_input(specs, config.input, "tabular", lambda s: bool(s.features))
        if not spec.features:
            raise ModelConfigError("model.yaml", "inputs", f"input '{spec.name}' lists no features", "add 'features'")
        self.input = spec.name
        self.features = [f.name for f in spec.features]
        self.defaults = [f.default for f in spec.features]
        self.allow_nan = spec.allow_nan
        self.dtype = to_numpy(spec.datatype)
        self._known = set(self.features)

    def is_single(self, data: Any) -> bool:
        if isinstance(data, Mapping):
            return True
        return isinstance(data, (list, tuple)) and bool(data) and not isinstance(data[0], (Mapping, list, tuple))

    def plan(self, instances: Sequence[Any]) -> Plan:
        cells = len(instances) * len(self.features)
        return Plan(cells, "cells", cells > INLINE_CELLS, lambda: self._rows(instances))

    def _rows(self, instances: Sequence[Any]) -> dict[str, np.ndarray]:
        out = np.empty((len(instances), len(self.features)), dtype=np.float64)
        for i, row in enumerate(instances):
            if isinstance(row, Mapping):
                self._check_names(i, row)
                values = [row.get(name, _MISSING) for name in self.features]
            elif isinstance(row, (list, tuple)):
                if len(row) != len(self.features):
                    raise InvalidInput(("instances", i), f"expected {len(self.features)} values in feature order, "
                                       f"got {len(row)}")  # fmt: skip
                values = list(row)
            else:
                raise InvalidInput(("instances", i), "expected an object of named features", row)
            out[i] = [self._number(i, j, v) for j, v in enumerate(values)]
        with np.errstate(over="ignore"):  # 1e308 as float32 is inf, which the finite check then refuses, by name
            return {self.input: out.astype(self.dtype, copy=False)}

    def _check_names(self, i: int, row: Mapping[str, Any]) -> None:
        unknown = [k for k in row if k not in self._known]
        if unknown:
            close = difflib.get_close_matches(str(unknown[0]), self.features, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f"; known features: {self.features}"
            raise InvalidInput(("instances", i, str(unknown[0])), f"unknown feature{hint}", row[unknown[0]])

    def _number(self, i: int, j: int, value: Any) -> float:
        if value is _MISSING or value is None or value == "":
            if self.defaults[j] is None:
                raise InvalidInput(("instances", i, self.features[j]), "missing feature (no default declared)")
            return self.defaults[j]
        if isinstance(value, (int, float)):  # bool is an int: a flag feature as 0/1
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value.strip())
            except ValueError:
                raise InvalidInput(("instances", i, self.features[j]), "expected a number", value) from None
        else:
            raise InvalidInput(("instances", i, self.features[j]), "expected a number", value)
        if not self.allow_nan and not math.isfinite(number):
            raise InvalidInput(("instances", i, self.features[j]), "expected a finite number", value)
        return number


# --- image --------------------------------------------------------------------------------------

_FILTERS = {name: PIL.Image.Resampling[name.upper()]
            for name in ("nearest", "box", "bilinear", "hamming", "bicubic", "lanczos")}  # fmt: skip
_BOX = PIL.Image.Resampling.BOX


class Image(_Pre):
    """PNG/JPEG (bytes, base64 or data URL, {"b64": ...}, pathlib.Path, PIL image) -> a float32 image tensor.

    An axis that shrinks is resized with ``resample.down`` (box: each output pixel is the mean
    of the pixels it covers), one that grows with ``resample.up`` (bilinear). With box, a JPEG
    at least twice the target size is decoded at 1/2, 1/4 or 1/8 scale by libjpeg (an area
    average as well), which skips most of the decoding.
    """

    takes_raw = True

    def __init__(self, config: ImagePre, specs: Sequence[TensorSpec]):
        spec = _pick_input(specs, config.input, "image", lambda s: s.datatype in ("FP32", "FP16", "FP64", "UINT8"))
        self.config = config
        self.input = spec.name
        self.dtype = to_numpy(spec.datatype)
        self.channels = 1 if config.color == "L" else 3
        # one mean or std value: every channel
        mean = np.broadcast_to(np.asarray(config.mean or [0.0], np.float32), (self.channels,))
        std = np.broadcast_to(np.asarray(config.std or [1.0], np.float32), (self.channels,))
        # (x * scale - mean) / std, and 255 - x before it when inverting, folded into one multiply-add
        # per pixel, done in place on whole rows: a 224x224 RGB image 1.3 ms -> 0.1 ms
        sign = -1.0 if config.invert else 1.0
        self._mul = (sign * config.scale / std).astype(np.float32)
        self._add = (((255.0 * config.scale if config.invert else 0.0) - mean) / std).astype(np.float32)
        self._per_row: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # row length -> tiled mul, add
        self._down, self._up = _FILTERS[config.resample.down], _FILTERS[config.resample.up]

    def is_single(self, data: Any) -> bool:
        return not isinstance(data, (list, tuple))

    def plan(self, instances: Sequence[Any]) -> Plan:
        """Open each image's header (no decoding), check the pixel bounds and the output size."""
        cfg = self.config
        _some(instances)
        opened, sizes, total = [], [], 0
        for i, item in enumerate(instances):
            image = self._open(i, item)
            w, h = image.size
            if w * h > cfg.max_pixels:
                raise InvalidInput(("instances", i), f"image is {w}x{h} = {w * h:,} pixels, more than pre.max_pixels "
                                   f"({cfg.max_pixels:,}); send a smaller image, or raise pre.max_pixels in model.yaml",
                                   f"{image.format or 'image'} {w}x{h}")  # fmt: skip
            total += w * h
            opened.append((image, not isinstance(item, PIL.Image.Image)))  # only our own may be drafted
            sizes.append(self._sizes(i, w, h))
        if total > cfg.max_total_pixels:
            raise InvalidInput(("instances",), f"the {len(opened)} images hold {total:,} pixels together, more than "
                               f"pre.max_total_pixels ({cfg.max_total_pixels:,}); send fewer or smaller images per "
                               "request, or raise pre.max_total_pixels in model.yaml", total)  # fmt: skip
        final = {out for _, out in sizes}
        if len(final) > 1:
            raise InvalidInput(("instances",), "images in one batch must come out the same size; set pre.resize "
                               "or pre.center_crop in model.yaml", sorted((h, w) for w, h in final))  # fmt: skip
        off_loop = len(opened) > 1 or total > INLINE_PIXELS
        return Plan(total, "pixels", off_loop, lambda: self._run(opened, sizes))

    def _sizes(self, i: int, w: int, h: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """(w, h) after the resize and after the crop, from the header's size."""
        cfg = self.config
        if isinstance(cfg.resize, int):
            s = cfg.resize / min(w, h)
            w, h = max(1, round(w * s)), max(1, round(h * s))
        elif cfg.resize is not None:
            h, w = cfg.resize
        if cfg.center_crop is None:
            return (w, h), (w, h)
        ch, cw = cfg.center_crop
        if ch > h or cw > w:
            raise InvalidInput(("instances", i), f"image {w}x{h} is smaller than the crop {cw}x{ch}")
        return (w, h), (cw, ch)

    def _run(self, images: list[tuple[PIL.Image.Image, bool]], sizes: list[tuple[tuple[int, int], tuple[int, int]]]
             ) -> dict[str, np.ndarray]:  # fmt: skip
        w, h = sizes[0][1]
        c = self.channels
        batch = np.empty((len(images), h, w, c), np.float32)  # (N, H, W, C)
        for i, ((image, ours), (resized, _)) in enumerate(zip(images, sizes)):
            batch[i] = self._pixels(i, image, resized, ours).reshape(h, w, c)  # uint8 -> float32
        rows = batch.reshape(-1, w * c)  # (N*H, W*C): a long inner loop; broadcasting over C=3 is 4x slower
        mul, add = self._per_row.get(rows.shape[1]) or self._tile(rows.shape[1])
        rows *= mul
        rows += add
        if self.config.layout == "NCHW":
            batch = batch.transpose(0, 3, 1, 2)
        elif self.config.layout == "flat":
            batch = batch.reshape(len(images), -1)
        return {self.input: np.ascontiguousarray(batch, dtype=self.dtype)}

    def _pixels(self, i: int, image: PIL.Image.Image, size: tuple[int, int], ours: bool) -> np.ndarray:
        """Decode, convert, resize and crop one image -> its uint8 pixels."""
        cfg = self.config
        try:
            if ours and size != image.size and self._down is _BOX:
                if min(image.size[0] // size[0], image.size[1] // size[1]) >= 2:
                    image.draft(cfg.color, size)  # JPEG only (a no-op for others): decoded at >= size
            image.load()
            if image.mode != cfg.color:
                image = image.convert(cfg.color)
        except Exception as exc:  # truncated or corrupt files: OSError, SyntaxError, ValueError, ...
            raise InvalidInput(("instances", i), f"cannot decode image ({exc})",
                               f"{image.format or 'image'} {image.size[0]}x{image.size[1]}") from None  # fmt: skip
        if size != image.size:
            image = self._resize(image, size)
        if cfg.center_crop is not None:
            ch, cw = cfg.center_crop
            w, h = image.size
            left, top = (w - cw) // 2, (h - ch) // 2
            image = image.crop((left, top, left + cw, top + ch))
        return np.asarray(image)

    def _resize(self, image: PIL.Image.Image, size: tuple[int, int]) -> PIL.Image.Image:
        (w, h), (tw, th) = image.size, size
        fx = self._down if tw < w else self._up
        fy = self._down if th < h else self._up
        if tw == w:
            fx = fy
        elif th == h:
            fy = fx
        if fx != fy:  # one axis shrinks, the other grows: one pass each (Pillow resizes axis by axis anyway)
            return _resize(_resize(image, (tw, h), fx), size, fy)
        return _resize(image, size, fx)

    def _tile(self, row: int) -> tuple[np.ndarray, np.ndarray]:
        """mul and add repeated along a row of ``row`` values; kept for a few sizes (a fixed-size model has one)."""
        width = row // len(self._mul)
        pair = (np.tile(self._mul, width), np.tile(self._add, width))
        if len(self._per_row) < 8:  # images of every size (no resize/crop) must not grow this without end
            self._per_row[row] = pair
        return pair

    def _open(self, i: int, item: Any) -> PIL.Image.Image:
        """The image with only its header read (PIL opens lazily); decoding waits for load()."""
        if isinstance(item, PIL.Image.Image):
            return item
        data = _raw_bytes(i, item, "image bytes (PNG/JPEG), base64 text or a pathlib.Path", "image")
        try:
            return PIL.Image.open(io.BytesIO(data))
        except PIL.UnidentifiedImageError:
            raise InvalidInput(("instances", i), "cannot decode image: not a format Pillow reads (PNG, JPEG, ...)",
                               bytes(data[:16])) from None  # fmt: skip
        except PIL.Image.DecompressionBombError:
            raise InvalidInput(("instances", i), f"image is over {2 * PIL.Image.MAX_IMAGE_PIXELS:,} pixels, more than "
                               f"pre.max_pixels ({self.config.max_pixels:,}); send a smaller image",
                               bytes(data[:16])) from None  # fmt: skip
        except Exception as exc:  # a corrupt header: OSError, SyntaxError, ValueError, ...
            raise InvalidInput(("instances", i), f"cannot decode image ({exc})", bytes(data[:16])) from None


def _resize(image: PIL.Image.Image, size: tuple[int, int], resample: PIL.Image.Resampling) -> PIL.Image.Image:
    (w, h), (tw, th) = image.size, size
    if resample is _BOX and tw <= w and th <= h:
        if w % tw == 0 and h % th == 0:
            return image.reduce((w // tw, h // th))  # exact block means, 3x faster than resize(BOX)
        return image.resize(size, resample, reducing_gap=2.0)  # reduce() first when at least 4x larger
    return image.resize(size, resample)


def _some(instances: Sequence[Any]) -> None:
    if not instances:
        raise InvalidInput(("instances",), "expected at least one instance, got an empty list")


def _raw_bytes(i: int, item: Any, expected: str, what: str) -> bytes | bytearray | memoryview:
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


# --- text ---------------------------------------------------------------------------------------


class Text(_Pre):
    """Strings (or UTF-8 bytes) -> a BYTES input, or -> input_ids / attention_mask through a tokenizer.json."""

    takes_raw = True

    def __init__(self, config: TextPre, specs: Sequence[TensorSpec], folder: Path):
        self.config = config
        self.names = {s.name: s for s in specs}
        self.tokenizer = None
        if config.tokenizer is None:
            spec = _pick_input(specs, config.input, "text", lambda s: s.datatype == "BYTES")
            self.input, self.rank = spec.name, len(spec.shape)
            return
        tokenizers = require("tokenizers", "text", "text pre-processing with a tokenizer.json")
        path = folder / config.tokenizer
        if folder.resolve() not in path.resolve().parents:
            raise ModelConfigError(str(folder / "model.yaml"), "pre.tokenizer", f"'{config.tokenizer}' is outside the "
                                   "model folder", "put tokenizer.json beside model.yaml")  # fmt: skip
        try:
            self.tokenizer = tokenizers.Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a bare Exception for missing/corrupt files
            raise ModelConfigError(str(folder / "model.yaml"), "pre.tokenizer", f"cannot load {path}: {exc}",
                                   "point it at a Hugging Face tokenizer.json in the model folder") from None  # fmt: skip
        self.tokenizer.enable_truncation(config.max_length)
        self.tokenizer.enable_padding()
        for field in ("input_ids", "attention_mask", "token_type_ids"):
            name = getattr(config, field)
            if name is not None and name not in self.names:
                raise ModelConfigError(str(folder / "model.yaml"), f"pre.{field}",
                                       f"'{name}' is not a model input ({list(self.names)})",
                                       "name a model input")  # fmt: skip

    def is_single(self, data: Any) -> bool:
        return isinstance(data, (str, bytes))

    def plan(self, instances: Sequence[Any]) -> Plan:
        """Check every instance is text; tokenizing grows with its length."""
        _some(instances)
        texts = [_string(i, text) for i, text in enumerate(instances)]
        chars = sum(map(len, texts))
        if self.tokenizer is None:
            return Plan(chars, "characters", False, lambda: self._strings(texts))
        return Plan(chars, "characters", chars > INLINE_CHARACTERS, lambda: self._tokens(texts))

    def _strings(self, texts: list[str]) -> dict[str, np.ndarray]:
        array = np.array(texts, dtype=object)
        return {self.input: array.reshape(-1, 1) if self.rank == 2 else array}

    def _tokens(self, texts: list[str]) -> dict[str, np.ndarray]:
        encodings = self.tokenizer.encode_batch(texts)  # type: ignore[union-attr]
        feeds = {}
        for field, attr in (("input_ids", "ids"), ("attention_mask", "attention_mask"), ("token_type_ids", "type_ids")):
            name = getattr(self.config, field)
            if name is not None:
                values = np.array([getattr(e, attr) for e in encodings], dtype=np.int64)
                feeds[name] = values.astype(to_numpy(self.names[name].datatype), copy=False)
        return feeds


def _string(i: int, text: Any) -> str:
    if isinstance(text, str):
        return text
    if isinstance(text, bytes):
        try:
            return text.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidInput(("instances", i), "expected UTF-8 text", text[:16]) from None
    raise InvalidInput(("instances", i), "expected a string", text)


# --- audio --------------------------------------------------------------------------------------


class Audio(_Pre):
    """WAV bytes (or base64) -> float32 mono at the model's rate, [N, samples] zero-padded to the longest."""

    takes_raw = True

    def __init__(self, config: AudioPre, specs: Sequence[TensorSpec]):
        spec = _pick_input(specs, config.input, "audio", lambda s: s.datatype in ("FP32", "FP16"))
        self.config, self.input, self.dtype = config, spec.name, to_numpy(spec.datatype)

    def is_single(self, data: Any) -> bool:
        return not isinstance(data, (list, tuple))

    def plan(self, instances: Sequence[Any]) -> Plan:
        """Read each clip's WAV header (no samples decoded) and check its length and size."""
        cfg = self.config
        _some(instances)
        clips: list[tuple[bytes, WavHeader]] = []
        total, cost = 0.0, 0
        for i, item in enumerate(instances):
            data = bytes(_raw_bytes(i, item, "WAV bytes or base64 text", "audio"))
            try:
                header = read_header(data)
            except WavError as exc:
                raise InvalidInput(("instances", i), f"cannot decode WAV audio ({exc})", data[:16]) from None
            if header.size > cfg.max_bytes:
                raise InvalidInput(("instances", i), f"clip holds {header.size:,} bytes of samples, more than "
                                   f"pre.max_bytes ({cfg.max_bytes:,}); send a shorter clip, fewer channels or a "
                                   "lower rate, or raise pre.max_bytes in model.yaml")  # fmt: skip
            if header.seconds > cfg.max_seconds:
                raise InvalidInput(("instances", i), f"clip is {header.seconds:.1f} s, longer than "
                                   f"{cfg.max_seconds:g} s (pre.max_seconds); send a shorter clip, or raise "
                                   "pre.max_seconds in model.yaml")  # fmt: skip
            if header.frames == 0:
                raise InvalidInput(("instances", i), "expected audio samples, got an empty clip")
            total += header.seconds
            cost += header.frames * header.channels
            clips.append((data, header))
        if total > cfg.max_total_seconds:
            raise InvalidInput(("instances",), f"the {len(clips)} clips last {total:.1f} s together, longer than "
                               f"pre.max_total_seconds ({cfg.max_total_seconds:g} s); send fewer or shorter clips per "
                               "request, or raise pre.max_total_seconds in model.yaml", round(total, 1))  # fmt: skip
        return Plan(cost, "samples", cost > INLINE_SAMPLES, lambda: self._run(clips))

    def _run(self, clips: list[tuple[bytes, WavHeader]]) -> dict[str, np.ndarray]:
        rate = self.config.sample_rate
        mono = [resample(samples(data, header), header.rate, rate) for data, header in clips]
        batch = np.zeros((len(mono), max(len(m) for m in mono)), dtype=self.dtype)
        for row, clip in zip(batch, mono):
            row[: len(clip)] = clip
        return {self.input: batch}


def build_pre(config: PreConfig, specs: Sequence[TensorSpec], folder: Path) -> Preprocessor:
    """The pre-processor model.yaml declares."""
    builders: dict[str, Callable[[], Preprocessor]] = {
        "tensor": NoPre,
        "tabular": lambda: Tabular(config, specs),  # type: ignore[arg-type]
        "image": lambda: Image(config, specs),  # type: ignore[arg-type]
        "text": lambda: Text(config, specs, folder),  # type: ignore[arg-type]
        "audio": lambda: Audio(config, specs),  # type: ignore[arg-type]
    }
    return builders[config.kind]()

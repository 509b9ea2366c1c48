"""Reading a GGUF language model: hyper-parameters, tokenizer metadata and (dequantized) tensors.

    model = GGUFFile.open("SmolLM2-135M-Instruct.Q4_1.gguf")
    model.hparams.n_layer            # 30
    model.dequantize("blk.0.attn_q.weight")   # float32 (576, 576), rows = output features

A GGUF file comes from elsewhere, so it is read as untrusted data: every count, length, offset and size in
it is checked against the bytes the file actually has before anything is allocated or looped over, and the
hyper-parameters are checked against the tensors' shapes before a converter sizes anything by them. A file
that is not GGUF, is cut short, lies about a size or lacks a field raises GGUFError naming the file and the
field, never a parser traceback. Metadata is parsed eagerly (the values are small: strings and numbers);
tensors stay in the memory map until used.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from forwardpass._deps import require
from forwardpass.errors import GGUFError  # noqa: F401 (raised here, lives in errors.py)

_PURPOSE = "reading GGUF language models"

# GGUF metadata value types -> (name, struct/numpy type code); 8 = string and 9 = array are handled apart
_SCALARS = {0: ("uint8", "B"), 1: ("int8", "b"), 2: ("uint16", "H"), 3: ("int16", "h"), 4: ("uint32", "I"),
            5: ("int32", "i"), 6: ("float32", "f"), 7: ("bool", "?"), 10: ("uint64", "Q"), 11: ("int64", "q"),
            12: ("float64", "d")}  # fmt: skip
_STRING, _ARRAY = 8, 9
_HEADER = 24  # magic, version, tensor count, metadata count
_MIN_KV = 8 + 4 + 1  # the smallest metadata entry: empty key, type, a one-byte value
_MIN_TENSOR = 8 + 4 + 8 + 4 + 8  # the smallest tensor record: empty name, one dimension, type, offset
_MAX_DIMS = 4  # ggml's GGML_MAX_DIMS
# ggml types stored as plain numbers (the rest are quantized blocks, kept as bytes), as the gguf package does
_PLAIN = {"F32": "f4", "F16": "f2", "F64": "f8", "I8": "i1", "I16": "i2", "I32": "i4", "I64": "i8"}


@dataclass(frozen=True)
class HParams:
    """The architecture numbers a Llama-family decoder needs."""

    arch: str
    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    n_ctx: int
    n_vocab: int
    rope_base: float
    rope_dim: int
    rms_eps: float

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor: its ggml type, GGUF dims (innermost first) and data (a read-only view of the file).

    ``data`` is numbers shaped by the reversed dims for plain types, and rows of quantized blocks as bytes
    ((outer dims..., bytes per row) uint8) for quantized ones.
    """

    name: str
    tensor_type: Any  # gguf.GGMLQuantizationType
    shape: tuple[int, ...]
    data: np.ndarray


class _Cursor:
    """Reads GGUF fields in the file's byte order; every length is checked against the bytes left first."""

    def __init__(self, path: Path, buf: Any, order: str):
        self.path, self.buf, self.order, self.pos, self.size = path, buf, order, 0, len(buf)

    def need(self, n: int, what: str) -> None:
        left = self.size - self.pos
        if n > left:
            raise GGUFError(f"{self.path}: {what} needs {n} bytes at offset {self.pos}, but the file has "
                            f"{left} left (of {self.size}): it is truncated or damaged; download or convert it again")

    def scalar(self, code: int, what: str) -> Any:
        fmt = self.order + _SCALARS[code][1]
        n = struct.calcsize(fmt)
        self.need(n, what)
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return value

    def string(self, what: str) -> str:
        n = self.scalar(10, f"{what} (its length)")
        self.need(n, f"{what} (a string of {n} bytes)")
        raw = self.buf[self.pos : self.pos + n]
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise GGUFError(f"{self.path}: {what} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None

    def value(self, vtype: int, what: str) -> Any:
        if vtype == _STRING:
            return self.string(what)
        if vtype == _ARRAY:
            return self.array(what)
        if vtype not in _SCALARS:
            raise GGUFError(f"{self.path}: {what} has value type {vtype}, which GGUF does not define (0 to 12)")
        return self.scalar(vtype, what)

    def array(self, what: str) -> Any:
        itype = self.scalar(4, f"{what} (its item type)")
        count = self.scalar(10, f"{what} (its length)")
        if itype == _STRING:
            self.need(count * 8, f"{what} (an array of {count} strings, 8 bytes or more each)")
            return [self.string(f"{what}[{i}]") for i in range(count)]
        if itype == _ARRAY:
            raise GGUFError(f"{self.path}: {what} is an array of arrays, which GGUF readers (llama.cpp's too) "
                            "do not support")  # fmt: skip
        if itype not in _SCALARS:
            raise GGUFError(f"{self.path}: {what} is an array of value type {itype}, which GGUF does not define")
        dtype = np.dtype(self.order + _SCALARS[itype][1])
        self.need(count * dtype.itemsize, f"{what} (an array of {count} {_SCALARS[itype][0]})")
        items = np.frombuffer(self.buf, dtype, count, self.pos)
        self.pos += count * dtype.itemsize
        return items


def _parse(path: Path, buf: Any, gguf: Any) -> tuple[dict[str, Any], dict[str, GGUFTensor]]:
    """Metadata and tensors of a whole GGUF file held in ``buf``, bounded by its size."""
    (version,) = struct.unpack_from("<I", buf, 4)
    order = "<"
    if version & 0xFFFF == 0:  # written on a big-endian machine (as the gguf package tells them apart)
        order, (version,) = ">", struct.unpack_from(">I", buf, 4)
    if version not in (2, 3):
        raise GGUFError(f"{path}: GGUF version {version} is not supported (2 and 3 are); convert it again")
    cur = _Cursor(path, buf, order)
    cur.pos = 8
    n_tensors = cur.scalar(10, "GGUF.tensor_count")
    n_kv = cur.scalar(10, "GGUF.kv_count")
    left = cur.size - cur.pos
    for field, count, least in (("GGUF.kv_count", n_kv, _MIN_KV), ("GGUF.tensor_count", n_tensors, _MIN_TENSOR)):
        if count * least > left:
            raise GGUFError(f"{path}: {field} is {count}: that many entries need {count * least} bytes or more, "
                            f"the file has {left} after its header: it is truncated or damaged")  # fmt: skip
    metadata: dict[str, Any] = {}
    for i in range(n_kv):
        key = cur.string(f"metadata key #{i}")
        if key in metadata:
            raise GGUFError(f"{path}: metadata '{key}' appears twice")
        metadata[key] = cur.value(cur.scalar(4, f"metadata '{key}' (its type)"), f"metadata '{key}'")
    records = []
    for i in range(n_tensors):
        name = cur.string(f"tensor #{i} name")
        n_dims = cur.scalar(4, f"tensor '{name}' dimension count")
        if not 1 <= n_dims <= _MAX_DIMS:
            raise GGUFError(f"{path}: tensor '{name}' has {n_dims} dimensions; ggml tensors have 1 to {_MAX_DIMS}")
        dims = tuple(cur.scalar(10, f"tensor '{name}' dimension {d}") for d in range(n_dims))
        records.append((name, dims, cur.scalar(4, f"tensor '{name}' type"), cur.scalar(10, f"tensor '{name}' offset")))
    alignment = metadata.get("general.alignment", 32)
    if not isinstance(alignment, int) or isinstance(alignment, bool) or alignment < 1 or alignment & (alignment - 1):
        raise GGUFError(f"{path}: metadata 'general.alignment' is {alignment!r}; expected a power of two (default 32)")
    start = cur.pos + (-cur.pos % alignment)
    tensors = {}
    for name, dims, code, offset in records:
        if name in tensors:
            raise GGUFError(f"{path}: tensor '{name}' appears twice")
        tensors[name] = _tensor(path, buf, gguf, order, start, alignment, name, dims, code, offset)
    return metadata, tensors


def _tensor(path: Path, buf: Any, gguf: Any, order: str, start: int, alignment: int, name: str,
            dims: tuple[int, ...], code: int, offset: int) -> GGUFTensor:  # fmt: skip
    try:
        kind = gguf.GGMLQuantizationType(code)
        block, type_size = gguf.GGML_QUANT_SIZES[kind]
    except (ValueError, KeyError):
        raise GGUFError(f"{path}: tensor '{name}' has type {code}, which this ggml version does not define") from None
    if dims[0] % block:
        raise GGUFError(f"{path}: tensor '{name}' rows hold {dims[0]} values, not a multiple of {kind.name}'s block "
                        f"of {block}")  # fmt: skip
    n_values = 1
    for d in dims:  # Python integers: a product of huge dims cannot wrap around to a small size
        n_values *= d
    n_bytes = n_values // block * type_size
    if offset % alignment or start + offset + n_bytes > len(buf):
        raise GGUFError(f"{path}: tensor '{name}' ({kind.name}, dims {list(dims)}) claims {n_bytes} bytes at offset "
                        f"{offset} of the data section (which starts at byte {start}, aligned to {alignment}), but the "
                        f"file has {len(buf)} bytes: it is truncated or damaged")  # fmt: skip
    shape = tuple(reversed(dims))
    if kind.name in _PLAIN:
        data = np.frombuffer(buf, np.dtype(order + _PLAIN[kind.name]), n_values, start + offset).reshape(shape)
    else:
        rows = (*shape[:-1], dims[0] // block * type_size)
        data = np.frombuffer(buf, np.uint8, n_bytes, start + offset).reshape(rows)
    return GGUFTensor(name, kind, dims, data)


class GGUFFile:
    """An opened GGUF file: ``metadata`` (key -> value), ``tensors`` (name -> GGUFTensor, memory-mapped)."""

    def __init__(self, path: Path, metadata: dict[str, Any], tensors: dict[str, GGUFTensor]):
        self.path, self.metadata, self.tensors = path, metadata, tensors
        self.hparams = self._hparams()
        self._check_shapes()

    @classmethod
    def open(cls, path: str | Path) -> GGUFFile:
        """Open and validate ``path``; GGUFError for anything unusable."""
        gguf = require("gguf", "llm", _PURPOSE)
        path = Path(path)
        try:
            with path.open("rb") as f:
                magic = f.read(4)
                if magic != b"GGUF":
                    raise GGUFError(f"{path}: not a GGUF file (starts with {magic!r}, expected b'GGUF')")
                size = f.seek(0, 2)
                if size < _HEADER:
                    raise GGUFError(f"{path}: truncated GGUF file ({size} bytes; its header alone is {_HEADER})")
                buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except OSError as exc:
            raise GGUFError(f"{path}: cannot read: {exc.strerror}") from None
        return cls(path, *_parse(path, buf, gguf))

    def value(self, key: str, default: Any = ...) -> Any:
        """A metadata value (``general.architecture``, ``tokenizer.ggml.tokens``, ...); arrays come as lists."""
        if key not in self.metadata:
            if default is ...:
                raise GGUFError(f"{self.path}: metadata '{key}' is missing")
            return default
        value = self.metadata[key]
        return value.tolist() if isinstance(value, np.ndarray) else value

    def number(self, key: str, kind: type, default: Any = ...) -> Any:
        """A metadata number as ``kind`` (int or float); GGUFError naming the key if it is anything else."""
        value = self.value(key, default)
        ok = (int,) if kind is int else (int, float)
        if isinstance(value, bool) or not isinstance(value, ok):
            expected = "an integer" if kind is int else "a number"
            raise GGUFError(f"{self.path}: metadata '{key}' is {value!r:.60}; expected {expected}")
        return kind(value)

    def _hparams(self) -> HParams:
        arch = self.value("general.architecture")
        if arch != "llama":
            raise GGUFError(f"{self.path}: architecture '{arch!s:.60}' is not supported (llama-family decoders are)")

        def num(key: str, kind: type = int, default: Any = ...) -> Any:
            return self.number(f"{arch}.{key}", kind, default)

        n_embd, n_head = num("embedding_length"), num("attention.head_count")
        if n_head < 1 or n_embd < 1 or n_embd % n_head:
            raise GGUFError(f"{self.path}: {arch}.embedding_length ({n_embd}) must be a positive multiple of "
                            f"{arch}.attention.head_count ({n_head})")  # fmt: skip
        n_head_kv = num("attention.head_count_kv", int, n_head)
        if n_head_kv < 1 or n_head % n_head_kv:
            raise GGUFError(f"{self.path}: {arch}.attention.head_count_kv ({n_head_kv}) must divide "
                            f"{arch}.attention.head_count ({n_head})")  # fmt: skip
        hp = HParams(
            arch=arch,
            n_layer=num("block_count"),
            n_embd=n_embd,
            n_ff=num("feed_forward_length"),
            n_head=n_head,
            n_head_kv=n_head_kv,
            n_ctx=num("context_length"),
            n_vocab=num("vocab_size", int, len(self.metadata.get("tokenizer.ggml.tokens", ()))),
            rope_base=num("rope.freq_base", float, 10000.0),
            rope_dim=num("rope.dimension_count", int, n_embd // n_head),
            rms_eps=num("attention.layer_norm_rms_epsilon", float),
        )
        for field, value in (("block_count", hp.n_layer), ("context_length", hp.n_ctx), ("vocab_size", hp.n_vocab)):
            if value < 1:
                raise GGUFError(f"{self.path}: metadata '{arch}.{field}' is {value}; expected a positive integer")
        if not 2 <= hp.rope_dim <= hp.head_dim or hp.rope_dim % 2:
            raise GGUFError(f"{self.path}: metadata '{arch}.rope.dimension_count' is {hp.rope_dim}; expected an even "
                            f"number from 2 to the head size {hp.head_dim}")  # fmt: skip
        return hp

    def _check_shapes(self) -> None:
        """Every tensor a Llama decoder reads has the shape the hyper-parameters say, so the sizes a converter
        derives from them (caches, fused weights) are bounded by what the file holds."""
        hp = self.hparams
        C, kv, F, V = hp.n_embd, hp.n_head_kv * hp.head_dim, hp.n_ff, hp.n_vocab
        if hp.n_layer * 9 > len(self.tensors):
            raise GGUFError(f"{self.path}: metadata '{hp.arch}.block_count' is {hp.n_layer}, but the file has only "
                            f"{len(self.tensors)} tensors (9 a block)")  # fmt: skip
        want = {"token_embd.weight": (C, V), "output_norm.weight": (C,)}
        if "output.weight" in self.tensors:
            want["output.weight"] = (C, V)
        block = {"attn_norm": (C,), "attn_q": (C, C), "attn_k": (C, kv), "attn_v": (C, kv), "attn_output": (C, C),
                 "ffn_norm": (C,), "ffn_gate": (C, F), "ffn_up": (C, F), "ffn_down": (F, C)}  # fmt: skip
        for i in range(hp.n_layer):
            want.update({f"blk.{i}.{name}.weight": shape for name, shape in block.items()})
        for name, shape in want.items():
            got = self.tensor(name).shape
            if tuple(got) != shape:
                raise GGUFError(f"{self.path}: tensor '{name}' has dims {list(got)}; the metadata ({hp.arch}.*) "
                                f"says {list(shape)}")  # fmt: skip

    def tensor(self, name: str) -> Any:
        """The raw tensor record (type, GGUF dims, quantized bytes)."""
        found = self.tensors.get(name)
        if found is None:
            raise GGUFError(f"{self.path}: tensor '{name}' is missing")
        return found

    def dequantize(self, name: str) -> np.ndarray:
        """The tensor as float32, rows = output features (numpy order, GGUF's dims reversed)."""
        gguf = require("gguf", "llm", _PURPOSE)
        t = self.tensor(name)
        try:
            values = gguf.quants.dequantize(t.data, t.tensor_type)
        except Exception as exc:
            raise GGUFError(f"{self.path}: tensor '{name}' ({t.tensor_type.name}) cannot be read ({exc})") from None
        return np.asarray(values, dtype=np.float32).reshape([int(d) for d in reversed(t.shape)])

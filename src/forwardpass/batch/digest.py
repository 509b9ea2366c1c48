"""Content fingerprints of inputs and checksums of committed parts: what lets a rerun trust what it skips.

An input is known by its content, not by its size and modification time (an edit can keep both). Up to
``FULL_LIMIT`` (4 GiB) every byte is hashed: SHA-256 (hardware-accelerated on x86 and ARM: ~1.3 GB/s a
core, measured) over 16 MiB pieces on every core, the pieces' digests hashed again in order. Past the
limit, ``SAMPLES`` blocks of 1 MiB spread evenly over the input are hashed along with its size and
modification time, and the fingerprint says so in ``hashed``.

    input_fingerprint(["rows.parquet"])   # {"bytes": ..., "sha256": ..., "hashed": "all"}
    file_digest(Path("part-00000.parquet"))  # {"bytes": ..., "sha256": ...}
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from forwardpass.errors import InvalidInput

FULL_LIMIT = 4 << 30
PIECE = 16 << 20
SAMPLES = 256
SAMPLE = 1 << 20
_READ = 1 << 20

Span = tuple[str, int, int]  # (file, offset, length)


def input_fingerprint(files: list[str]) -> dict[str, Any]:
    """What identifies the input's content: total bytes, a SHA-256, and how much of it was hashed."""
    sizes = [os.path.getsize(f) for f in files]
    total = sum(sizes)
    if total <= FULL_LIMIT:
        return {"bytes": total, "sha256": _hash_spans(_pieces(files, sizes)), "hashed": "all"}
    spans = _samples(files, sizes, total)
    mtime = max(os.stat(f).st_mtime_ns for f in files)
    return {"bytes": total, "mtime_ns": mtime, "sha256": _hash_spans(spans, salt=f"{total}:{mtime}"),
            "hashed": f"{SAMPLES} blocks of 1 MiB with size and mtime (input over {FULL_LIMIT >> 30} GiB)"}  # fmt: skip


def file_digest(path: Path) -> dict[str, Any]:
    """Size and SHA-256 of one file (a committed part): what resuming checks before it skips the part."""
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    return {"bytes": path.stat().st_size, "sha256": digest}


def _pieces(files: list[str], sizes: list[int]) -> list[list[Span]]:
    """Work items of about PIECE bytes: a big file in several, many small files (images) in one."""
    items: list[list[Span]] = []
    current: list[Span] = []
    held = 0
    for path, size in zip(files, sizes):
        for offset in range(0, max(size, 1), PIECE):
            length = min(PIECE, size - offset)
            current.append((path, offset, length))
            held += length
            if held >= PIECE or len(current) >= 4096:
                items.append(current)
                current, held = [], 0
    if current:
        items.append(current)
    return items


def _samples(files: list[str], sizes: list[int], total: int) -> list[list[Span]]:
    """SAMPLES blocks of SAMPLE bytes at evenly spaced offsets of the input's concatenation."""
    spans: list[Span] = []
    starts, at = [], 0
    for size in sizes:
        starts.append(at)
        at += size
    index = 0
    for k in range(SAMPLES):
        offset = (total - SAMPLE) * k // (SAMPLES - 1)
        while starts[index] + sizes[index] <= offset:
            index += 1
        local = offset - starts[index]
        spans.append((files[index], local, min(SAMPLE, sizes[index] - local)))
    return [spans[i : i + 16] for i in range(0, len(spans), 16)]


def _hash_spans(items: list[list[Span]], salt: str = "") -> str:
    from forwardpass.runtime.onnx import available_cores

    workers = max(1, min(available_cores(), len(items)))
    if workers == 1:
        digests = [_hash_item(item) for item in items]
    else:  # hashlib and file reads release the GIL: the pieces hash on every core at once
        with ThreadPoolExecutor(workers, thread_name_prefix="batch-hash") as pool:
            digests = list(pool.map(_hash_item, items))
    return hashlib.sha256(salt.encode() + b"".join(digests)).hexdigest()


def _hash_item(item: list[Span]) -> bytes:
    h = hashlib.sha256()
    buf = memoryview(bytearray(_READ))
    for path, offset, length in item:
        h.update(f"{path}\0{offset}\0{length}\0".encode())
        with open(path, "rb", buffering=0) as f:
            f.seek(offset)
            left = length
            while left:
                n = f.readinto(buf[: min(_READ, left)])
                if not n:
                    raise InvalidInput(("input",), f"{path} got shorter while it was being read; rerun once "
                                       "nothing is writing to it")  # fmt: skip
                h.update(buf[:n])
                left -= n
    return h.digest()

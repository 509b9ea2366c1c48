"""Giving freed memory back to the operating system, so that reloading a model does not grow the server.

glibc keeps freed blocks in its heaps for reuse, and raises its mmap threshold each time a large
mmapped block is freed, so after a model reload the next model's weights land in the heap and the
old ones' pages stay resident: thirteen reloads of a 135M-parameter language model took a server
from 650 MB to 3.1 GB. A fixed threshold keeps large buffers (weights, big request bodies) in their
own mappings, returned on free; ``release()`` trims what the heaps still hold after a model is retired.
No-ops where the C library is not glibc.

``page_out(folder)``: ONNX Runtime maps a model's external weight files and reads every page of the
weights it prepacks into its own layout (MatMulNBits: all of a language model's linears), then keeps the
mapping; those file pages stay in the resident set though nothing reads them again (25 MiB of the 302 MiB
peak of SmolLM2-135M). MADV_PAGEOUT (Linux 5.4+) gives them back; it only reclaims what can be read again
from the file (clean pages), so a weight still in use faults back in from the page cache.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger("forwardpass.memory")
M_MMAP_THRESHOLD = -3  # mallopt parameter (malloc.h)
MMAP_THRESHOLD = 256 * 1024  # blocks this large get their own mapping

_libc: ctypes.CDLL | None = None
_tuned = False


def _glibc() -> ctypes.CDLL | None:
    global _libc
    if _libc is None:
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            libc.malloc_trim, libc.mallopt  # glibc only  # noqa: B018
        except (OSError, AttributeError):
            return None
        _libc = libc
    return _libc


def tune() -> None:
    """Fix glibc's mmap threshold (once per process; see the module docstring)."""
    global _tuned
    libc = _glibc()
    if libc is not None and not _tuned:
        _tuned = bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))


def release() -> None:
    """Return the free memory at the top and inside glibc's heaps to the OS (after a model is retired)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


MADV_PAGEOUT = 21  # linux/mman.h


def page_out(folder: str) -> int:
    """Reclaim this process's resident pages of files mapped from ``folder`` (see the module docstring); the
    number of mappings advised (0 where /proc or madvise is missing)."""
    libc = _glibc()
    if libc is None:
        return 0
    prefix = folder.rstrip("/") + "/"
    advised = 0
    try:
        with open("/proc/self/maps") as maps:
            spans = [line.split() for line in maps]
    except OSError:
        return 0
    madvise = libc.madvise
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    for fields in spans:
        if len(fields) >= 6 and fields[5].startswith(prefix):
            start, end = (int(x, 16) for x in fields[0].split("-"))
            advised += madvise(start, end - start, MADV_PAGEOUT) == 0
    return advised

"""forwardpass's own CPU kernels: C compiled on the machine that runs them, loaded into ONNX Runtime as custom ops.

    path = library()          # builds once per source and CPU (-O3 -march=native), cached
    options.register_custom_ops_library(str(path))

ONNX Runtime's CPU kernels have no exact form for some of the layouts a GGUF model ships in (Q4_1's float
minimum takes MatMulNBits plus three correction nodes a linear, bench/decode_profile.py). These ops compute
them in one pass, as llama.cpp does. The library is plain C against ONNX Runtime's stable C ABI (``ort_ops.c``
declares the few entries it calls), built with the system compiler (``$CC``, else ``cc``) into
``$FORWARDPASS_HOME/kernels/<key>/`` (the key: sources, flags and this CPU's instruction sets, so a library
built once serves later without a compiler). Where none is built and no compiler works, or the library does not
load, :func:`library` raises KernelUnavailable and the GGUF importer builds the plain ONNX Runtime graph instead.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shlex
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

SOURCES = ("q4_1.c", "q8_0.c", "attention.c", "ort_ops.c")
HEADERS = ("kernels.h",)
DOMAIN = "forwardpass"  # the custom ops' ONNX domain
FLAGS = ("-O3", "-march=native", "-std=c11", "-shared", "-fPIC", "-fvisibility=hidden", "-pthread", "-Wall")
_HERE = Path(__file__).resolve().parent


class KernelUnavailable(RuntimeError):
    """The kernels library could not be built or loaded here (no compiler, or it failed)."""


def _compiler() -> list[str]:
    given = os.environ.get("CC")
    if given:  # may carry arguments: "ccache gcc"
        return shlex.split(given)
    cc = shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise KernelUnavailable("no C compiler found (set CC, or install gcc) to build forwardpass's kernels")
    return [cc]


def _cpu() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return ""
    return next((line for line in text.splitlines() if line.startswith(("flags", "Features"))), "")


def _key() -> str:
    """The build's folder: the sources, the flags and this CPU's instruction sets (a library built here serves
    here, with or without a compiler left on the machine)."""
    digest = hashlib.sha256()
    for name in (*SOURCES, *HEADERS):
        digest.update((_HERE / name).read_bytes())
    digest.update("\0".join([*FLAGS, _cpu()]).encode())
    return digest.hexdigest()[:16]


_failed: list[str] = []  # why this process could not build or load the library (not tried again)


@cache
def library() -> Path:
    """The built kernels library (built now if this source and CPU have none yet), loadable in this process."""
    from forwardpass.demo.build import home

    if _failed:
        raise KernelUnavailable(_failed[0])
    path = home() / "kernels" / _key() / "libforwardpass_kernels.so"
    try:
        if not path.exists():
            _build(path)
        ctypes.CDLL(str(path))  # a library that built but does not load (noexec folder, foreign libc) is no use
    except KernelUnavailable as exc:
        _failed.append(str(exc))
        raise
    except OSError as exc:
        _failed.append(f"forwardpass's kernels ({path}) do not load: {exc}")
        raise KernelUnavailable(_failed[0]) from None
    return path


def _build(path: Path) -> None:
    cc = _compiler()
    path.parent.mkdir(parents=True, exist_ok=True)
    # built beside its final name and renamed: workers starting together never load a half-written file
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".so.tmp")
    os.close(fd)
    command = [*cc, *FLAGS, "-o", tmp, *(str(_HERE / name) for name in SOURCES), "-lm"]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise KernelUnavailable(f"building forwardpass's kernels failed ({' '.join(command)}):\n"
                                    f"{done.stderr[-2000:]}")  # fmt: skip
        os.replace(tmp, path)
    except (OSError, subprocess.SubprocessError) as exc:
        raise KernelUnavailable(f"building forwardpass's kernels failed: {exc}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# ONNX Runtime operators whose result for a row can depend on the rows computed with it (their kernels take
# other paths, summing in another order, for one row than for many)
ROW_MIXING = frozenset({"MatMulNBits", "MatMul", "Gemm", "GroupQueryAttention"})


@cache
def _graph(path: str, mtime: int) -> tuple[bool, frozenset[str]]:
    from forwardpass._deps import require

    onnx = require("onnx", "llm", "reading a graph's operator sets")
    model = onnx.load(path, load_external_data=False)
    return any(o.domain == DOMAIN for o in model.opset_import), frozenset(n.op_type for n in model.graph.node)


def used_by(path: str | Path) -> bool:
    """Whether the ONNX graph at ``path`` uses these kernels (imports the forwardpass domain)."""
    return _graph(str(path), Path(path).stat().st_mtime_ns)[0]


def row_invariant(path: str | Path) -> bool:
    """Whether every row of the graph at ``path`` is computed the same alone and beside other rows: its linears,
    head and attention are these kernels (the rest of a decoder is per row or per element)."""
    uses, ops = _graph(str(path), Path(path).stat().st_mtime_ns)
    return uses and not ops & ROW_MIXING


def available() -> bool:
    """Whether the kernels library builds (or is built) here."""
    try:
        library()
    except KernelUnavailable:
        return False
    return True

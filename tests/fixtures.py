"""Small real ONNX models and model folders for tests (built with onnx.helper, no training)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import yaml
from onnx import TensorProto, helper, numpy_helper

OPSET = [helper.make_opsetid("", 17)]


def save(model: onnx.ModelProto, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def linear_model(n_in: int, n_out: int, *, seed: int = 0, out_name: str = "logits") -> onnx.ModelProto:
    """y = x @ W + b with x: float [N, n_in] named 'input' -> float [N, n_out]."""
    rng = np.random.default_rng(seed)
    W = numpy_helper.from_array(rng.normal(size=(n_in, n_out)).astype(np.float32), "W")
    b = numpy_helper.from_array(rng.normal(size=(n_out,)).astype(np.float32), "b")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["input", "W"], ["xw"]), helper.make_node("Add", ["xw", "b"], [out_name])],
        "linear",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", n_in])],
        [helper.make_tensor_value_info(out_name, TensorProto.FLOAT, ["N", n_out])],
        [W, b],
    )
    return helper.make_model(graph, opset_imports=OPSET)


def weights(model: onnx.ModelProto) -> tuple[np.ndarray, np.ndarray]:
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    return inits["W"], inits["b"]


def quantile_model() -> onnx.ModelProto:
    """Regression with quantile outputs: value = sum(x), q05 = value - 1, q95 = value + 2."""
    one = numpy_helper.from_array(np.array(1.0, np.float32), "one")
    two = numpy_helper.from_array(np.array(2.0, np.float32), "two")
    axes = numpy_helper.from_array(np.array([1], np.int64), "axes")
    graph = helper.make_graph(
        [
            helper.make_node("ReduceSum", ["input", "axes"], ["value"], keepdims=1),
            helper.make_node("Sub", ["value", "one"], ["q05"]),
            helper.make_node("Add", ["value", "two"], ["q95"]),
        ],
        "quantiles",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", 1]) for n in ("value", "q05", "q95")],
        [one, two, axes],
    )
    return helper.make_model(graph, opset_imports=OPSET)


def token_model(vocab: int, classes: int = 2, seed: int = 1) -> onnx.ModelProto:
    """input_ids, attention_mask int64 [N, T] -> logits [N, classes]: masked sum of embeddings."""
    rng = np.random.default_rng(seed)
    E = numpy_helper.from_array(rng.normal(size=(vocab, classes)).astype(np.float32), "E")
    axes = numpy_helper.from_array(np.array([1], np.int64), "axes")
    graph = helper.make_graph(
        [
            helper.make_node("Gather", ["E", "input_ids"], ["emb"]),  # (N, T, C)
            helper.make_node("Cast", ["attention_mask"], ["maskf"], to=TensorProto.FLOAT),
            helper.make_node("Unsqueeze", ["maskf", "two"], ["mask3"]),  # (N, T, 1)
            helper.make_node("Mul", ["emb", "mask3"], ["masked"]),
            helper.make_node("ReduceSum", ["masked", "axes"], ["logits"], keepdims=0),  # (N, C)
        ],
        "tokens",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["N", "T"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["N", "T"]),
        ],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])],
        [E, axes, numpy_helper.from_array(np.array([2], np.int64), "two")],
    )
    return helper.make_model(graph, opset_imports=OPSET)


def image_model(channels: int, h: int, w: int, layout: str = "NCHW") -> onnx.ModelProto:
    """Identity over an image tensor, so tests can read back exactly what pre-processing made."""
    shape = {"NCHW": ["N", channels, h, w], "NHWC": ["N", h, w, channels], "flat": ["N", channels * h * w]}[layout]
    graph = helper.make_graph(
        [helper.make_node("Identity", ["image"], ["pixels"])],
        "image",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, shape)],
    )
    return helper.make_model(graph, opset_imports=OPSET)


def audio_model() -> onnx.ModelProto:
    """Identity over [N, samples] float audio."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["audio"], ["samples"])],
        "audio",
        [helper.make_tensor_value_info("audio", TensorProto.FLOAT, ["N", "S"])],
        [helper.make_tensor_value_info("samples", TensorProto.FLOAT, ["N", "S"])],
    )
    return helper.make_model(graph, opset_imports=OPSET)


def write_model(repo: Path, name: str, config: dict[str, Any], model: onnx.ModelProto, version: int = 1) -> Path:
    """repo/name/model.yaml + repo/name/<version>/model.onnx."""
    folder = repo / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    save(model, folder / str(version) / "model.onnx")
    return folder


def iris_like_config(**overrides: Any) -> dict[str, Any]:
    """A tabular classifier config for linear_model(4, 3)."""
    config: dict[str, Any] = {
        "task": "classification",
        "labels": ["a", "b", "c"],
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 4], "features": ["f0", "f1", "f2", "f3"]}],
        "pre": {"kind": "tabular"},
        "post": {"kind": "classification", "output": "logits", "logits": True, "top_k": 2},
    }
    config.update(overrides)
    return config

"""A ResNet-18-shaped CNN (3x224x224 -> 1000 scores) with random weights, built with onnx.helper.

Batch norm is folded into the convolutions (as an exported, optimized ResNet has it), so the
graph is Conv/Relu/MaxPool/Add/GlobalAveragePool/Gemm: 1.8 GFLOPs per image, 11.7 M weights.

    python bench/cnn.py OUT.onnx
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def resnet18(seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    nodes: list[onnx.NodeProto] = []
    weights: list[onnx.TensorProto] = []
    counter = [0]

    def conv(x: str, c_in: int, c_out: int, k: int, stride: int, relu: bool = True) -> str:
        counter[0] += 1
        n = counter[0]
        w = (rng.standard_normal((c_out, c_in, k, k)) * np.sqrt(2.0 / (c_in * k * k))).astype(np.float32)
        weights.extend([numpy_helper.from_array(w, f"w{n}"), numpy_helper.from_array(np.zeros(c_out, np.float32), f"b{n}")])
        pad = k // 2
        nodes.append(helper.make_node("Conv", [x, f"w{n}", f"b{n}"], [f"c{n}"], kernel_shape=[k, k],
                                      strides=[stride, stride], pads=[pad] * 4))  # fmt: skip
        if not relu:
            return f"c{n}"
        nodes.append(helper.make_node("Relu", [f"c{n}"], [f"r{n}"]))
        return f"r{n}"

    def block(x: str, c_in: int, c_out: int, stride: int) -> str:
        y = conv(conv(x, c_in, c_out, 3, stride), c_out, c_out, 3, 1, relu=False)
        skip = x if stride == 1 and c_in == c_out else conv(x, c_in, c_out, 1, stride, relu=False)
        counter[0] += 1
        n = counter[0]
        nodes.extend([helper.make_node("Add", [y, skip], [f"a{n}"]), helper.make_node("Relu", [f"a{n}"], [f"o{n}"])])
        return f"o{n}"

    x = conv("input", 3, 64, 7, 2)
    nodes.append(helper.make_node("MaxPool", [x], ["pool"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]))
    x, c = "pool", 64
    for c_out, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        x = block(block(x, c, c_out, stride), c_out, c_out, 1)
        c = c_out
    fc = (rng.standard_normal((1000, 512)) * 0.01).astype(np.float32)
    weights += [numpy_helper.from_array(fc, "fc_w"), numpy_helper.from_array(np.zeros(1000, np.float32), "fc_b")]
    nodes += [
        helper.make_node("GlobalAveragePool", [x], ["gap"]),
        helper.make_node("Flatten", ["gap"], ["flat"]),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], transB=1),
    ]
    graph = helper.make_graph(
        nodes, "resnet18",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 224, 224])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 1000])],
        weights,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def write(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(resnet18(), str(path))
    return path


if __name__ == "__main__":
    write(Path(sys.argv[1]))

"""Runtimes run the forward pass; today one, ONNX Runtime."""

from forwardpass.runtime.base import Runtime, TensorInfo
from forwardpass.runtime.onnx import OnnxRuntime

__all__ = ["Runtime", "TensorInfo", "OnnxRuntime"]

"""Runtimes run the forward pass. model.yaml's ``runtime:`` names one; this registry opens it.

    runtime: onnx                                   # the default: folder/<version>/model.onnx
    runtime: {kind: remote, url: "http://10.0.0.5:8000", model: resnet}

Built-in runtimes are imported when first used (a remote-only server never imports what ONNX needs
beyond onnxruntime itself). A new runtime is one module with a ``from_config`` factory plus one line in
``BUILTIN``; tests and plug-ins can also ``register(name, factory)`` at run time.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING

from forwardpass.errors import ModelConfigError
from forwardpass.runtime.base import Runtime, RuntimeFactory, TensorInfo

if TYPE_CHECKING:
    from forwardpass.config import ModelConfig

# name -> "module:factory", imported on first use
BUILTIN: dict[str, str] = {
    "onnx": "forwardpass.runtime.onnx:from_config",
    "remote": "forwardpass.runtime.remote:from_config",
}
_registered: dict[str, RuntimeFactory] = {}


def register(name: str, factory: RuntimeFactory) -> None:
    """Make ``runtime: <name>`` in model.yaml open models with ``factory(config, folder, version)``."""
    _registered[name] = factory


def unregister(name: str) -> None:
    """Forget a runtime registered at run time (tests)."""
    _registered.pop(name, None)


def names() -> list[str]:
    """Every runtime model.yaml may name."""
    return sorted({*BUILTIN, *_registered})


def factory(name: str) -> RuntimeFactory:
    """The factory for a runtime name; KeyError for names nobody registered."""
    if name in _registered:
        return _registered[name]
    module, _, attr = BUILTIN[name].partition(":")
    found: RuntimeFactory = getattr(importlib.import_module(module), attr)
    _registered[name] = found
    return found


def open_runtime(config: ModelConfig, folder: Path, version: int) -> Runtime:
    """The runtime model.yaml asks for, loaded for one version of the model in ``folder``."""
    kind = config.runtime.kind
    try:
        make = factory(kind)
    except KeyError:
        raise ModelConfigError(str(folder / "model.yaml"), "runtime.kind", f"unknown runtime '{kind}'",
                               f"use one of {names()}") from None  # fmt: skip
    return make(config, folder, version)


def __getattr__(name: str) -> object:  # OnnxRuntime without importing it for every user of this package
    if name == "OnnxRuntime":
        from forwardpass.runtime.onnx import OnnxRuntime

        return OnnxRuntime
    raise AttributeError(name)


__all__ = ["BUILTIN", "Runtime", "RuntimeFactory", "TensorInfo", "factory", "names", "open_runtime", "register",
           "unregister"]  # fmt: skip

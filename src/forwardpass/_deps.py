"""Lazy imports of optional packages, failing with the pip command that fixes it."""

from __future__ import annotations

import importlib
from types import ModuleType

from forwardpass.errors import MissingDependency


def require(module: str, extra: str, purpose: str) -> ModuleType:
    """Import ``module`` or raise MissingDependency naming the extra to install.

    Usage::

        skl2onnx = require("skl2onnx", "sklearn", "importing scikit-learn models")
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependency(
            f"{purpose} needs the Python package '{module.split('.')[0]}', which is not installed "
            f"({exc}); install it with: pip install 'forwardpass[{extra}]'"
        ) from exc

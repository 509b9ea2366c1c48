"""forwardpass: AI inference on ONNX Runtime — a model repository, pre/post-processing, serving.

Usage::

    import forwardpass
    model = forwardpass.load("iris")   # from the built-in demo repository
    model.predict({"sepal length (cm)": 5.1, "sepal width (cm)": 3.5,
                   "petal length (cm)": 1.4, "petal width (cm)": 0.2})
    # {'label': 'setosa', 'probability': 0.97, 'top_k': [...]}
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from forwardpass.config import ModelConfig
from forwardpass.errors import (
    ForwardpassError,
    InvalidInput,
    InvalidModelName,
    MissingDependency,
    ModelConfigError,
    ModelLoadError,
    ModelNotFound,
    ModelNotReady,
    UntrustedFile,
)
from forwardpass.model import Model
from forwardpass.repository import Repository, VersionStatus

__version__ = "0.1.0"


def default_repository(progress: Callable[[str], None] | None = None) -> Path:
    """$FORWARDPASS_REPOSITORY, else the built-in demo repository (built on first use; ``progress`` gets a
    line per model while it builds)."""
    env = os.environ.get("FORWARDPASS_REPOSITORY")
    if env:
        return Path(env).expanduser()
    from forwardpass import demo

    return demo.repository(progress=progress)


def load(name: str, *, repository: str | Path | Repository | None = None, version: int | None = None) -> Model:
    """Load a model by name (newest version unless ``version``) from a repository (default: the demo)."""
    repo = repository if isinstance(repository, Repository) else Repository(repository or default_repository())
    return repo.load(name, version)


__all__ = [
    "ForwardpassError",
    "InvalidInput",
    "InvalidModelName",
    "MissingDependency",
    "Model",
    "ModelConfig",
    "ModelConfigError",
    "ModelLoadError",
    "ModelNotFound",
    "ModelNotReady",
    "Repository",
    "UntrustedFile",
    "VersionStatus",
    "__version__",
    "default_repository",
    "load",
]

"""Pre-processing kinds by name: model.yaml's ``pre: {kind: <name>, ...}`` picks one from this registry.

    pre: {kind: image, resize: 256, center_crop: [224, 224]}

Each kind is one module here holding both its model.yaml schema (a PreOptions subclass with
``kind: Literal["<name>"]``) and its Preprocessor, which names that schema in ``schema``. ModelConfig
validates ``pre:`` with the schemas listed here, and ``build_pre`` builds the kind's Preprocessor. A new
kind is its module plus one line in BUILTIN; tests and plug-ins can also register one at run time::

    register("scaled", Scaled)                  # a Preprocessor subclass, or "package.module:Scaled"
    config = load_config(path)                  # pre: {kind: scaled, ...} now validates
    pre = build_pre(config.pre, specs, folder)  # Scaled(config.pre, specs, folder)
    unregister("scaled")

Built-in kinds are imported when model.yaml is first validated (none imports Pillow or tokenizers until
it is built).
"""

from __future__ import annotations

import importlib
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from forwardpass.pipeline.pre import Preprocessor

if TYPE_CHECKING:
    from forwardpass.config import PreOptions, TensorSpec

# name -> "module:class", imported on first use; the order is the order error messages list them in
BUILTIN: dict[str, str] = {
    "tensor": "forwardpass.pipeline.kinds.tensor:NoPre",
    "tabular": "forwardpass.pipeline.kinds.tabular:Tabular",
    "image": "forwardpass.pipeline.kinds.image:Image",
    "text": "forwardpass.pipeline.kinds.text:Text",
    "audio": "forwardpass.pipeline.kinds.audio:Audio",
}
_registered: dict[str, type[Preprocessor]] = {}
_loaded: dict[str, type[Preprocessor]] = {}


def register(name: str, kind: type[Preprocessor] | str) -> None:
    """Make ``pre: {kind: <name>}`` validate with ``kind.schema`` and build ``kind(config, specs, folder)``."""
    cls = _import(kind) if isinstance(kind, str) else kind
    _check(name, cls)
    _registered[name] = cls
    _revalidate()


def unregister(name: str) -> None:
    """Forget a kind registered at run time (tests)."""
    if _registered.pop(name, None) is not None:
        _revalidate()


def names() -> list[str]:
    """Every kind model.yaml may name, built-ins first (no module is imported for a name)."""
    return [*BUILTIN, *(name for name in _registered if name not in BUILTIN)]


def kind(name: str) -> type[Preprocessor]:
    """The Preprocessor class of a kind; KeyError for names nobody registered."""
    if name in _registered:
        return _registered[name]
    if name not in _loaded:
        cls = _import(BUILTIN[name])
        _check(name, cls)
        _loaded[name] = cls
    return _loaded[name]


def schemas() -> list[type[PreOptions]]:
    """Every kind's model.yaml schema, in ``names()`` order (what ModelConfig validates ``pre:`` with)."""
    return [kind(name).schema for name in names()]


def build_pre(config: PreOptions, specs: Sequence[TensorSpec], folder: Path) -> Preprocessor:
    """The pre-processor model.yaml declares, for a model with these inputs in ``folder``.

        pre = build_pre(config.pre, model.inputs, folder)
    """
    return kind(config.kind)(config, specs, folder)


def _import(path: str) -> type[Preprocessor]:
    module, _, attr = path.partition(":")
    found: type[Preprocessor] = getattr(importlib.import_module(module), attr)
    return found


def _check(name: str, cls: type[Preprocessor]) -> None:
    """A kind's schema must say its own name in ``kind: Literal[...]``: that is how ``pre:`` finds it."""
    schema = getattr(cls, "schema", None)
    field = schema.model_fields.get("kind") if schema is not None else None
    if not (isinstance(cls, type) and issubclass(cls, Preprocessor)) or field is None or \
            typing.get_args(field.annotation) != (name,):  # fmt: skip
        raise TypeError(f"pre-processing kind '{name}': {cls!r} must be a Preprocessor whose schema (a PreOptions) "
                        f"declares kind: Literal['{name}']")  # fmt: skip


def _revalidate() -> None:
    """ModelConfig's ``pre:`` union is built from this registry: build it again after a change."""
    from forwardpass.config import ModelConfig

    ModelConfig.model_rebuild(force=True)


__all__ = ["BUILTIN", "build_pre", "kind", "names", "register", "schemas", "unregister"]

"""A model repository on disk: model folders, numbered versions, load / unload / reload.

Layout::

    models/
      digits/
        model.yaml
        1/model.onnx
        2/model.onnx

Usage::

    repo = Repository("models")
    repo.names()                 # ['digits', ...]
    model = repo.load("digits")  # versions chosen by version_policy; returns the newest
    repo.reload("digits")        # re-read model.yaml and version folders, swap in new sessions
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from pathlib import Path

from forwardpass.config import LatestPolicy, ModelConfig, SpecificPolicy, load_config
from forwardpass.errors import ForwardpassError, InvalidModelName, ModelNotFound, ModelUnavailable
from forwardpass.model import Model
from forwardpass.tasks import task

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def check_name(name: str) -> str:
    """Refuse names that could leave the repository folder (separators, '..', leading dots)."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or ".." in name:
        raise InvalidModelName(
            f"invalid model name {name!r}: use letters, digits, '.', '_' and '-' (no path separators or '..'), "
            "starting with a letter or digit"
        )
    return name


@dataclass(frozen=True)
class VersionStatus:
    """One model version as the repository sees it."""

    name: str
    version: int
    state: str  # READY | UNAVAILABLE (failed to load) | UNLOADED
    reason: str = ""


class Repository:
    """A folder of models; thread-safe load / unload / reload by name and version."""

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()
        if not self.path.is_dir():
            raise ForwardpassError(f"model repository {self.path} is not a folder; create it or pass --repository")
        self._lock = threading.RLock()
        self._loaded: dict[str, dict[int, Model]] = {}
        self._failed: dict[tuple[str, int], str] = {}

    def __repr__(self) -> str:
        return f"Repository({str(self.path)!r})"

    # -- what is on disk -----------------------------------------------------------------------

    def names(self) -> list[str]:
        """Model folders (those holding a model.yaml), sorted."""
        return sorted(p.name for p in self.path.iterdir() if (p / "model.yaml").is_file() and _NAME.fullmatch(p.name))

    def folder(self, name: str) -> Path:
        """The model's folder; ModelNotFound when there is none."""
        folder = self.path / check_name(name)
        if not (folder / "model.yaml").is_file():
            raise ModelNotFound(f"Request for unknown model: '{name}' is not found")  # Triton's words
        return folder

    def config(self, name: str) -> ModelConfig:
        """The model's validated model.yaml."""
        return load_config(self.folder(name) / "model.yaml")

    def versions(self, name: str) -> list[int]:
        """Version numbers on disk: folders named by a positive integer, holding model.onnx when the model
        runs on ONNX Runtime (a model with another runtime, ``remote`` say, may keep nothing in them)."""
        folder = self.folder(name)
        numbered = [p for p in folder.iterdir() if p.name.isascii() and p.name.isdigit() and p.is_dir()]
        with_file = [p for p in numbered if (p / "model.onnx").is_file()]
        if len(with_file) < len(numbered) and self.config(name).runtime.kind != "onnx":
            with_file = numbered
        return sorted(v for v in (int(p.name) for p in with_file) if v > 0)

    def selected_versions(self, name: str, config: ModelConfig | None = None) -> list[int]:
        """The versions the model's version_policy asks to serve."""
        config = config or self.config(name)
        on_disk = self.versions(name)
        policy = config.version_policy
        if isinstance(policy, LatestPolicy):
            return on_disk[-policy.latest :]
        if isinstance(policy, SpecificPolicy):
            return [v for v in on_disk if v in policy.specific]
        return on_disk

    # -- loading -------------------------------------------------------------------------------

    def load(self, name: str, version: int | None = None) -> Model:
        """Load one version, or (version None) those the policy selects; returns the newest loaded.

        Already loaded versions are kept; use reload() to pick up changed files.
        """
        config = self.config(name)
        wanted = [version] if version is not None else self.selected_versions(name, config)
        if version is not None and version not in self.versions(name):
            raise ModelNotFound(f"model '{name}' has no version {version}; versions: {self.versions(name)}")
        if not wanted:
            raise ModelNotFound(f"model '{name}' has no version folder with a model.onnx ({name}/1/model.onnx, ...)")
        with self._lock:
            have = dict(self._loaded.get(name, {}))
        for v in wanted:
            if v not in have:
                have[v] = self._load_version(name, v, config)
        with self._lock:
            self._loaded[name] = {**self._loaded.get(name, {}), **{v: have[v] for v in wanted}}
        return have[max(wanted)]

    def reload(self, name: str) -> list[int]:
        """Re-read model.yaml and the version folders; load new versions, unload dropped ones.

        New sessions are built before they replace the old ones, so requests in flight finish on
        the version object they hold. Returns the versions now served.
        """
        config = self.config(name)
        wanted = self.selected_versions(name, config)
        fresh = {v: self._load_version(name, v, config) for v in wanted}
        with self._lock:
            self._loaded[name] = fresh
        return sorted(fresh)

    def unload(self, name: str, version: int | None = None) -> None:
        """Stop serving one version, or all versions of the model."""
        check_name(name)
        with self._lock:
            versions = self._loaded.get(name, {})
            if version is None:
                self._loaded.pop(name, None)
            else:
                versions.pop(version, None)

    def load_all(self) -> dict[str, str]:
        """Load every model; returns {name: error} for those that failed (others keep serving)."""
        errors = {}
        for name in self.names():
            try:
                self.load(name)
            except ForwardpassError as exc:
                errors[name] = str(exc)
        return errors

    def open(self, name: str, version: int, config: ModelConfig | None = None) -> Model:
        """A new instance of one version, kept nowhere (the engine's registry keeps what it serves)."""
        config = config or self.config(name)
        model: Model = task(config.task).open(name, version, config, self.folder(name))  # a LanguageModel for generation
        return model

    def _load_version(self, name: str, version: int, config: ModelConfig) -> Model:
        try:
            model = self.open(name, version, config)
        except ForwardpassError as exc:
            with self._lock:
                self._failed[(name, version)] = str(exc)
            raise
        with self._lock:
            self._failed.pop((name, version), None)
        return model

    # -- serving -------------------------------------------------------------------------------

    def get(self, name: str, version: int | None = None) -> Model:
        """A loaded model version (the newest when version is None)."""
        check_name(name)
        with self._lock:
            versions = self._loaded.get(name)
            if versions:
                key = max(versions) if version is None else version
                if key in versions:
                    return versions[key]
        self.folder(name)  # ModelNotFound for unknown names
        if version is not None and version not in self.versions(name):
            raise ModelNotFound(f"model '{name}' has no version {version}; versions: {self.versions(name)}")
        reason = self._failed.get((name, version or 0), "not loaded")
        raise ModelUnavailable(f"model '{name}'" + (f" version {version}" if version else "") + f" is not ready: {reason}")

    def loaded(self) -> dict[str, list[int]]:
        """{name: [versions loaded]}."""
        with self._lock:
            return {n: sorted(v) for n, v in self._loaded.items() if v}

    def status(self) -> list[VersionStatus]:
        """Every model version on disk with its state."""
        out = []
        for name in self.names():
            try:
                on_disk = self.versions(name)
            except ForwardpassError as exc:
                out.append(VersionStatus(name, 0, "UNAVAILABLE", str(exc)))
                continue
            with self._lock:
                loaded = self._loaded.get(name, {})
                for v in on_disk:
                    if v in loaded:
                        out.append(VersionStatus(name, v, "READY"))
                    elif (name, v) in self._failed:
                        out.append(VersionStatus(name, v, "UNAVAILABLE", self._failed[(name, v)]))
                    else:
                        out.append(VersionStatus(name, v, "UNLOADED"))
        return out

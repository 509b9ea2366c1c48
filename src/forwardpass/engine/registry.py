"""What the engine serves, in one place: model versions with their batchers, and language models.

    registry.served("iris")            # the newest served version, or the error that says why not
    registry.put("iris", {1: served})  # swap in new versions; returns the old ones to retire
    registry.index()                   # every version on disk with its state (the repository API)

The Repository reads the disk; the registry knows what is being served, what is loading, what was
unloaded on request and why a version failed. Nothing else keeps that state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from forwardpass.errors import ForwardpassError, ModelNotFound, ModelNotReady, ModelUnavailable, WrongEndpoint
from forwardpass.inference import RequestedOutput
from forwardpass.model import Model
from forwardpass.monitoring.drift import DriftMonitor
from forwardpass.monitoring.predictions import PredictionLog
from forwardpass.repository import Repository
from forwardpass.scheduler import DynamicBatcher
from forwardpass.stats import ModelStats
from forwardpass.tasks import generative

if TYPE_CHECKING:
    from forwardpass.engine.sequences import Sequences
    from forwardpass.generation.scheduler import GenerationScheduler


@dataclass
class Served:
    """A model version being served: the model, its batcher and its statistics."""

    model: Model
    batcher: DynamicBatcher
    stats: ModelStats
    batchable: bool
    cache_enabled: bool
    all_outputs: dict[bool, list[RequestedOutput]]  # what "no outputs listed" means, JSON and binary
    sequences: Sequences | None = None  # a stateful model's live sequences (engine/sequences.py)
    drift: DriftMonitor | None = None  # inputs and answers against the version's reference (monitoring/drift.py)
    log: PredictionLog | None = None  # sampled requests to Parquet (monitoring/predictions.py)


class Registry:
    """Served versions by name and version, language models by name, and the state between loads."""

    def __init__(self, repository: Repository):
        self.repository = repository
        self.ready = False  # the start-up load is done
        self.loading: set[str] = set()
        self.unloaded: set[str] = set()  # unloaded on request: hot reload leaves them alone
        self.failed: dict[tuple[str, int], str] = {}  # why a version did not load (0: the whole model)
        self._served: dict[str, dict[int, Served]] = {}
        self._generators: dict[str, GenerationScheduler] = {}

    # -- changes (the watcher makes them) ----------------------------------------------------------

    def put(self, name: str, fresh: dict[int, Served]) -> list[Served]:
        """Serve these versions of ``name`` from now on; returns the versions they replace."""
        old = self._served.get(name, {})
        self._served[name] = fresh
        self._clear_failures(name)
        return list(old.values())

    def put_generator(self, name: str, scheduler: GenerationScheduler) -> GenerationScheduler | None:
        """Serve a language model; returns the scheduler it replaces."""
        old = self._generators.get(name)
        self._generators[name] = scheduler
        self._clear_failures(name)
        return old

    def pop(self, name: str) -> tuple[list[Served], GenerationScheduler | None]:
        """Stop serving ``name``; returns what it was served by, to retire."""
        return list(self._served.pop(name, {}).values()), self._generators.pop(name, None)

    def fail(self, name: str, version: int, reason: str) -> None:
        self.failed[(name, version)] = reason

    def _clear_failures(self, name: str) -> None:
        for key in [k for k in self.failed if k[0] == name]:
            del self.failed[key]

    # -- lookups -----------------------------------------------------------------------------------

    def served(self, name: str, version: int | None = None) -> Served:
        """The served version (newest when None); otherwise ModelNotFound (no such model or version),
        WrongEndpoint (a language model), ModelNotReady (loading: retry) or ModelUnavailable (unloaded, failed)."""
        versions = self._served.get(name)
        if versions:
            key = max(versions) if version is None else version
            served = versions.get(key)
            if served is not None:
                return served
        if name in self._generators:
            raise language_model_elsewhere(name)
        self.repository.folder(name)  # InvalidModelName / ModelNotFound for unknown names
        if version is not None and version not in self.repository.versions(name):
            raise ModelNotFound(f"model '{name}' has no version {version}")
        which = f"model '{name}'" + (f" version {version}" if version else "")
        if not self.ready or name in self.loading:
            raise ModelNotReady(f"{which} is loading; retry in a moment", retry_after=1.0)
        if self.generative(name):
            raise language_model_elsewhere(name)
        raise ModelUnavailable(f"{which} is not loaded: {self._why_not_loaded(name, version)}")

    def generator(self, name: str) -> GenerationScheduler:
        """The scheduler of a served language model; ModelNotFound / ModelNotReady / ModelUnavailable otherwise."""
        found = self._generators.get(name)
        if found is not None:
            return found
        self.repository.folder(name)  # InvalidModelName / ModelNotFound for unknown names
        config = self.repository.config(name)
        if not generative(config):
            raise ModelNotFound(f"model '{name}' is not a language model (task {config.task}); use /v2/models/{name}/infer")
        if not self.ready or name in self.loading:
            raise ModelNotReady(f"model '{name}' is loading; retry in a moment", retry_after=1.0)
        raise ModelUnavailable(f"model '{name}' is not loaded: {self._why_not_loaded(name, None)}")

    def generators(self) -> dict[str, GenerationScheduler]:
        """Served language models by name."""
        return dict(self._generators)

    def names(self) -> list[str]:
        """Models with at least one version served (language models are in generators())."""
        return sorted(n for n, v in self._served.items() if v)

    def versions(self, name: str) -> list[int]:
        """Versions of a model being served."""
        return sorted(self._served.get(name, {}))

    def serving(self) -> set[str]:
        """Every name served, by either kind."""
        return set(self._served) | set(self._generators)

    def all_served(self) -> list[Served]:
        return [s for versions in self._served.values() for s in versions.values()]

    def generative(self, name: str) -> bool:
        """Whether the model's folder says it is a language model (False when model.yaml does not read)."""
        try:
            return generative(self.repository.config(name))
        except ForwardpassError:
            return False

    def index(self) -> list[dict[str, Any]]:
        """Every model version on disk with its state (the repository extension's index)."""
        out: list[dict[str, Any]] = []
        for name in self.repository.names():
            try:
                on_disk = self.repository.versions(name)
            except ForwardpassError as exc:
                out.append({"name": name, "version": "0", "state": "UNAVAILABLE", "reason": self.redact(str(exc))})
                continue
            serving = set(self._served.get(name, {}))
            if name in self._generators:
                serving.add(self._generators[name].model.version)
            for v in on_disk:
                reason = self.failed.get((name, v)) or (self.failed.get((name, 0)) if v not in serving else None)
                entry: dict[str, Any] = {"name": name, "version": str(v)}
                if v in serving:
                    entry["state"] = "READY"
                    monitor = self._served.get(name, {}).get(v)
                    drift = monitor.drift if monitor is not None else None
                    if drift is not None and drift.status in ("drifting", "moderate"):  # as the profiler last judged
                        entry["reason"] = (f"{drift.status}: its recent inputs or answers differ from its "
                                           f"reference (max PSI {drift.max_psi}); see "
                                           f"/v2/models/{name}/versions/{v}/drift")  # fmt: skip
                elif reason:
                    entry.update(state="UNAVAILABLE", reason=self.redact(reason))
                else:
                    entry["state"] = "UNLOADED"
                out.append(entry)
        return out

    def _why_not_loaded(self, name: str, version: int | None) -> str:
        if name in self.unloaded:
            return f"it was unloaded; load it with POST /v2/repository/models/{name}/load"
        reasons = [r for (n, v), r in sorted(self.failed.items()) if n == name and (version is None or v in (version, 0))]
        return ("it failed to load: " + self.redact(reasons[-1])) if reasons else "it is not loaded"

    def redact(self, message: str) -> str:
        """A message without the repository's absolute path (clients need not know the server's folders)."""
        root = str(self.repository.path.resolve())
        return message.replace(root + "/", "").replace(root, "<repository>")


def language_model_elsewhere(name: str) -> WrongEndpoint:
    return WrongEndpoint(f"model '{name}' is a language model: use the OpenAI-compatible API (POST /v1/chat/completions "
                         "or /v1/completions), not V2 infer or :predict")  # fmt: skip

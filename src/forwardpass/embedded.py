"""The engine in this process, driven synchronously: what the CLI (and scripts) use instead of a server.

    with Embedded(Repository("models"), load=["iris"]) as engine:
        answers = engine.predict("iris", [{"sepal length (cm)": 5.1, ...}])
    with Embedded(repository, load=["smollm2"]) as engine:
        for item in engine.stream("smollm2", parse_generation({"prompt": "Hi"}, chat=False)):
            print(item)   # text pieces, then the Generation

Requests take the same path as over HTTP (Engine.predict / Engine.stream: the same checks, the same
errors); only the transport is missing. The event loop is private to this object.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence
from typing import Any

from forwardpass.engine import Engine, GenerationRequest
from forwardpass.model import Model
from forwardpass.repository import Repository


class Embedded:
    """An Engine with its own event loop; ``load`` names the models to serve (``serve`` adds loaded ones)."""

    def __init__(self, repository: Repository, *, load: Sequence[str] = ()):
        self._loop = asyncio.new_event_loop()
        self.engine = Engine(repository, model_control="explicit", load_models=list(load), poll_interval=0)

    def __enter__(self) -> Embedded:
        self._loop.run_until_complete(self.engine.start())
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self._loop.run_until_complete(self.engine.stop())
        finally:
            self._loop.close()

    def serve(self, model: Model) -> None:
        """Serve a Model loaded elsewhere (a version the policy does not select, say) under its name."""
        self.engine.serve_model(model)

    def predict(self, name: str, instances: list[Any], *, version: int | None = None,
                top_k: int | None = None) -> Any:  # fmt: skip
        """Engine.predict: JSON-ready answers, one per instance."""
        _, answers = self._loop.run_until_complete(self.engine.predict(name, version, instances, top_k))
        return answers

    def stream(self, name: str, request: GenerationRequest) -> Iterator[Any]:
        """Engine.stream: text pieces as they are sampled, then the Generation."""
        items = self.engine.stream(name, request)
        try:
            while True:
                try:
                    yield self._loop.run_until_complete(items.__anext__())
                except StopAsyncIteration:
                    return
        finally:
            self._loop.run_until_complete(items.aclose())  # leaving early cancels the request: its slot frees

"""The engine's answers about models it does not serve: loading (retry), unloaded or unknown (do not)."""

from __future__ import annotations

import asyncio
import shutil

import pytest

from forwardpass.engine import Engine
from forwardpass.errors import ModelNotFound, ModelNotReady, ModelUnavailable
from forwardpass.repository import Repository
from forwardpass.server.errors import error_response


def test_loading_is_a_503_with_retry_after_and_unloaded_a_404_without(demo_repo, tmp_path):
    shutil.copytree(demo_repo / "digits", tmp_path / "digits")

    async def main() -> None:
        engine = Engine(Repository(tmp_path), poll_interval=0, model_control="explicit")
        await engine.start()
        loading = asyncio.create_task(engine.load("digits"))
        await asyncio.sleep(0)  # the load runs up to its first wait: reading the model on a thread
        with pytest.raises(ModelNotReady) as busy:
            engine.served("digits")
        answer = error_response(busy.value)
        assert answer.status == 503 and (b"retry-after", b"1") in answer.headers
        await loading
        assert engine.served("digits").model.name == "digits"
        await engine.unload("digits")
        with pytest.raises(ModelUnavailable, match="unloaded") as gone:
            engine.served("digits")
        answer = error_response(gone.value)
        assert answer.status == 404 and not any(name == b"retry-after" for name, _ in answer.headers)
        with pytest.raises(ModelNotFound, match="Request for unknown model: 'nope' is not found"):
            engine.served("nope")
        await engine.stop()

    asyncio.run(main())


def test_a_load_that_failed_for_a_passing_cause_is_retried_by_hot_reload_and_a_broken_folder_is_not(tmp_path):
    """A remote that was down at load (ModelLoadError with retry_after) is tried again on later polls,
    backing off; a load that failed for good waits for the folder to change."""
    from forwardpass import runtime
    from forwardpass.errors import ModelLoadError
    from forwardpass.runtime.base import TensorInfo

    calls = {"flaky": 0, "broken": 0}
    up = {"flaky": False}

    class Echo:
        inputs = [TensorInfo("x", "FP32", (-1, 2))]
        outputs = [TensorInfo("y", "FP32", (-1, 2))]
        guarded, probe_ms, threads = frozenset(), None, 1

        def run(self, feeds, names=None):
            return [feeds["x"]]

        def prepare(self, names=None):
            return self.run

        def close(self):
            pass

    def factory(kind):
        def make(config, folder, version):
            calls[kind] += 1
            if kind == "flaky" and up["flaky"]:
                return Echo()
            error = ModelLoadError(f"{kind}: the remote is down")
            error.retry_after = 1.0 if kind == "flaky" else None
            raise error
        return make

    for kind in calls:
        runtime.register(f"test-{kind}", factory(kind))
        (tmp_path / kind / "1").mkdir(parents=True)
        (tmp_path / kind / "model.yaml").write_text(f"task: custom\nruntime: test-{kind}\n")

    async def main() -> None:
        engine = Engine(Repository(tmp_path), poll_interval=0)  # no poller: the test polls by hand, no back-off
        await engine.start()
        await engine.poll_once()  # the first poll tries both again: they were never seen loaded
        assert calls == {"flaky": 2, "broken": 2}
        await engine.poll_once()
        assert calls == {"flaky": 3, "broken": 2}  # the broken folder is left until it changes
        up["flaky"] = True
        await engine.poll_once()
        assert engine.served("flaky").model.name == "flaky" and calls["flaky"] == 4
        await engine.poll_once()
        assert calls == {"flaky": 4, "broken": 2}  # served now: no more tries
        await engine.stop()

    try:
        asyncio.run(main())
    finally:
        for kind in calls:
            runtime.unregister(f"test-{kind}")

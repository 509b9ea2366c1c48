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

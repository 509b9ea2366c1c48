"""The engine: every entrypoint (V2, :predict, OpenAI, CLI, batch, streaming) reaches models through it.

    engine = Engine(Repository("models"))
    await engine.start()                                   # load, warm up, start hot reload
    served, outputs = await engine.infer("digits", None, request)  # a parsed V2 request
    served, answers = await engine.predict("iris", None, [{"sepal length (cm)": 5.1, ...}])
    request = parse_generation({"prompt": "Hi", "max_tokens": 8}, chat=False)
    async for item in engine.stream("smollm2", request): ...      # text pieces, then the Generation
    await engine.stop()                                    # drain queues

Three parts, one job each:

- ``registry.Registry``: what is served (versions with their batchers, language models), and why not;
- ``watcher.Watcher``: model control (start-up load, hot reload, explicit load/unload, retiring);
- ``plane.DataPlane``: requests in, answers out (pre-processing plans, response cache, batchers, stats).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncGenerator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from forwardpass import _memory
from forwardpass.engine.plane import DataPlane
from forwardpass.engine.registry import Registry, Served
from forwardpass.engine.requests import GenerationRequest, characters, max_characters, parse_generation
from forwardpass.engine.watcher import CONTROL_MODES, Watcher
from forwardpass.errors import InvalidInput
from forwardpass.inference import InferRequest, OutputTensor
from forwardpass.model import Model
from forwardpass.monitoring import default_state_dir
from forwardpass.monitoring.predictions import WRITER, Quality
from forwardpass.repository import Repository
from forwardpass.runtime.onnx import available_cores
from forwardpass.scheduler import ResponseCache
from forwardpass.scheduler.dynamic import BatcherClosed
from forwardpass.stats import Stats

if TYPE_CHECKING:
    from forwardpass.generation.scheduler import AsyncGeneration, GenerationScheduler
    from forwardpass.generation.sequence import Sequence as TokenSequence

# prompts up to this many characters are templated and tokenized on the event loop (~0.4 ms), longer ones
# on a worker thread (tokenizing costs ~0.8 us per character)
INLINE_PROMPT_CHARACTERS = 500


class Engine:
    """Serves a repository: the registry of what is served, its watcher, and the data plane.

    ``model_control`` (``poll``, ``explicit``, ``none``), ``poll_interval`` and ``load_models`` configure the
    watcher (see engine/watcher.py); ``drain_timeout`` bounds how long a replaced version may finish its
    queue; ``pending`` counts the requests the HTTP layer holds (its own protocol knows; see DataPlane).
    """

    def __init__(self, repository: Repository, *, cache_bytes: int = 64 * 2**20, poll_interval: float = 2.0,
                 stats: Stats | None = None, model_control: str = "poll", load_models: Sequence[str] = (),
                 drain_timeout: float = 30.0, pending: Callable[[], int] | None = None,
                 state_dir: Path | None = None):  # fmt: skip
        _memory.tune()
        self.repository = repository
        self.stats = stats or Stats()
        self.cache = ResponseCache(cache_bytes)
        self._executor = ThreadPoolExecutor(max_workers=max(2, available_cores()), thread_name_prefix="forwardpass")
        self.registry = Registry(repository)
        self.plane = DataPlane(self.stats, self._executor, self.cache, pending, state_dir)
        state = state_dir or default_state_dir()
        self.quality = Quality(state / "quality.sqlite", state / "predictions")  # labels that arrive later
        self.watcher = Watcher(repository, self.registry, self.plane.serve, stats=self.stats, executor=self._executor,
                               model_control=model_control, poll_interval=poll_interval, load_models=load_models,
                               drain_timeout=drain_timeout)  # fmt: skip

    # -- lifecycle ---------------------------------------------------------------------------------

    async def start(self) -> None:
        """Load the models the control mode says (failures are logged and reported by index()), then turn ready."""
        await self.watcher.start()

    async def stop(self, timeout: float = 30.0) -> None:
        """Stop hot reload, finish queued requests, release threads."""
        self.registry.ready = False
        await self.watcher.stop(timeout)
        await asyncio.to_thread(WRITER.flush)  # the prediction log's waiting rows, to their files
        self.quality.close()
        self._executor.shutdown(wait=False)

    def count_pending(self, pending: Callable[[], int]) -> None:
        """How many requests the HTTP layer holds (call before start(): batchers are built with it)."""
        self.plane.count_pending(pending)

    @property
    def ready(self) -> bool:
        return self.registry.ready

    @property
    def model_control(self) -> str:
        return self.watcher.model_control

    # -- what is served ----------------------------------------------------------------------------

    def served(self, name: str, version: int | None = None) -> Served:
        """The served version (newest when None), or the error that says why not (see Registry.served)."""
        return self.registry.served(name, version)

    def names(self) -> list[str]:
        return self.registry.names()

    def versions(self, name: str) -> list[int]:
        return self.registry.versions(name)

    def index(self) -> list[dict[str, Any]]:
        return self.registry.index()

    def generator(self, name: str) -> GenerationScheduler:
        return self.registry.generator(name)

    def generators(self) -> dict[str, GenerationScheduler]:
        return self.registry.generators()

    # -- model control -----------------------------------------------------------------------------

    async def load(self, name: str) -> list[int]:
        return await self.watcher.load(name)

    async def unload(self, name: str) -> None:
        await self.watcher.unload(name)

    async def poll_once(self) -> None:
        await self.watcher.poll_once()

    def serve_model(self, model: Model) -> Served:
        """Serve a Model loaded elsewhere (the CLI's --version, embedding) beside the versions served under its name."""
        served = self.plane.serve(model)
        fresh = {**{s.model.version: s for s in self.registry.all_served() if s.model.name == model.name},
                 model.version: served}  # fmt: skip
        self.watcher.retire([old for old in self.registry.put(model.name, fresh) if old not in fresh.values()])
        return served

    # -- the data plane ----------------------------------------------------------------------------

    async def infer(self, name: str, version: int | None, request: InferRequest,
                    served: Served | None = None) -> tuple[Served, list[OutputTensor]]:  # fmt: skip
        """A V2 inference: tensors (or BYTES into pre-processing) in, the requested outputs out.

        ``served`` is the version the caller resolved before reading the body; if it is replaced
        meanwhile and no version was asked for, the request moves to the new one.
        """
        served = served or self.served(name, version)
        try:
            return await self.plane.infer(served, request)
        except BatcherClosed:
            if version is not None:
                raise
            return await self.plane.infer(self.served(name), request)

    async def predict(self, name: str, version: int | None, instances: list[Any], top_k: int | None = None,
                      request_id: str | None = None, caller: str | None = None) -> tuple[Served, Any]:  # fmt: skip
        """Instances in, answers out: pre-processing, the model, post-processing (the human endpoint, CLI, batch).
        ``request_id`` and ``caller`` name the request in the prediction log, when the model keeps one."""
        try:
            return await self.plane.predict(self.served(name, version), instances, top_k, request_id, caller)
        except BatcherClosed:
            if version is not None:
                raise
            return await self.plane.predict(self.served(name), instances, top_k, request_id, caller)

    async def prepare_generation(self, name: str, request: GenerationRequest) -> tuple[Any, TokenSequence]:
        """A checked generation request (requests.parse_generation) against the model: the prompt's length
        bound first (cheap), then templating and tokenizing, on a worker thread for long prompts."""
        llm = self.generator(name).model
        chars, limit = characters(request), max_characters(llm)
        if chars > limit:  # before the template and the tokenizer, whose cost grows with the prompt
            raise InvalidInput(("messages" if "messages" in request.prepare else "prompt",),
                               f"the prompt is {chars} characters; the context holds {llm.gen.context_length} "
                               f"tokens, at most {limit} characters even at this tokenizer's longest token: "
                               "shorten the prompt")  # fmt: skip
        prepare = functools.partial(llm.prepare, **request.prepare)
        if chars <= INLINE_PROMPT_CHARACTERS and request.prepare.get("grammar") is None:  # compiling one takes ms
            return llm, prepare()
        return llm, await asyncio.get_running_loop().run_in_executor(self._executor, prepare)

    def generate(self, name: str, seq: TokenSequence, parent: AsyncGeneration | None = None) -> AsyncGeneration:
        """Submit a prepared sequence to the model's continuous-batching scheduler: an async stream of text
        pieces ending with the Generation (Overloaded, 503, when its queue is full). ``parent``: the first
        choice of the same request (``seq`` is its ``fork``), whose prompt KV this one copies."""
        from forwardpass.generation.scheduler import AsyncGeneration

        return AsyncGeneration(self.generator(name), seq, parent)

    async def embed(self, name: str, inputs: Sequence[str | list[int]]) -> list[tuple[Any, int]]:
        """A language model's own embeddings (llama-server's ``--pooling mean``): each input's final hidden
        states averaged over its tokens and L2-normalized, with its token count. Each input is read by the
        model's scheduler as a prompt with nothing generated, between the decode steps of running streams."""
        import numpy as np

        from forwardpass.generation.sampler import SamplingParams
        from forwardpass.generation.scheduler import AsyncGeneration
        from forwardpass.generation.sequence import Sequence as TokenSequence

        scheduler = self.generator(name)
        llm = scheduler.model
        if not scheduler.session.pools:
            raise InvalidInput(("model",), f"model '{name}' was imported without its hidden-state output: import its "
                               "GGUF again (forwardpass import gguf) to serve embeddings from it", name)  # fmt: skip

        def encode() -> list[list[int]]:
            return [llm.encode(item) if isinstance(item, str) else list(item) for item in inputs]

        chars = sum(len(item) for item in inputs if isinstance(item, str))
        ids = encode() if chars <= INLINE_PROMPT_CHARACTERS else await asyncio.get_running_loop().run_in_executor(
            self._executor, encode)  # fmt: skip
        for i, tokens in enumerate(ids):
            if not tokens or len(tokens) > llm.gen.context_length:
                raise InvalidInput(("input", i), f"expected 1 to {llm.gen.context_length} tokens (the model's "
                                   "context)", f"{len(tokens)} tokens")  # fmt: skip
        results = []
        for start in range(0, len(ids), scheduler.slots):  # a slot's worth at a time: the queue stays for others
            generations = []
            for tokens in ids[start : start + scheduler.slots]:
                seq = TokenSequence(tokens, limit=1, stop=(), params=SamplingParams(), logprobs=0, stop_ids=(),
                                    tokenizer=llm.tokenizer)  # fmt: skip
                seq.pooling = True
                generations.append(AsyncGeneration(scheduler, seq))
            try:
                results += await asyncio.gather(*(g.result() for g in generations))
            except BaseException:
                for g in generations:
                    g.cancel()
                raise
        out = []
        for result in results:
            vector = np.asarray(result.embedding, np.float32)
            out.append((vector / max(float(np.linalg.norm(vector)), 1e-12), result.prompt_tokens))
        return out

    async def stream(self, name: str, request: GenerationRequest) -> AsyncGenerator[Any, None]:
        """prepare_generation + generate as one async stream (text pieces, then the Generation): one choice."""
        if request.n != 1:
            raise InvalidInput(("n",), "this entrypoint gives one choice per request: leave n out, or ask the "
                               "OpenAI-compatible API for n choices", request.n)  # fmt: skip
        _, seq = await self.prepare_generation(name, request)
        async for item in self.generate(name, seq):
            yield item


__all__ = ["CONTROL_MODES", "DataPlane", "Engine", "GenerationRequest", "Registry", "Served", "Watcher", "parse_generation"]

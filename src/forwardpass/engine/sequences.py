"""Stateful models: each sequence's state kept between requests, fed back step by step, freed when it ends.

    sequences = Sequences(model, model.config.sequence)
    async with sequences.step(Step(id=7, start=True, end=False)) as step:
        feeds = {**request_feeds, **step.feeds}        # state and control inputs, one row, batch first
        outputs = await run(feeds)                      # batched with other sequences' steps
        events = step.done(outputs)                     # the next state kept (or freed, at the end)

Triton's sequence batcher semantics: ``start`` (re)starts a sequence with the initial state, later
requests must name a live sequence, ``end`` frees it after its step, a sequence unused for
``idle_timeout_s`` is freed, and at most ``max_sequences`` live at once. Steps of one sequence run one at
a time, in order (a per-sequence lock); steps of different sequences batch together.

Events: with ``events: {kind: speech}`` each sequence also keeps a SpeechDetector (streaming/speech.py) fed
one probability per step; ``done`` returns the events that step completed (at the end, the closing one),
which the data plane answers as the BYTES output ``events.name``.

Layout: the dynamic batcher stacks requests along axis 0, so every tensor here is batch first. A state
whose batch axis is elsewhere (silero-vad's [2, batch, 128]) is moved there and back by ``to_model`` and
``from_model``, which the data plane wraps around the forward pass, together with the constant inputs.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from forwardpass.config import SequenceConfig
from forwardpass.errors import InvalidInput, ModelLoadError, Overloaded
from forwardpass.streaming.speech import Event, SpeechDetector
from forwardpass.tensors import to_numpy

Outputs = dict[str, np.ndarray]


@dataclass(frozen=True)
class StreamId:
    """The sequence of one WebSocket connection: a key no request can name (V2 ids are JSON integers or
    strings), so a client's sequence_id never lands on a stream's state; ``int()`` is its CORRID value."""

    number: int

    def __int__(self) -> int:
        return (1 << 30) + self.number  # within INT32, for a model that takes CORRID as INT32

    def __repr__(self) -> str:
        return f"stream {self.number}"


SequenceId = int | str | StreamId


@dataclass(frozen=True)
class Step:
    """What a request says of its sequence (V2 parameters sequence_id, sequence_start, sequence_end)."""

    id: SequenceId
    start: bool = False
    end: bool = False

    @classmethod
    def from_parameters(cls, parameters: dict[str, Any]) -> Step | None:
        """The request's sequence, or None when it names none; InvalidInput for malformed parameters."""
        sid = parameters.get("sequence_id")
        if sid is None or (sid == 0 and not isinstance(sid, bool)):  # Triton's 0: no sequence
            return None
        if isinstance(sid, bool) or not isinstance(sid, (int, str, StreamId)) or sid == "":
            raise InvalidInput(("parameters", "sequence_id"), "expected a non-zero integer or a non-empty string",
                               sid)  # fmt: skip
        flags = []
        for key in ("sequence_start", "sequence_end"):
            value = parameters.get(key, False)
            if not isinstance(value, bool):
                raise InvalidInput(("parameters", key), "expected true or false", value)
            flags.append(value)
        return cls(sid, *flags)


@dataclass
class _Live:
    state: dict[str, np.ndarray]  # input name -> one row, batch first
    used: float
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    detector: SpeechDetector | None = None  # with sequence.events: this sequence's events so far


class StepContext:
    """One request's step of its sequence: the inputs the server fills, and ``done(outputs)`` to keep the result."""

    def __init__(self, sequences: Sequences, step: Step, live: _Live, feeds: dict[str, np.ndarray]):
        self._sequences, self._step, self._live, self.feeds = sequences, step, live, feeds
        self.finished = False

    def done(self, outputs: Outputs) -> list[Event]:
        """Keep the next state from this step's outputs (batch first), or free the sequence at its end; the
        events this step completed (none unless model.yaml declares sequence.events)."""
        self.finished = True
        return self._sequences._after(self._step, self._live, outputs)


class Sequences:
    """The live sequences of one served model version."""

    def __init__(self, model: Any, config: SequenceConfig, clock: Callable[[], float] = time.monotonic):
        self.config, self.name, self._clock = config, model.name, clock
        inputs = {s.name: s for s in model.inputs}
        outputs = {s.name: s for s in model.outputs}
        where = f"{model.folder / 'model.yaml'}: sequence"
        for i, st in enumerate(config.state):
            if st.input not in inputs or st.output not in outputs:
                raise ModelLoadError(f"{where}.state[{i}]: the model has no input '{st.input}' or no output "
                                     f"'{st.output}'; inputs {list(inputs)}, outputs {list(outputs)}")  # fmt: skip
            shape = inputs[st.input].shape
            if st.batch_axis >= len(shape) or any(d < 0 for j, d in enumerate(shape) if j != st.batch_axis):
                raise ModelLoadError(f"{where}.state[{i}]: '{st.input}' has shape {shape}: every dimension but "
                                     f"batch_axis {st.batch_axis} must be fixed")  # fmt: skip
        for i, c in enumerate(config.control):
            if c.input not in inputs:
                raise ModelLoadError(f"{where}.control[{i}]: the model has no input '{c.input}'; inputs {list(inputs)}")
        for name in config.constants:
            if name not in inputs:
                raise ModelLoadError(f"{where}.constants: the model has no input '{name}'; inputs {list(inputs)}")
        ev = config.events
        if ev is not None and (ev.output not in outputs or ev.output in {s.output for s in config.state}):
            raise ModelLoadError(f"{where}.events.output: '{ev.output}' is not an answered output of the model; "
                                 f"outputs {list(outputs)}")  # fmt: skip
        if ev is not None and ev.name in outputs:
            raise ModelLoadError(f"{where}.events.name: '{ev.name}' is already a model output: name the events "
                                 "output otherwise")  # fmt: skip
        self._inputs = inputs
        # one sequence's initial state, batch first: [1, other dims...]
        self._initial = {}
        for st in config.state:
            spec = inputs[st.input]
            dims = [d for j, d in enumerate(spec.shape) if j != st.batch_axis]
            self._initial[st.input] = np.full([1, *dims], st.initial, dtype=to_numpy(spec.datatype))
        self._constants = {n: np.asarray(v, dtype=to_numpy(inputs[n].datatype)).reshape(inputs[n].shape)
                           for n, v in config.constants.items()}  # fmt: skip
        self._state_of = {st.output: st for st in config.state}
        self._live: OrderedDict[SequenceId, _Live] = OrderedDict()  # least recently used first

    # -- what the server fills ------------------------------------------------------------------------

    @property
    def filled(self) -> frozenset[str]:
        """Inputs the server feeds (states, controls, constants): a request does not send them."""
        return frozenset([*(s.input for s in self.config.state), *(c.input for c in self.config.control),
                          *self.config.constants])  # fmt: skip

    @property
    def state_outputs(self) -> frozenset[str]:
        """Outputs that are next states: kept here, not answered."""
        return frozenset(s.output for s in self.config.state)

    @property
    def live(self) -> int:
        """Sequences with a state kept now (after freeing the idle ones)."""
        self._expire()
        return len(self._live)

    # -- a step ---------------------------------------------------------------------------------------

    @asynccontextmanager
    async def step(self, step: Step) -> AsyncIterator[StepContext]:
        """The step's context; steps of one sequence run one at a time, in the order they arrived."""
        live = self._begin(step)
        async with live.lock:
            if step.id not in self._live and not step.start:  # ended or idled out while this step waited
                raise self._unknown(step.id)
            if step.start:
                live.state = {k: v.copy() for k, v in self._initial.items()}
                live.detector = self._detector()
            context = StepContext(self, step, live, {**live.state, **self._controls(step)})
            yield context
            live.used = self._clock()

    def free(self, sid: SequenceId) -> bool:
        """Forget a sequence (its client went away); False when it was not live."""
        return self._live.pop(sid, None) is not None

    def _begin(self, step: Step) -> _Live:
        self._expire()
        live = self._live.get(step.id)
        if live is None:
            if not step.start:
                raise self._unknown(step.id)
            if len(self._live) >= self.config.max_sequences:
                raise Overloaded(f"model '{self.name}' holds {len(self._live)} live sequences, its limit "
                                 "(sequence.max_sequences in model.yaml): end one (sequence_end: true) or wait "
                                 f"for an idle one to be freed after {self.config.idle_timeout_s:g} s",
                                 retry_after=1.0)  # fmt: skip
            live = self._live[step.id] = _Live(dict(self._initial), self._clock())
        self._live.move_to_end(step.id)
        live.used = self._clock()
        return live

    def _after(self, step: Step, live: _Live, outputs: Outputs) -> list[Event]:
        events = []
        if live.detector is not None and self.config.events is not None:
            events = live.detector.push(float(outputs[self.config.events.output].reshape(-1)[0]))
            if step.end:
                events += live.detector.finish()
        if step.end:
            if self._live.get(step.id) is live:
                del self._live[step.id]
            return events
        for name, st in self._state_of.items():
            live.state[st.input] = outputs[name]
        return events

    def _detector(self) -> SpeechDetector | None:
        ev = self.config.events
        if ev is None:
            return None
        return SpeechDetector(ev.threshold, ev.min_silence_ms, ev.min_speech_ms, ev.speech_pad_ms, ev.window, ev.rate)

    def _controls(self, step: Step) -> dict[str, np.ndarray]:
        values = {"start": int(step.start), "end": int(step.end), "ready": 1}
        out = {}
        for c in self.config.control:
            spec = self._inputs[c.input]
            dtype = to_numpy(spec.datatype)
            if c.kind == "corrid":
                if isinstance(step.id, str) or np.dtype(dtype).kind not in "iu":
                    raise InvalidInput(("parameters", "sequence_id"), f"model '{self.name}' takes the sequence id "
                                       f"as {spec.datatype} input '{c.input}': send an integer id", step.id)  # fmt: skip
                value: int = int(step.id)
            else:
                value = values[c.kind]
            out[c.input] = np.full([1, *spec.shape[1:]], value, dtype=dtype)
        return out

    def _expire(self) -> None:
        limit = self._clock() - self.config.idle_timeout_s
        while self._live:
            sid, live = next(iter(self._live.items()))
            if live.used > limit or live.lock.locked():
                break
            del self._live[sid]

    def _unknown(self, sid: SequenceId) -> InvalidInput:
        return InvalidInput(("parameters", "sequence_id"), f"model '{self.name}' has no live sequence {sid!r}: it was "
                            "never started, it ended, or it was freed after "
                            f"{self.config.idle_timeout_s:g} s unused; start it with sequence_start: true")  # fmt: skip

    # -- around the forward pass (batch first outside, the model's layout inside) -----------------------

    def to_model(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """A batch of steps (batch first) -> the model's feeds: states on their batch axis, constants added."""
        out = dict(feeds)
        for st in self.config.state:
            if st.batch_axis:
                out[st.input] = np.moveaxis(feeds[st.input], 0, st.batch_axis)
        out.update(self._constants)
        return out

    def from_model(self, outputs: Outputs) -> Outputs:
        """The model's outputs -> batch first (next states moved off their batch axis)."""
        for name, st in self._state_of.items():
            if st.batch_axis and name in outputs:
                outputs[name] = np.moveaxis(outputs[name], st.batch_axis, 0)
        return outputs

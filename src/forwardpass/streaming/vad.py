"""Voice activity over an audio file or a live stream: speech start/end events from a VAD model, by the engine.

    for segment in file_segments(Repository("models"), "silero-vad", Path("speech.wav")):
        print(segment.start, segment.end)              # seconds: Segment(start=1.02, end=2.31), ...

The model sees 512-sample windows at 16 kHz (32 ms, silero-vad's window); a file at another rate is
resampled chunk by chunk with ``StreamResampler``, as a live stream would be, and its last partial window
is padded with zeros (as silero's ``get_speech_timestamps``). The windows run through the engine as one
sequence: model.yaml ``sequence:`` keeps the recurrent state and the 64 samples of context between them, and
its ``events: {kind: speech}`` runs a SpeechDetector (streaming/speech.py: silero's hysteresis) over the
probabilities, answering each step's events as the ``events`` output. The WebSocket stream
(``/v2/models/{m}/stream``, one window per frame) and V2's sequence parameters reach the same data plane,
so they hear the same events.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import orjson

from forwardpass.engine import Engine
from forwardpass.errors import InvalidInput
from forwardpass.inference import InferRequest, InputTensor, RequestedOutput
from forwardpass.pipeline.audio import StreamResampler, decode, read_info
from forwardpass.repository import Repository
from forwardpass.streaming.speech import RATE, WINDOW, Event, Segment, SpeechDetector, segments


def windows(path: Path) -> tuple[list[np.ndarray], int]:
    """An audio file -> the model's inputs, one per 512-sample window at 16 kHz (the last one zero-padded), and
    the audio's length in 16 kHz samples. The file is resampled in 32 ms chunks through StreamResampler, as a
    live stream is."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InvalidInput(("input",), f"cannot read the audio file ({exc.strerror}); give a WAV, FLAC or OGG "
                           "file that exists", str(path)) from None  # fmt: skip
    info = read_info(data, ("input",))
    audio = decode(data, info, ("input",))
    resampler = StreamResampler(info.rate, RATE)
    step = max(1, round(info.rate * WINDOW / RATE))  # 32 ms at the file's rate
    pieces = [resampler.push(audio[i : i + step]) for i in range(0, len(audio), step)]
    resampled = np.concatenate([*pieces, resampler.flush()]) if pieces else np.zeros(0, np.float32)
    length = len(resampled)
    if length % WINDOW:
        resampled = np.concatenate([resampled, np.zeros(WINDOW - length % WINDOW, np.float32)])
    return [resampled[i : i + WINDOW] for i in range(0, len(resampled), WINDOW)], length


@dataclass
class Heard:
    """What a VAD model made of a stream: each window's speech probability, and the events it answered."""

    probabilities: list[float]
    events: list[Event]

    def segments(self, samples: int | None = None) -> list[Segment]:
        """The events paired into segments (ends clipped to the audio's ``samples`` at 16 kHz when given)."""
        limit = float("inf") if samples is None else samples / RATE
        starts, ends = self.events[0::2], self.events[1::2]
        return [Segment(s.time, min(e.time, limit)) for s, e in zip(starts, ends, strict=True)]


def events_of(value: bytes | str) -> Event:
    """One element of the ``events`` output ('{"event": "start", "time": 1.02}') -> Event."""
    item = orjson.loads(value)
    return Event(item["event"], float(item["time"]))


def _request(window: np.ndarray, sequence: str, first: bool, last: bool, outputs: tuple[str, str]) -> InferRequest:
    row = np.ascontiguousarray(window, dtype=np.float32).reshape(1, -1)
    return InferRequest(id=None, inputs=[InputTensor("input", "FP32", list(row.shape), row)],
                        outputs=[RequestedOutput(name, binary=False) for name in outputs],
                        parameters={"sequence_id": sequence, "sequence_start": first, "sequence_end": last})  # fmt: skip


async def stream(engine: Engine, model: str, chunks: Iterable[np.ndarray]) -> Heard:
    """Each window's speech probability and the speech events (``chunks``: 512-sample windows at 16 kHz, as
    ``windows`` makes them), run through ``engine`` as one sequence that ends with the last window."""
    items = list(chunks)
    sequences = engine.served(model).sequences
    if sequences is None or sequences.config.events is None:
        raise InvalidInput(("model",), f"model '{model}' is not a voice activity model (its model.yaml declares "
                           "no sequence.events of kind speech); give one such as the demo's silero-vad",
                           model)  # fmt: skip
    events = sequences.config.events
    wanted = (events.output, events.name)  # the probability and the events the engine detected from it
    sequence = f"vad-{uuid.uuid4().hex}"
    heard = Heard([], [])
    for i, window in enumerate(items):
        _, outputs = await engine.infer(model, None, _request(window, sequence, i == 0, i == len(items) - 1, wanted))
        heard.probabilities.append(float(outputs[0].array.reshape(-1)[0]))
        heard.events += [events_of(e) for e in outputs[1].array.reshape(-1).tolist()]
    return heard


def listen(repository: Repository, model: str, chunks: Iterable[np.ndarray]) -> Heard:
    """``stream`` on an engine of this process serving ``model`` (loaded, run, stopped)."""

    async def run() -> Heard:
        engine = Engine(repository, model_control="explicit", load_models=[model], poll_interval=0)
        await engine.start()
        try:
            return await stream(engine, model, chunks)
        finally:
            await engine.stop()

    return asyncio.run(run())


def file_segments(repository: Repository, model: str, path: Path) -> list[Segment]:
    """The speech segments a VAD model (the demo's silero-vad) finds in an audio file of any rate."""
    chunks, samples = windows(Path(path))
    return listen(repository, model, chunks).segments(samples)


__all__ = ["RATE", "WINDOW", "Event", "Heard", "Segment", "SpeechDetector", "events_of", "file_segments", "listen",
           "segments", "stream", "windows"]  # fmt: skip

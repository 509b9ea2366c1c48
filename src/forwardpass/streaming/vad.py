"""Voice activity over an audio file or a live stream: speech start/end events from a VAD model's probabilities.

    for segment in file_segments(Repository("models"), "silero-vad", Path("speech.wav")):
        print(segment.start, segment.end)              # seconds: Segment(start=1.02, end=2.31), ...

    detector = SpeechDetector()                         # a live stream: one probability per 32 ms window
    for p in probabilities_from_the_model:
        for event in detector.push(p):
            print(event.kind, event.time)               # "start" 1.02, then "end" 2.31
    detector.finish()                                   # the end of a segment still open when the stream stops

The model sees 512-sample windows at 16 kHz (32 ms, silero-vad's window), each after the 64 samples before
it (silero v5's context: 576 samples a step, as its own ONNX wrapper feeds them); a file at another rate is
resampled chunk by chunk with ``StreamResampler``, as a live stream would be, and its last partial window
is padded with zeros (as silero's ``get_speech_timestamps``). The windows run through the engine as one
sequence (model.yaml ``sequence:`` keeps the recurrent state between them), the same data plane that the
WebSocket stream (``/v2/models/{m}/stream``, one window per frame) and V2's sequence parameters reach.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from forwardpass.engine import Engine
from forwardpass.errors import InvalidInput
from forwardpass.inference import InferRequest, InputTensor, RequestedOutput
from forwardpass.pipeline.audio import StreamResampler, decode, read_info
from forwardpass.repository import Repository

RATE = 16_000  # the rate the model takes
WINDOW = 512  # samples per probability: 32 ms at 16 kHz
CONTEXT = 64  # silero v5 sees each window after the previous window's last 64 samples: 576 samples a step


@dataclass(frozen=True)
class Segment:
    """Speech from ``start`` to ``end``, in seconds from the start of the audio."""

    start: float
    end: float


@dataclass(frozen=True)
class Event:
    """Speech started or ended at ``time`` seconds (padding included)."""

    kind: Literal["start", "end"]
    time: float


class SpeechDetector:
    """Speech start/end events with hysteresis from one speech probability per window.

    Silero's own rules and defaults (its ``get_speech_timestamps`` and ``VADIterator``): speech starts at a
    window whose probability reaches ``threshold`` (0.5) and ends at the first window below
    ``threshold - 0.15`` once no window has reached ``threshold`` again for ``min_silence_ms`` (100 ms);
    segments of at most ``min_speech_ms`` (250 ms) are dropped; each segment is widened by ``speech_pad_ms``
    (30 ms) on both sides, within the audio and never over the previous segment's end.

    A start event comes once the segment is longer than ``min_speech_ms`` (so a dropped one is never
    announced), an end event ``min_silence_ms`` after the speech stopped.
    """

    def __init__(self, threshold: float = 0.5, min_silence_ms: float = 100, min_speech_ms: float = 250,
                 speech_pad_ms: float = 30, window: int = WINDOW, rate: int = RATE):  # fmt: skip
        self.threshold, self.negative = threshold, threshold - 0.15
        self._min_silence = int(rate * min_silence_ms / 1000)  # samples
        self._min_speech = int(rate * min_speech_ms / 1000)
        self._pad = int(rate * speech_pad_ms / 1000)
        self._window, self._rate = window, rate
        self._position = 0  # samples seen
        self._start: int | None = None  # the open segment's first sample, while speech goes on
        self._silent_from = 0  # the first sample of the silence that may end it (0: none yet)
        self._announced = False
        self._last_end = 0  # the previous segment's padded end

    def push(self, probability: float) -> list[Event]:
        """The next window's probability -> the events it completes (none, a start, an end, or both)."""
        here, self._position = self._position, self._position + self._window
        events: list[Event] = []
        if probability >= self.threshold:
            self._silent_from = 0
            if self._start is None:
                self._start, self._announced = here, False
        elif probability < self.negative and self._start is not None:
            if not self._silent_from:
                self._silent_from = here
            if here - self._silent_from >= self._min_silence:
                return self._close(self._silent_from)
        if self._start is not None and not self._announced:
            reached = self._silent_from or self._position  # the segment ends here or later
            if reached - self._start > self._min_speech:
                events.append(self._announce())
        return events

    def finish(self, samples: int | None = None) -> list[Event]:
        """The end of the stream (``samples`` long, default: the windows pushed): closes an open segment."""
        if self._start is None:
            return []
        return self._close(self._position if samples is None else samples, end_of_audio=True)

    def _announce(self) -> Event:
        assert self._start is not None
        self._announced = True
        return Event("start", max(self._start - self._pad, self._last_end, 0) / self._rate)

    def _close(self, end: int, end_of_audio: bool = False) -> list[Event]:
        assert self._start is not None
        events = []
        if end - self._start > self._min_speech:
            if not self._announced:
                events.append(self._announce())
            padded = end if end_of_audio else end + self._pad
            events.append(Event("end", padded / self._rate))
            self._last_end = padded
        self._start, self._silent_from = None, 0
        return events


def segments(probabilities: Iterable[float], samples: int | None = None,
             detector: SpeechDetector | None = None) -> list[Segment]:  # fmt: skip
    """The speech segments of a whole stream of window probabilities (``samples``: the audio's length at 16 kHz;
    ``detector``: a new one with silero's defaults unless given)."""
    detector = detector or SpeechDetector()
    events = [e for p in probabilities for e in detector.push(p)]
    events += detector.finish(samples)
    starts, ends = events[0::2], events[1::2]
    return [Segment(s.time, e.time) for s, e in zip(starts, ends, strict=True)]


def windows(path: Path) -> tuple[list[np.ndarray], int]:
    """An audio file -> the model's inputs, one per 512-sample window at 16 kHz (the last one zero-padded), and
    the audio's length in 16 kHz samples. The file is resampled in 32 ms chunks through StreamResampler, as a
    live stream is. Each input is 576 samples: the 64 before the window (its context), then the window."""
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
    # each window goes in after the 64 samples before it (zeros for the first), as silero's own wrapper feeds it
    joined = np.concatenate([np.zeros(CONTEXT, np.float32), resampled])
    return [joined[i : i + CONTEXT + WINDOW] for i in range(0, len(resampled), WINDOW)], length


def _request(window: np.ndarray, sequence: str, first: bool, last: bool) -> InferRequest:
    row = np.ascontiguousarray(window, dtype=np.float32).reshape(1, -1)
    return InferRequest(id=None, inputs=[InputTensor("input", "FP32", list(row.shape), row)],
                        outputs=[RequestedOutput("output", binary=False)],
                        parameters={"sequence_id": sequence, "sequence_start": first, "sequence_end": last})  # fmt: skip


async def stream_probabilities(engine: Engine, model: str, chunks: Iterable[np.ndarray]) -> list[float]:
    """Each window's speech probability (``chunks``: the model's inputs, as ``windows`` makes them), run
    through ``engine`` as one sequence."""
    items = list(chunks)
    if engine.served(model).sequences is None:
        raise InvalidInput(("model",), f"model '{model}' keeps no state between windows (its model.yaml has "
                           "no sequence: section); give a voice activity model such as the demo's silero-vad",
                           model)  # fmt: skip
    sequence = f"vad-{uuid.uuid4().hex}"
    out = []
    for i, window in enumerate(items):
        _, outputs = await engine.infer(model, None, _request(window, sequence, i == 0, i == len(items) - 1))
        out.append(float(outputs[0].array.reshape(-1)[0]))
    return out


def probabilities(repository: Repository, model: str, chunks: Iterable[np.ndarray]) -> list[float]:
    """stream_probabilities on an engine of this process serving ``model`` (loaded, run, stopped)."""

    async def run() -> list[float]:
        engine = Engine(repository, model_control="explicit", load_models=[model], poll_interval=0)
        await engine.start()
        try:
            return await stream_probabilities(engine, model, chunks)
        finally:
            await engine.stop()

    return asyncio.run(run())


def file_segments(repository: Repository, model: str, path: Path,
                  detector: SpeechDetector | None = None) -> list[Segment]:  # fmt: skip
    """The speech segments a VAD model (the demo's silero-vad) finds in an audio file of any rate."""
    chunks, samples = windows(Path(path))
    return segments(probabilities(repository, model, chunks), samples, detector)


__all__ = ["CONTEXT", "RATE", "WINDOW", "Event", "Segment", "SpeechDetector", "file_segments", "probabilities", "segments",
           "stream_probabilities", "windows"]  # fmt: skip

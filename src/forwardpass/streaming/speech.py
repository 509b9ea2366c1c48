"""Speech start/end events with hysteresis from one speech probability per window (silero's rules).

    detector = SpeechDetector()                         # one probability per 32 ms window
    for p in probabilities:
        for event in detector.push(p):
            print(event.kind, event.time)               # "start" 1.02, then "end" 2.31
    detector.finish()                                   # the end of a segment still open when the stream stops

Pure logic, no model: the engine keeps one detector per sequence of a model whose model.yaml declares
``sequence.events: {kind: speech}`` (engine/sequences.py) and answers its events step by step;
streaming/vad.py runs a file through that.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

RATE = 16_000  # the rate silero-vad takes
WINDOW = 512  # samples per probability: 32 ms at 16 kHz


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


__all__ = ["RATE", "WINDOW", "Event", "Segment", "SpeechDetector", "segments"]

"""``pre: {kind: audio, ...}``: audio files -> float32 mono at the model's rate, [N, samples] zero-padded.

    pre: {kind: audio, sample_rate: 16000, max_seconds: 30}

    pre = build_pre(config.pre, specs, folder)
    pre([wav_bytes, pathlib.Path("clip.flac")])        # {"audio": (2, longest clip's samples)}

Decoding (libsndfile: WAV, FLAC, OGG, ...) and resampling (soxr) are pipeline/audio.py; the
bounds are checked against each file's header before any sample is decoded.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import Field

from forwardpass.config import PreOptions
from forwardpass.errors import InvalidInput
from forwardpass.pipeline.audio import EXPECTED, AudioInfo, decode, read_info, resample
from forwardpass.pipeline.pre import BatchDefaults, Plan, Preprocessor, file_or_data, pick_input, raw_bytes, some
from forwardpass.tensors import to_numpy

if TYPE_CHECKING:
    from forwardpass.config import TensorSpec

# 1 s of 16 kHz WAV costs 0.16 ms to decode (0.25 ms resampled to 8 kHz), 0.1 ms of it opening the file twice:
# below this many samples the work costs less than a hop to a thread
INLINE_SAMPLES = 4000


class AudioPre(PreOptions):
    """Audio file bytes -> float32 mono at the model's sample rate, [N, samples] (padded with zeros)."""

    kind: Literal["audio"]
    input: str | None = None
    sample_rate: int = Field(16000, gt=0)
    # bounds read from the file's header, before any samples are decoded
    max_seconds: float = Field(60.0, gt=0)  # per clip
    max_bytes: int = Field(32 * 2**20, ge=1)  # per clip's sample data: 60 s of 48 kHz stereo float32 is 23 MB
    max_total_seconds: float = Field(600.0, gt=0)  # all the clips of one request together


class Audio(Preprocessor):
    """Audio file bytes (or base64) -> float32 mono at the model's rate, [N, samples] zero-padded to the longest."""

    schema = AudioPre
    takes_raw = True
    per_instance = True
    batch = BatchDefaults(batch_size=8, chunk_rows=64, ray_rows=32)

    def __init__(self, config: AudioPre, specs: Sequence[TensorSpec], folder: Path):
        super().__init__(config, specs, folder)
        spec = pick_input(specs, config.input, "audio", lambda s: s.datatype in ("FP32", "FP16"))
        self.config: AudioPre = config
        self.input, self.dtype = spec.name, to_numpy(spec.datatype)

    def is_single(self, data: Any) -> bool:
        return not isinstance(data, (list, tuple))

    def read_row(self, row: Mapping[str, Any]) -> Any:
        """``{"path": "clip.wav"}`` reads the file; else the row's ``data``."""
        return file_or_data(row)

    def plan(self, instances: Sequence[Any]) -> Plan:
        """Read each clip's header (no samples decoded) and check its length and size."""
        cfg = self.config
        some(instances)
        clips: list[tuple[bytes, AudioInfo]] = []
        total, cost = 0.0, 0
        for i, item in enumerate(instances):
            data = raw_bytes(i, item, f"audio file bytes ({EXPECTED}) or base64 text", "audio")
            header = read_info(data, ("instances", i))
            if header.size > cfg.max_bytes:
                raise InvalidInput(("instances", i), f"clip holds {header.size:,} bytes of samples, more than "
                                   f"pre.max_bytes ({cfg.max_bytes:,}); send a shorter clip, fewer channels or a "
                                   "lower rate, or raise pre.max_bytes in model.yaml")  # fmt: skip
            if header.seconds > cfg.max_seconds:
                raise InvalidInput(("instances", i), f"clip is {header.seconds:.1f} s, longer than "
                                   f"{cfg.max_seconds:g} s (pre.max_seconds); send a shorter clip, or raise "
                                   "pre.max_seconds in model.yaml")  # fmt: skip
            if header.frames == 0:
                raise InvalidInput(("instances", i), "expected audio samples, got an empty clip")
            total += header.seconds
            cost += header.frames * header.channels
            clips.append((bytes(data), header))
        if total > cfg.max_total_seconds:
            raise InvalidInput(("instances",), f"the {len(clips)} clips last {total:.1f} s together, longer than "
                               f"pre.max_total_seconds ({cfg.max_total_seconds:g} s); send fewer or shorter clips per "
                               "request, or raise pre.max_total_seconds in model.yaml", round(total, 1))  # fmt: skip
        return Plan(cost, "samples", cost > INLINE_SAMPLES, lambda: self._run(clips))

    def _run(self, clips: list[tuple[bytes, AudioInfo]]) -> dict[str, np.ndarray]:
        rate = self.config.sample_rate
        mono = [resample(decode(data, header, ("instances", i)), header.rate, rate)
                for i, (data, header) in enumerate(clips)]  # fmt: skip
        batch = np.zeros((len(mono), max(len(m) for m in mono)), dtype=self.dtype)
        for row, clip in zip(batch, mono):
            row[: len(clip)] = clip
        return {self.input: batch}

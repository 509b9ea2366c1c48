"""WAV decoding and resampling, without native dependencies.

``decode_wav(data)`` reads RIFF/WAVE PCM (8/16/24/32-bit), IEEE float (32/64-bit) and
WAVE_FORMAT_EXTENSIBLE, mixes to mono and returns float32 in [-1, 1] with its rate.
``read_header(data)`` reads only the chunk headers (rate, channels, how many frames), so a
clip's length can be checked before any sample is decoded; ``samples(data, header)`` decodes.
``resample(x, src, dst)`` is band-limited (FFT), so downsampling does not alias.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

_PCM, _FLOAT, _EXTENSIBLE = 1, 3, 0xFFFE
_SUPPORTED = {(_PCM, 8), (_PCM, 16), (_PCM, 24), (_PCM, 32), (_FLOAT, 32), (_FLOAT, 64)}


class WavError(ValueError):
    """The bytes are not a WAV file this decoder understands."""


@dataclass(frozen=True, slots=True)
class WavHeader:
    """A WAV file's format and where its whole frames of sample data lie."""

    tag: int  # 1: PCM, 3: IEEE float
    channels: int
    rate: int
    bits: int
    offset: int  # first byte of the sample data
    size: int  # bytes of whole frames present (the declared size, cut to the bytes there are)

    @property
    def frames(self) -> int:
        """Samples per channel."""
        return self.size // (self.channels * self.bits // 8)

    @property
    def seconds(self) -> float:
        return self.frames / self.rate


def read_header(data: bytes) -> WavHeader:
    """The format and data chunk of WAV bytes, without decoding samples; WavError if unsupported."""
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise WavError("not a RIFF/WAVE file")
    fmt: tuple[int, int, int, int] | None = None
    pos = 12
    while pos + 8 <= len(data):
        chunk, size = data[pos : pos + 4], struct.unpack_from("<I", data, pos + 4)[0]
        if chunk == b"fmt ":
            body = data[pos + 8 : pos + 8 + size]
            if len(body) < 16:
                raise WavError("fmt chunk too short")
            tag, channels, rate, _, _, bits = struct.unpack_from("<HHIIHH", body)
            if tag == _EXTENSIBLE and len(body) >= 26:
                tag = struct.unpack_from("<H", body, 24)[0]  # first two bytes of the sub-format GUID
            if (tag, bits) not in _SUPPORTED:
                raise WavError(f"unsupported encoding: format tag {tag}, {bits} bits")
            if channels < 1 or rate < 1:
                raise WavError(f"bad header: {channels} channels at {rate} Hz")
            fmt = (tag, channels, rate, bits)
        elif chunk == b"data":
            if fmt is None:
                raise WavError("data chunk before fmt chunk")
            tag, channels, rate, bits = fmt
            frame = channels * bits // 8
            present = min(size, len(data) - pos - 8)
            return WavHeader(tag, channels, rate, bits, pos + 8, present - present % frame)
        pos += 8 + size + (size & 1)  # chunks are padded to even sizes
    raise WavError("no data chunk")


def decode_wav(data: bytes) -> tuple[np.ndarray, int]:
    """WAV bytes -> (float32 mono samples in [-1, 1], sample rate)."""
    header = read_header(data)
    return samples(data, header), header.rate


def samples(data: bytes, header: WavHeader) -> np.ndarray:
    """The sample data ``read_header`` found, as float32 mono in [-1, 1]."""
    raw = memoryview(data)[header.offset : header.offset + header.size]
    tag, bits = header.tag, header.bits
    if tag == _PCM and bits == 8:
        x = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128) / 128
    elif tag == _PCM and bits == 16:
        x = np.frombuffer(raw, "<i2").astype(np.float32) / 32768
    elif tag == _PCM and bits == 24:
        b = np.frombuffer(raw, np.uint8).reshape(-1, 3).astype(np.int32)
        v = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        x = (np.where(v >= 1 << 23, v - (1 << 24), v)).astype(np.float32) / (1 << 23)
    elif tag == _PCM and bits == 32:
        x = (np.frombuffer(raw, "<i4").astype(np.float64) / 2**31).astype(np.float32)
    else:  # IEEE float, 32 or 64 bits (read_header refuses the rest)
        x = np.frombuffer(raw, "<f4" if bits == 32 else "<f8").astype(np.float32)
    if header.channels == 1:
        return x
    return x.reshape(-1, header.channels).mean(axis=1, dtype=np.float32)


def resample(x: np.ndarray, src_rate: int, dst_rate: int) -> np.ndarray:
    """Band-limited resampling by truncating or zero-padding the spectrum."""
    if src_rate == dst_rate or len(x) == 0:
        return x.astype(np.float32, copy=False)
    n_out = max(1, round(len(x) * dst_rate / src_rate))
    spectrum = np.fft.rfft(x.astype(np.float64))
    return (np.fft.irfft(spectrum, n_out) * (n_out / len(x))).astype(np.float32)


def encode_wav(x: np.ndarray, rate: int) -> bytes:
    """float samples in [-1, 1] -> 16-bit PCM mono WAV bytes (for tests and samples)."""
    pcm = (np.clip(x, -1, 1) * 32767).astype("<i2").tobytes()
    header = struct.pack("<4sI4s4sIHHIIHH4sI", b"RIFF", 36 + len(pcm), b"WAVE", b"fmt ", 16, _PCM, 1, rate,
                         rate * 2, 2, 16, b"data", len(pcm))  # fmt: skip
    return header + pcm

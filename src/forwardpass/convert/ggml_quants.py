"""GGUF (ggml) quantized blocks -> ONNX Runtime MatMulNBits inputs, bit-exact.

Q4_1 stores 32 weights as ``q * d + m`` (q in 0..15, fp16 d and m). MatMulNBits without zero
points computes ``(q - 8) * scale``, so with scale = d

    x . w = sum_blocks d_b * sum_j (q_j - 8) x_j  +  sum_blocks (8 d_b + m_b) * sum_j x_j

the first term is MatMulNBits (4-bit, block 32, symmetric: its int8-activation kernel applies),
the second a small MatMul of per-block input sums (K/32 values) with ``8d + m`` ("block-sum
correction"). Q8_0 stores ``q * d`` with q an int8; as uint8 ``q + 128`` with MatMulNBits' 8-bit
default zero point 128 it is exact with no correction.

Weights are (N output features, K inputs), GGUF's row order.
"""

from __future__ import annotations

import numpy as np

QK = 32  # weights per block, both types


def _blocks(raw: np.ndarray, block_bytes: int) -> np.ndarray:
    """(N, K/32 * block_bytes) uint8 rows -> (N, K/32, block_bytes)."""
    n = raw.shape[0]
    return raw.reshape(n, -1, block_bytes)


def q4_1_to_nbits(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Q4_1 rows -> (packed B (N, K/32, 16) uint8, scales (N * K/32,) f32, correction (K/32, N) f32)."""
    blocks = _blocks(raw, 20)  # d: fp16, m: fp16, qs: 16 bytes
    d = blocks[:, :, 0:2].copy().view(np.float16)[..., 0].astype(np.float32)  # (N, B)
    m = blocks[:, :, 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    qs = blocks[:, :, 4:20]  # ggml: byte j holds element j (low nibble) and j + 16 (high nibble)
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)  # (N, B, 32) in element order
    packed = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)  # MatMulNBits: byte i = elements 2i, 2i+1
    correction = (8 * d + m).T.astype(np.float32)  # (B, N)
    return packed, d.reshape(-1), np.ascontiguousarray(correction)


def q8_0_to_nbits(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q8_0 rows -> (B (N, K/32, 32) uint8 = q + 128, scales (N * K/32,) f32)."""
    blocks = _blocks(raw, 34)  # d: fp16, qs: 32 int8
    d = blocks[:, :, 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    q = blocks[:, :, 2:34].view(np.int8)
    return (q.astype(np.int16) + 128).astype(np.uint8), d.reshape(-1)


def q8_0_rows(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q8_0 rows -> (int8 values (N, K), scales (N, K/32)): for gathering embedding rows."""
    blocks = _blocks(raw, 34)
    d = blocks[:, :, 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    q = blocks[:, :, 2:34].view(np.int8).reshape(raw.shape[0], -1)
    return np.ascontiguousarray(q), d

"""GGUF (ggml) quantized blocks -> ONNX Runtime MatMulNBits inputs, bit-exact.

Q4_1 stores 32 weights as ``q * d + m`` (q in 0..15, fp16 d and m). MatMulNBits without zero
points computes ``(q - 8) * scale``, so with scale = d

    x . w = sum_blocks d_b * sum_j (q_j - 8) x_j  +  sum_blocks (8 d_b + m_b) * sum_j x_j

the first term is MatMulNBits (4-bit, block 32, symmetric: its int8-activation kernel applies),
the second a small MatMul of per-block input sums (K/32 values) with ``8d + m`` ("block-sum
correction"). The sums themselves come out of the same MatMulNBits as K/32 extra output rows
(``block_sum_rows``: q = 9, scale 1 on one block, q = 8 elsewhere), so they are computed from the same
(int8-quantized, at accuracy level 4) activations as the main product, as llama.cpp's Q8_1 sums are.
MatMulNBits' float zero points would express Q4_1 directly, but ONNX Runtime 1.32 runs them on a
dequantizing fallback about 25x slower at one row (measured: 3.9 ms vs 0.15 ms for 576 x 3072).
Q8_0 stores ``q * d`` with q an int8; as uint8 ``q + 128`` with MatMulNBits' 8-bit default zero point
128 it is exact with no correction.

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


def q4_1_split(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Q4_1 rows -> forwardpass's Q4_1MatMul inputs, GGUF's own bytes regrouped: (qs (N, K/32, 16) uint8 nibbles,
    d (N, K/32) fp16, m (K/32, N) fp16: transposed, so that the kernel reads the minimums of 16 outputs at once)."""
    blocks = _blocks(raw, 20)
    d = blocks[:, :, 0:2].copy().view(np.float16)[..., 0]
    m = blocks[:, :, 2:4].copy().view(np.float16)[..., 0]
    return np.ascontiguousarray(blocks[:, :, 4:20]), d, np.ascontiguousarray(m.T)


def q4_1_join(qs: np.ndarray, d: np.ndarray, m: np.ndarray) -> np.ndarray:
    """q4_1_split's arrays -> the float weights (N, K): q * d + m."""
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).astype(np.float32)  # (N, K/32, 32) in element order
    w = q * d.astype(np.float32)[..., None] + m.T.astype(np.float32)[..., None]
    return w.reshape(qs.shape[0], -1)


def block_sum_rows(k: int) -> tuple[np.ndarray, np.ndarray]:
    """K/32 extra 4-bit weight rows whose outputs are the per-block sums of the input, exactly."""
    nb = k // QK
    q = np.full((nb, nb, QK), 8, np.uint8)  # (q - 8) * 1 = 0 ...
    q[np.arange(nb), np.arange(nb)] = 9  # ... except 1 on block i of row i
    return (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8), np.ones(nb * nb, np.float32)


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


def int8_blocks(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Float weights (N, K) -> 8-bit MatMulNBits inputs as Q8_0 would store them: per block of 32 a scale
    d = max|w| / 127 and q = round(w / d), as uint8 ``q + 128`` (B (N, K/32, 32), scales (N * K/32,) f32)."""
    n, k = w.shape
    blocks = w.reshape(n, k // QK, QK).astype(np.float32)
    d = np.abs(blocks).max(axis=-1) / 127
    q = np.clip(np.rint(blocks / np.where(d == 0, 1, d)[..., None]), -127, 127)
    return (q + 128).astype(np.uint8), d.astype(np.float32).reshape(-1)


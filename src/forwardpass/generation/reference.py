"""A Llama-family decoder in numpy, float32, from dequantized GGUF weights: the reference that
forwardpass's ONNX decoder graph is checked against, layer by layer.

Slow and plain on purpose (shape comments as in nanoGPT): T = tokens in this call, C = n_embd,
H / Hkv = query / key-value heads, D = head_dim.

    ref = ReferenceDecoder(GGUFFile.open(path))
    logits = ref.forward([1, 4093, 198])      # (3, n_vocab), appending to the KV cache
    logits = ref.forward([1780])              # the next position
"""

from __future__ import annotations

import numpy as np

from forwardpass.generation.gguf_file import GGUFFile, HParams


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """x / sqrt(mean(x^2) + eps) * weight, over the last axis."""
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def rope(x: np.ndarray, positions: np.ndarray, base: float, dims: int) -> np.ndarray:
    """Rotary embedding on adjacent pairs (x[2i], x[2i+1]): GGUF's permuted Q/K rows expect this layout.

    x: (T, heads, D); positions: (T,)
    """
    half = dims // 2
    theta = base ** (-np.arange(half, dtype=np.float64) * 2 / dims)  # (D/2,)
    angles = positions[:, None].astype(np.float64) * theta[None, :]  # (T, D/2)
    cos, sin = np.cos(angles)[:, None, :], np.sin(angles)[:, None, :]  # (T, 1, D/2)
    even, odd = x[..., 0:dims:2], x[..., 1:dims:2]  # (T, heads, D/2)
    out = x.copy()
    out[..., 0:dims:2] = even * cos - odd * sin
    out[..., 1:dims:2] = even * sin + odd * cos
    return out.astype(np.float32)


class ReferenceDecoder:
    """Dequantized weights and a KV cache; ``forward`` appends tokens and returns their logits."""

    def __init__(self, model: GGUFFile):
        self.hp: HParams = model.hparams
        w = model.dequantize
        self.embed = w("token_embd.weight")  # (V, C)
        self.head = w("output.weight") if "output.weight" in model.tensors else self.embed  # tied
        self.norm = w("output_norm.weight")  # (C,)
        self.layers = [
            {name: w(f"blk.{i}.{name}.weight") for name in (
                "attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")}
            for i in range(self.hp.n_layer)
        ]  # fmt: skip
        self.reset()

    def reset(self) -> None:
        """Forget the KV cache."""
        hp = self.hp
        self.k = [np.zeros((0, hp.n_head_kv, hp.head_dim), np.float32) for _ in range(hp.n_layer)]
        self.v = [np.zeros((0, hp.n_head_kv, hp.head_dim), np.float32) for _ in range(hp.n_layer)]

    @property
    def position(self) -> int:
        return len(self.k[0])

    def forward(self, tokens: list[int], layers: int | None = None, hidden: list[np.ndarray] | None = None) -> np.ndarray:
        """Logits (T, V) for ``tokens`` placed after what the cache holds; with ``layers``, the
        hidden state (T, C) after that many blocks instead; ``hidden`` collects every block's output."""
        hp = self.hp
        T, D, group = len(tokens), hp.head_dim, hp.n_head // hp.n_head_kv
        positions = np.arange(self.position, self.position + T)
        x = self.embed[np.asarray(tokens)]  # (T, C)
        for i, p in enumerate(self.layers[: layers if layers is not None else hp.n_layer]):
            h = rms_norm(x, p["attn_norm"], hp.rms_eps)
            q = (h @ p["attn_q"].T).reshape(T, hp.n_head, D)  # (T, H, D)
            k = (h @ p["attn_k"].T).reshape(T, hp.n_head_kv, D)  # (T, Hkv, D)
            v = (h @ p["attn_v"].T).reshape(T, hp.n_head_kv, D)
            q, k = rope(q, positions, hp.rope_base, hp.rope_dim), rope(k, positions, hp.rope_base, hp.rope_dim)
            self.k[i] = np.concatenate([self.k[i], k])  # (S, Hkv, D), S = cached + T
            self.v[i] = np.concatenate([self.v[i], v])
            keys = np.repeat(self.k[i], group, axis=1)  # (S, H, D): each KV head serves `group` query heads
            values = np.repeat(self.v[i], group, axis=1)
            scores = np.einsum("thd,shd->hts", q, keys) / np.sqrt(D)  # (H, T, S)
            S = keys.shape[0]
            causal = np.arange(S)[None, :] > positions[:, None]  # (T, S): no looking ahead
            scores = np.where(causal[None], -np.inf, scores)
            scores = np.exp(scores - scores.max(-1, keepdims=True))
            scores /= scores.sum(-1, keepdims=True)
            attn = np.einsum("hts,shd->thd", scores, values).reshape(T, hp.n_embd)  # (T, C)
            x = x + attn @ p["attn_output"].T
            h = rms_norm(x, p["ffn_norm"], hp.rms_eps)
            gate, up = h @ p["ffn_gate"].T, h @ p["ffn_up"].T  # (T, F)
            x = x + (gate / (1 + np.exp(-gate)) * up) @ p["ffn_down"].T  # SwiGLU
            if hidden is not None:
                hidden.append(x)
        if layers is not None:
            return x
        return rms_norm(x, self.norm, hp.rms_eps) @ self.head.T  # (T, V)

"""Choosing the next token from fp32 logits: penalties, temperature, top-k, top-p, min-p, a seeded RNG.

    sampler = Sampler(SamplingParams(temperature=0.7, top_p=0.9, seed=42))
    token = sampler.pick(logits, previous_tokens)

Temperature 0 is greedy (argmax, no randomness). The same seed, prompt and parameters give the
same tokens every time: the generator is a per-request ``numpy.random.Generator(PCG64(seed))``.
Order of operations (llama.cpp's and vLLM's): penalties, then temperature, then top-k, top-p,
min-p on the resulting distribution, then one draw.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from forwardpass.errors import InvalidInput


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling settings (OpenAI's names where they exist)."""

    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # > 1 discourages tokens already seen (divides positive logits)
    frequency_penalty: float = 0.0  # subtracts count * this
    presence_penalty: float = 0.0  # subtracts this once a token has appeared
    seed: int | None = None

    def __post_init__(self) -> None:
        checks = [
            ("temperature", self.temperature >= 0, "expected >= 0"),
            ("top_k", self.top_k >= 0, "expected >= 0 (0 turns it off)"),
            ("top_p", 0 < self.top_p <= 1, "expected in (0, 1]"),
            ("min_p", 0 <= self.min_p < 1, "expected in [0, 1)"),
            ("repetition_penalty", self.repetition_penalty > 0, "expected > 0"),
            ("frequency_penalty", -2 <= self.frequency_penalty <= 2, "expected in [-2, 2]"),
            ("presence_penalty", -2 <= self.presence_penalty <= 2, "expected in [-2, 2]"),
        ]
        for name, ok, msg in checks:
            if not ok:
                raise InvalidInput((name,), msg, getattr(self, name))


class Sampler:
    """Stateful for one request: holds its random generator."""

    def __init__(self, params: SamplingParams):
        self.params = params
        self.rng = np.random.Generator(np.random.PCG64(params.seed))

    def adjust(self, logits: np.ndarray, previous: Sequence[int]) -> np.ndarray:
        """Logits after penalties (float64 copy)."""
        p = self.params
        out = logits.astype(np.float64, copy=True)
        if previous and (p.repetition_penalty != 1 or p.frequency_penalty or p.presence_penalty):
            counts = Counter(previous)
            ids = np.fromiter(counts, dtype=np.int64)
            n = np.fromiter(counts.values(), dtype=np.float64)
            seen = out[ids]
            with np.errstate(over="ignore"):
                seen = np.where(seen > 0, seen / p.repetition_penalty, seen * p.repetition_penalty)
            seen = np.clip(seen, -1e300, 1e300)  # a penalty like 5e-324 must not make a logit infinite (NaN below)
            out[ids] = seen - n * p.frequency_penalty - p.presence_penalty
        return out

    def probabilities(self, logits: np.ndarray, previous: Sequence[int] = ()) -> np.ndarray:
        """The distribution the next token is drawn from (zeros where filters cut)."""
        p = self.params
        z = self.adjust(logits, previous)
        z -= z.max()  # before dividing: with a temperature like 5e-324 the top logit stays 0, not inf - inf
        with np.errstate(over="ignore"):
            z /= p.temperature
        probs = np.exp(z)
        probs /= probs.sum()
        if p.top_k and p.top_k < len(probs):
            cutoff = np.partition(probs, -p.top_k)[-p.top_k]
            probs = np.where(probs >= cutoff, probs, 0.0)
        if p.top_p < 1:
            probs = np.where(_top_p_mask(probs, p.top_p), probs, 0.0)
        if p.min_p > 0:
            probs = np.where(probs >= p.min_p * probs.max(), probs, 0.0)
        return probs / probs.sum()

    def pick(self, logits: np.ndarray, previous: Sequence[int] = (), candidates: np.ndarray | None = None) -> int:
        """The next token id; among ``candidates`` (sorted token ids) only, when given: a grammar's allowed
        tokens, usually a few, so the distribution is computed over them alone (the same one, with the others'
        probability 0, at a fraction of the cost: 49k exponentials otherwise)."""
        if candidates is None:
            return self._pick(logits, previous)
        if len(candidates) == 1:
            return int(candidates[0])
        local: Sequence[int] = ()
        if previous:
            seen = np.asarray(previous, dtype=np.int64)
            at = np.minimum(np.searchsorted(candidates, seen), len(candidates) - 1)
            local = at[candidates[at] == seen].tolist()  # the previous tokens that are candidates, as positions
        return int(candidates[self._pick(logits[candidates], local)])

    def _pick(self, logits: np.ndarray, previous: Sequence[int] = ()) -> int:
        if self.params.temperature == 0:
            return int(np.argmax(self.adjust(logits, previous)))
        probs = self.probabilities(logits, previous)
        # inverse CDF with one uniform draw: the distribution rng.choice(p=...) samples, at a third of its cost
        cumulative = np.cumsum(probs)
        return int(min(np.searchsorted(cumulative, self.rng.random() * cumulative[-1], side="right"), len(probs) - 1))


def _top_p_mask(probs: np.ndarray, top_p: float) -> np.ndarray:
    """The smallest set of most likely tokens whose probability reaches ``top_p`` (nucleus), as a mask.

    Sorting 49k probabilities costs ~3 ms per token; the nucleus is almost always within the few hundred
    most likely, so those are found with argpartition and sorted alone, widening only when they fall short.
    """
    total = probs.sum()
    k = min(len(probs), 256)
    while True:
        candidates = np.argpartition(-probs, k - 1)[:k] if k < len(probs) else np.arange(len(probs))
        order = candidates[np.argsort(-probs[candidates], kind="stable")]
        cumulative = np.cumsum(probs[order]) / total
        if cumulative[-1] >= top_p or k == len(probs):
            break
        k = min(len(probs), k * 8)
    mask = np.zeros(len(probs), dtype=bool)
    mask[order[: int(np.searchsorted(cumulative, top_p) + 1)]] = True
    return mask


def token_logprob(logits: np.ndarray, token: int) -> float:
    """log softmax(logits)[token]."""
    z = logits.astype(np.float64) - logits.max()
    return float(z[token] - np.log(np.exp(z).sum()))


def top_logprobs(logits: np.ndarray, n: int) -> list[tuple[int, float]]:
    """The n most likely tokens with their log-probabilities (OpenAI's top_logprobs)."""
    z = logits.astype(np.float64) - logits.max()
    logp = z - np.log(np.exp(z).sum())
    top = np.argsort(-logp, kind="stable")[:n]
    return [(int(t), float(logp[t])) for t in top]

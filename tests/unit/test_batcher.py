"""Batching decisions with an injected clock: sizes, delays, preferred sizes, timeouts, order."""

from forwardpass.scheduler.batcher import Decision, Pending, Policy, plan

A, B = ("x", (64,)), ("x", (32,))  # two non-batch shapes


def q(*items):
    """items: (rows, signature, enqueued[, deadline])"""
    return [Pending(*item) for item in items]


def test_no_delay_takes_everything_queued_in_order():
    queue = q((1, A, 0.0), (2, A, 0.1), (1, A, 0.2))
    assert plan(queue, 0.3, Policy(max_batch_size=8)) == Decision(take=(0, 1, 2))


def test_max_batch_size_in_rows():
    queue = q((3, A, 0), (3, A, 0), (3, A, 0))
    assert plan(queue, 0, Policy(max_batch_size=7)).take == (0, 1)
    assert plan(queue, 0, Policy(max_batch_size=9)).take == (0, 1, 2)


def test_a_request_larger_than_the_batch_runs_alone():
    queue = q((10, A, 0), (1, A, 0))
    assert plan(queue, 0, Policy(max_batch_size=4)).take == (0,)


def test_only_same_shapes_merge_and_the_oldest_group_goes_first():
    queue = q((1, A, 0), (1, B, 0.1), (1, A, 0.2), (1, B, 0.3))
    assert plan(queue, 1, Policy(max_batch_size=8)).take == (0, 2)
    assert plan(q((1, B, 0.1), (1, B, 0.3)), 1, Policy(max_batch_size=8)).take == (0, 1)


def test_delay_waits_for_more_rows_until_due():
    policy = Policy(max_batch_size=8, max_queue_delay=0.005)
    queue = q((1, A, 1.000), (1, A, 1.002))
    waiting = plan(queue, 1.003, policy)
    assert waiting.take == () and waiting.wake_at == 1.005
    assert plan(queue, 1.005, policy).take == (0, 1)


def test_delay_ends_early_when_the_batch_is_full():
    queue = q((4, A, 1.0), (4, A, 1.001))
    assert plan(queue, 1.001, Policy(max_batch_size=8, max_queue_delay=1.0)).take == (0, 1)
    queue = q((4, A, 1.0), (4, A, 1.001), (4, A, 1.001))
    assert plan(queue, 1.001, Policy(max_batch_size=10, max_queue_delay=1.0)).take == (0, 1)  # third cannot fit


def test_preferred_sizes():
    policy = Policy(max_batch_size=16, max_queue_delay=0.01, preferred_batch_sizes=(4, 8))
    # the largest preferred size is reached: go now, taking exactly the preferred prefix
    queue = q(*[(1, A, 0.0)] * 9)
    assert plan(queue, 0.0, policy).take == tuple(range(8))
    # delay over with 6 rows queued: the largest preferred prefix (4 rows)
    queue = q(*[(1, A, 0.0)] * 6)
    assert plan(queue, 0.001, policy).take == ()
    assert plan(queue, 0.01, policy).take == (0, 1, 2, 3)
    # no prefix is a preferred size: take what there is
    queue = q((3, A, 0.0), (2, A, 0.0))
    assert plan(queue, 0.01, policy).take == (0, 1)


def test_timeouts_expire_and_wake_for_the_next_deadline():
    policy = Policy(max_batch_size=8, max_queue_delay=1.0)
    queue = q((1, A, 0.0, 0.5), (1, A, 0.1, 0.3), (1, A, 0.2, None))
    d = plan(queue, 0.2, policy)
    assert d.take == () and d.expired == () and d.wake_at == 0.3
    d = plan(queue, 0.3, policy)
    assert d.expired == (1,) and d.wake_at == 0.5
    d = plan(queue, 0.6, policy)
    assert d.expired == (0, 1) and d.take == () and d.wake_at == 1.2


def test_expired_are_not_taken_without_delay():
    queue = q((1, A, 0.0, 0.1), (1, A, 0.0, None))
    assert plan(queue, 0.2, Policy()) == Decision(take=(1,), expired=(0,))


def test_empty_queue():
    assert plan([], 0.0, Policy()) == Decision()

"""The contract of `Admission` (the concurrency cap and its bounded queue) and `RateLimiter`
(token buckets per client), on the classes themselves.

Through the router, tests/test_access.py checks the 429 answers (queue full, queue timeout,
a queued request served once a slot frees, per-client rate limits) and tests/test_batch.py
that batch lines stay under the cap. Here: who gets a freed slot, that no way out of the
queue (timeout, cancellation, a hand-over racing either) leaks a slot, and how buckets refill
and stay bounded in number.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from router.errors import TooManyRequests
from router.proxy.admission import Admission, RateLimiter


async def until(condition: Callable[[], bool], timeout: float = 2.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0)


async def queued(admission: Admission, count: int) -> list[asyncio.Task[None]]:
    """`count` tasks waiting in `admission`'s queue, in this order."""
    tasks = []
    for _ in range(count):
        tasks.append(asyncio.create_task(admission.acquire()))
        await until(lambda: admission.waiting == len(tasks))
    return tasks


async def test_a_free_slot_is_taken_at_once() -> None:
    admission = Admission(limit=2, queue_size=0, queue_timeout=1.0)
    await admission.acquire()
    await admission.acquire()
    assert (admission.running, admission.waiting) == (2, 0)
    admission.release()
    admission.release()
    assert (admission.running, admission.waiting) == (0, 0)


async def test_release_hands_the_slot_to_the_oldest_waiter() -> None:
    admission = Admission(limit=1, queue_size=3, queue_timeout=5.0)
    await admission.acquire()
    waiters = await queued(admission, 3)
    admitted: list[int] = []
    for number, waiter in enumerate(waiters):
        waiter.add_done_callback(lambda _, number=number: admitted.append(number))
    for expected in range(3):
        admission.release()
        await until(lambda: len(admitted) == expected + 1)
        assert admitted == list(range(expected + 1))
        assert admission.running == 1, "a handed-over slot stays counted as running"
    admission.release()
    assert (admission.running, admission.waiting) == (0, 0)


async def test_a_newcomer_does_not_overtake_the_waiter_a_slot_was_handed_to() -> None:
    admission = Admission(limit=1, queue_size=2, queue_timeout=5.0)
    await admission.acquire()
    [first] = await queued(admission, 1)
    admission.release()  # handed to `first`, which has not run yet
    newcomer = asyncio.create_task(admission.acquire())
    await until(lambda: first.done() and admission.waiting == 1)
    assert not newcomer.done()
    admission.release()
    await asyncio.wait_for(newcomer, 1)
    admission.release()
    assert (admission.running, admission.waiting) == (0, 0)


async def test_a_full_queue_refuses_at_once_with_retry_after() -> None:
    admission = Admission(limit=1, queue_size=2, queue_timeout=5.0)
    await admission.acquire()
    waiters = await queued(admission, 2)
    with pytest.raises(TooManyRequests) as refused:
        await asyncio.wait_for(admission.acquire(), 0.5)
    assert refused.value.status == 429
    assert refused.value.headers == {"Retry-After": "1"}
    assert "queue is full" in str(refused.value)
    assert (admission.running, admission.waiting) == (1, 2)
    for _ in range(3):
        admission.release()
    await asyncio.wait_for(asyncio.gather(*waiters), 1)
    assert (admission.running, admission.waiting) == (0, 0)


async def test_without_a_queue_a_request_past_the_limit_is_refused() -> None:
    admission = Admission(limit=1, queue_size=0, queue_timeout=5.0)
    await admission.acquire()
    with pytest.raises(TooManyRequests):
        await asyncio.wait_for(admission.acquire(), 0.5)
    assert (admission.running, admission.waiting) == (1, 0)


async def test_a_waiter_that_times_out_is_refused_and_leaves_no_slot_behind() -> None:
    admission = Admission(limit=1, queue_size=2, queue_timeout=0.05)
    await admission.acquire()
    with pytest.raises(TooManyRequests) as refused:
        await admission.acquire()
    assert "in the queue" in str(refused.value)
    assert refused.value.headers == {"Retry-After": "1"}
    assert (admission.running, admission.waiting) == (1, 0)
    admission.release()
    assert admission.running == 0
    await asyncio.wait_for(admission.acquire(), 0.5)
    assert admission.running == 1


async def test_a_cancelled_waiter_leaves_the_queue_and_no_slot_behind() -> None:
    admission = Admission(limit=1, queue_size=2, queue_timeout=5.0)
    await admission.acquire()
    gone, staying = await queued(admission, 2)
    gone.cancel()
    with pytest.raises(asyncio.CancelledError):
        await gone
    assert (admission.running, admission.waiting) == (1, 1)
    admission.release()
    await asyncio.wait_for(staying, 1)
    admission.release()
    assert (admission.running, admission.waiting) == (0, 0)


async def test_a_slot_handed_over_as_its_waiter_is_cancelled_is_held_by_exactly_one() -> None:
    admission = Admission(limit=1, queue_size=2, queue_timeout=5.0)
    await admission.acquire()
    gone, next_in_line = await queued(admission, 2)
    admission.release()  # the slot goes to `gone`...
    gone.cancel()  # ...which is cancelled before it could run
    try:
        await gone
    except asyncio.CancelledError:
        pass  # it passed the slot on
    else:  # Python 3.11's wait_for lets the won slot through instead of the cancellation
        assert not next_in_line.done(), "the slot was given twice"
        admission.release()
    await asyncio.wait_for(next_in_line, 1)
    assert (admission.running, admission.waiting) == (1, 0)
    admission.release()
    assert admission.running == 0


async def test_a_waiter_cancelled_just_before_a_release_does_not_swallow_the_slot() -> None:
    admission = Admission(limit=1, queue_size=2, queue_timeout=5.0)
    await admission.acquire()
    gone, next_in_line = await queued(admission, 2)
    gone.cancel()  # not yet run when the slot frees
    admission.release()
    with pytest.raises(asyncio.CancelledError):
        await gone
    await asyncio.wait_for(next_in_line, 1)
    admission.release()
    assert (admission.running, admission.waiting) == (0, 0)


async def test_a_slot_freed_with_nobody_left_waiting_is_freed() -> None:
    admission = Admission(limit=1, queue_size=1, queue_timeout=5.0)
    await admission.acquire()
    [gone] = await queued(admission, 1)
    gone.cancel()
    admission.release()
    with pytest.raises(asyncio.CancelledError):
        await gone
    assert (admission.running, admission.waiting) == (0, 0)
    await asyncio.wait_for(admission.acquire(), 0.5)


async def test_repr_shows_running_and_waiting() -> None:
    admission = Admission(limit=1, queue_size=1, queue_timeout=5.0)
    await admission.acquire()
    [waiter] = await queued(admission, 1)
    assert repr(admission) == "<Admission running=1/1 waiting=1>"
    admission.release()
    await asyncio.wait_for(waiter, 1)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_bucket_allows_its_burst_then_says_how_long_to_wait() -> None:
    clock = Clock()
    limiter = RateLimiter(rate=2.0, burst=3.0, clock=clock)
    assert [limiter.try_take("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.try_take("a") == pytest.approx(0.5)
    clock.now += 0.2
    assert limiter.try_take("a") == pytest.approx(0.3)


def test_take_raises_too_many_requests_with_retry_after() -> None:
    clock = Clock()
    limiter = RateLimiter(rate=0.25, burst=1.0, clock=clock)
    limiter.take("a")
    with pytest.raises(TooManyRequests) as refused:
        limiter.take("a")
    assert refused.value.status == 429
    assert refused.value.headers == {"Retry-After": "4"}
    assert "0.25 requests/s" in str(refused.value)


def test_a_bucket_refills_at_its_rate_and_a_refusal_spends_nothing() -> None:
    clock = Clock()
    limiter = RateLimiter(rate=1.0, burst=1.0, clock=clock)
    limiter.take("a")
    for _ in range(4):
        clock.now += 0.125
        assert limiter.try_take("a") > 0
    clock.now += 0.5
    assert limiter.try_take("a") == 0.0
    assert limiter.try_take("a") == pytest.approx(1.0)


def test_a_bucket_refills_up_to_its_burst_only() -> None:
    clock = Clock()
    limiter = RateLimiter(rate=10.0, burst=2.0, clock=clock)
    limiter.take("a")
    clock.now += 3600
    assert [limiter.try_take("a") for _ in range(3)] == [0.0, 0.0, pytest.approx(0.1)]


def test_each_key_has_its_own_bucket() -> None:
    limiter = RateLimiter(rate=1.0, burst=1.0, clock=Clock())
    limiter.take("a")
    with pytest.raises(TooManyRequests):
        limiter.take("a")
    limiter.take("b")


def test_keys_past_max_keys_evict_the_least_recently_seen() -> None:
    clock = Clock()
    limiter = RateLimiter(rate=0.001, burst=1.0, max_keys=2, clock=clock)
    limiter.take("a")
    limiter.take("b")
    assert limiter.try_take("a") > 0  # a is seen again: b is now the least recent
    limiter.take("c")
    assert repr(limiter) == "<RateLimiter 0.001/s burst=1 keys=2>"
    assert limiter.try_take("a") > 0 and limiter.try_take("c") > 0, "still remembered"
    assert limiter.try_take("b") == 0.0, "forgotten, so a full bucket again"
    assert repr(limiter) == "<RateLimiter 0.001/s burst=1 keys=2>"

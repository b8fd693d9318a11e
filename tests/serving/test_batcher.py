"""Continuous micro-batching: a lone call runs at once, calls that arrive while the worker is busy
share the next batch (up to its size), errors reach every caller of their batch and no further,
cancelled callers are skipped. A threading.Event holds the first batch to make the timing exact."""

from __future__ import annotations

import asyncio
import threading

import pytest

from via_sd_ray.serving.batcher import MicroBatcher


def run(coro, limit_s: float = 10.0):
    """``asyncio.run`` with a bound: a lost wake-up fails the test instead of hanging it."""
    return asyncio.run(asyncio.wait_for(coro, limit_s))


class Recorder:
    """A batch function: records each batch, can hold one until released, fails on 'bad' items."""

    def __init__(self, hold_first: bool = False):
        self.batches: list[list] = []
        self.started = threading.Event()  # set when a batch starts
        self.release = threading.Event()
        if not hold_first:
            self.release.set()

    def __call__(self, items: list) -> list:
        self.batches.append(list(items))
        self.started.set()
        if len(self.batches) == 1:
            assert self.release.wait(10), "the test never released the first batch"
        if any(item == "bad" for item in items):
            raise RuntimeError(f"batch {len(self.batches)} failed")
        return [f"result of {item}" for item in items]


async def until(condition, what: str, limit_s: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit_s
    while not condition():
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.001)


async def hold_first_batch(batcher: MicroBatcher, recorder: Recorder, item="first") -> asyncio.Task:
    """Submit ``item`` and return once its batch is running (and blocked) in the worker thread."""
    task = asyncio.create_task(batcher.submit(item))
    await until(recorder.started.is_set, "the first batch to start")
    return task


async def enqueue(batcher: MicroBatcher, items) -> list[asyncio.Task]:
    tasks = [asyncio.create_task(batcher.submit(item)) for item in items]
    await until(lambda: batcher.queued == len(items), "the items to be queued")
    return tasks


def test_one_call_runs_alone_without_a_timer():
    recorder = Recorder()
    batcher = MicroBatcher(recorder, max_batch_size=8)
    timers = []

    async def main():
        loop = asyncio.get_running_loop()
        call_at = loop.call_at

        def recording_call_at(when, callback, *args, **kwargs):
            timers.append(when - loop.time())
            return call_at(when, callback, *args, **kwargs)

        loop.call_at = recording_call_at  # asyncio.sleep(d > 0), wait_for and timeouts all schedule here
        try:
            return await batcher.submit("a")
        finally:
            loop.call_at = call_at

    assert asyncio.run(main()) == "result of a"
    assert recorder.batches == [["a"]]
    assert timers == []  # nothing waited for company
    assert (batcher.batches, batcher.items, batcher.queued) == (1, 1, 0)
    batcher.shutdown()


def test_calls_arriving_while_busy_share_the_next_batch_in_order():
    recorder = Recorder(hold_first=True)
    batcher = MicroBatcher(recorder, max_batch_size=8)

    async def main():
        first = await hold_first_batch(batcher, recorder)
        later = await enqueue(batcher, ["b", "c", "d"])
        recorder.release.set()
        return await asyncio.gather(first, *later)

    assert run(main()) == ["result of first", "result of b", "result of c", "result of d"]
    assert recorder.batches == [["first"], ["b", "c", "d"]]
    assert (batcher.batches, batcher.items, batcher.queued) == (2, 4, 0)
    batcher.shutdown()


def test_max_batch_size_is_respected():
    recorder = Recorder(hold_first=True)
    batcher = MicroBatcher(recorder, max_batch_size=2)

    async def main():
        first = await hold_first_batch(batcher, recorder)
        later = await enqueue(batcher, ["b", "c", "d", "e", "f"])
        recorder.release.set()
        return await asyncio.gather(first, *later)

    assert run(main()) == [f"result of {x}" for x in ("first", "b", "c", "d", "e", "f")]
    assert recorder.batches == [["first"], ["b", "c"], ["d", "e"], ["f"]]
    assert (batcher.batches, batcher.items) == (4, 6)
    batcher.shutdown()


def test_error_reaches_every_caller_of_its_batch_and_later_batches_run():
    recorder = Recorder(hold_first=True)
    batcher = MicroBatcher(recorder, max_batch_size=3)

    async def main():
        first = await hold_first_batch(batcher, recorder)
        failing = await enqueue(batcher, ["b", "bad", "d"])
        after = asyncio.create_task(batcher.submit("e"))  # the batch after the failing one
        recorder.release.set()
        outcomes = await asyncio.gather(first, *failing, after, return_exceptions=True)
        again = await batcher.submit("f")  # the batcher still works afterwards
        return outcomes, again

    (first, *failing, after), again = run(main())
    assert first == "result of first" and after == "result of e" and again == "result of f"
    assert all(isinstance(err, RuntimeError) and str(err) == "batch 2 failed" for err in failing)
    assert failing[0] is failing[1] is failing[2]
    assert recorder.batches == [["first"], ["b", "bad", "d"], ["e"], ["f"]]
    assert (batcher.batches, batcher.items) == (4, 6)
    batcher.shutdown()


def test_a_cancelled_caller_is_skipped():
    recorder = Recorder(hold_first=True)
    batcher = MicroBatcher(recorder, max_batch_size=8)

    async def main():
        first = await hold_first_batch(batcher, recorder)
        b, c, d = await enqueue(batcher, ["b", "c", "d"])
        c.cancel()
        await asyncio.sleep(0)
        recorder.release.set()
        results = await asyncio.gather(first, b, d)
        with pytest.raises(asyncio.CancelledError):
            await c
        return results

    assert run(main()) == ["result of first", "result of b", "result of d"]
    assert recorder.batches == [["first"], ["b", "d"]]
    assert (batcher.batches, batcher.items) == (2, 3)
    batcher.shutdown()


def test_a_caller_cancelled_while_its_batch_runs_does_not_disturb_the_others():
    recorder = Recorder(hold_first=True)
    batcher = MicroBatcher(recorder, max_batch_size=8)

    async def main():
        a = await hold_first_batch(batcher, recorder, "a")
        a.cancel()  # its item is already in the running batch
        await asyncio.sleep(0)
        b = asyncio.create_task(batcher.submit("b"))
        recorder.release.set()
        with pytest.raises(asyncio.CancelledError):
            await a
        return await b

    assert run(main()) == "result of b"
    assert recorder.batches == [["a"], ["b"]]
    batcher.shutdown()


def test_each_caller_gets_its_own_result():
    batcher = MicroBatcher(lambda items: [x * x for x in items], max_batch_size=4)

    async def main():
        return await asyncio.gather(*(batcher.submit(x) for x in range(10)))

    assert run(main()) == [x * x for x in range(10)]
    assert batcher.items == 10 and batcher.batches == 3  # gathered at once: batches of 4, 4, 2
    batcher.shutdown()


def test_busy_seconds_counts_time_in_the_batch_function():
    recorder = Recorder(hold_first=True)
    batcher = MicroBatcher(recorder)

    async def main():
        first = await hold_first_batch(batcher, recorder)
        await asyncio.sleep(0.05)
        recorder.release.set()
        return await first

    run(main())
    assert 0.049 <= batcher.busy_seconds < 5.0
    batcher.shutdown()


def test_batch_function_runs_off_the_event_loop_thread():
    threads = []
    batcher = MicroBatcher(lambda items: threads.append(threading.current_thread().name) or items, name="tierx")

    async def main():
        return await batcher.submit(1), threading.current_thread().name

    result, loop_thread = run(main())
    assert result == 1 and threads[0] != loop_thread and threads[0].startswith("tierx")
    batcher.shutdown()


def test_a_batch_waiting_for_the_other_generations_wakes_on_their_arrival_without_polling():
    async def main():
        recorder, asked = Recorder(), []
        batcher = MicroBatcher(recorder, max_batch_size=8, expected=lambda: asked.append(1) or 2, max_wait_s=1.0)
        batcher.typical_batch_s = 2.0  # the wait is bounded by half of it and by max_wait_s: 1 s here
        loop = asyncio.get_running_loop()
        start = loop.time()
        first = asyncio.create_task(batcher.submit("a"))
        await asyncio.sleep(0.3)
        assert not recorder.batches  # still gathering
        second = asyncio.create_task(batcher.submit("b"))
        assert await first == "result of a" and await second == "result of b"
        assert recorder.batches == [["a", "b"]]  # one pass for both
        assert loop.time() - start < 0.9  # woken by the arrival, not by the deadline
        assert len(asked) <= 3  # counted at the start and at each arrival, not every half millisecond
        batcher.shutdown()

    run(main())


def test_a_batch_waits_for_missing_calls_no_longer_than_its_bound():
    async def main():
        recorder = Recorder()
        batcher = MicroBatcher(recorder, max_batch_size=8, expected=lambda: 3, max_wait_s=0.2)
        batcher.typical_batch_s = 10.0
        loop = asyncio.get_running_loop()
        start = loop.time()
        assert await batcher.submit("alone") == "result of alone"
        assert 0.15 < loop.time() - start < 2.0 and recorder.batches == [["alone"]]
        batcher.shutdown()

    run(main())

"""Continuous micro-batching of tier calls.

Calls that arrive while the model is busy wait in a queue; when the model frees up, all
of them (up to ``max_batch_size``) run in one forward pass. A lone generation pays no
batching delay. When more generations are active than calls are queued (``expected``),
the batch waits for the others (woken by each arrival, not polling), at most half a typical
batch time (and ``max_wait_s``): generations whose calls came back together answer a moment
apart, and starting on the first ones alone would split every later round into groups that
stay out of phase; on a compute-bound tier, one batch of 8 costs little more than one of 2.
A call that is not done after its batch (a long prompt prefilled chunk by chunk) goes back to
the front of the queue, so each chunk runs beside the other generations' steps instead of
stalling them.
The batch function runs on one worker thread, off the event loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor


class MicroBatcher:
    def __init__(self, run_batch: Callable[[list], list], max_batch_size: int = 8, name: str = "batch",
                 threads: int | None = None, expected: Callable[[], int] | None = None, max_wait_s: float = 0.0,
                 again: Callable[[object], bool] | None = None):
        """``again``: whether a result means "not done" (a prefill chunk ran): the call then goes back to
        the front of the queue and runs again in the next batch, beside whatever else has arrived."""
        self.run_batch = run_batch
        self.again = again
        self.max_batch_size = max_batch_size
        self.expected = expected
        self.max_wait_s = max_wait_s
        self._queue: list[tuple[object, asyncio.Future]] = []
        self._arrived = asyncio.Event()  # set by every submit: the gathering batch wakes on arrivals, not a poll
        # torch's OpenMP thread count is per thread: set it on the worker that runs the batches
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name,
                                            initializer=_set_threads if threads else None,
                                            initargs=(threads,) if threads else ())
        self._worker: asyncio.Task | None = None
        self.batches = 0
        self.items = 0
        self.busy_seconds = 0.0
        self.typical_batch_s = 0.0  # moving average of batch durations
        self._running: tuple[float, int] | None = None  # (start, calls) of the batch on the worker now

    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def running(self) -> int:
        """Calls in the batch on the worker now."""
        return self._running[1] if self._running else 0

    def busy_seconds_now(self, now: float) -> float:
        """Seconds spent running batches so far, the running one included (``now``: event-loop time)."""
        return self.busy_seconds + (now - self._running[0] if self._running else 0.0)

    async def submit(self, item):
        """Run ``item`` in the next batch and return its result (or raise its error)."""
        future = asyncio.get_running_loop().create_future()
        self._queue.append((item, future))
        self._arrived.set()
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        while self._queue:
            await self._gather(loop)
            batch = [entry for entry in self._queue[: self.max_batch_size] if not entry[1].cancelled()]
            del self._queue[: self.max_batch_size]
            if not batch:
                continue
            start = loop.time()
            self._running = (start, len(batch))
            try:
                results = await loop.run_in_executor(self._executor, self.run_batch, [item for item, _ in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"batch function returned {len(results)} results for {len(batch)} calls")
                requeue = []
                for entry, result in zip(batch, results):
                    if self.again is not None and self.again(result):
                        requeue.append(entry)
                    elif not entry[1].done():
                        entry[1].set_result(result)
                self._queue[:0] = requeue
            except BaseException as err:  # the whole batch failed (or the worker was cancelled): tell every caller
                for _, future in batch:
                    if not future.done():
                        future.set_exception(err if isinstance(err, Exception) else RuntimeError("batch cancelled"))
                if not isinstance(err, Exception):
                    raise
            finally:
                took = loop.time() - start
                self._running = None
                self.batches += 1
                self.items += len(batch)
                self.busy_seconds += took
                self.typical_batch_s = took if self.batches == 1 else 0.8 * self.typical_batch_s + 0.2 * took

    async def _gather(self, loop) -> None:
        """Wait until the calls of every active generation are queued (see the module docstring)."""
        if self.expected is None or self.max_wait_s <= 0:
            return
        deadline = loop.time() + min(self.max_wait_s, 0.5 * self.typical_batch_s)
        while len(self._queue) < min(self.expected(), self.max_batch_size):
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except TimeoutError:
                return

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def _set_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)

"""Continuous micro-batching of tier calls.

Calls that arrive while the model is busy wait in a queue; when the model frees up, all
of them (up to ``max_batch_size``) run in one forward pass. Nothing waits on a timer, so
a lone generation pays no batching delay, and under load batches fill by themselves.
The batch function runs on one worker thread, off the event loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor


class MicroBatcher:
    def __init__(self, run_batch: Callable[[list], list], max_batch_size: int = 8, name: str = "batch",
                 threads: int | None = None):
        self.run_batch = run_batch
        self.max_batch_size = max_batch_size
        self._queue: list[tuple[object, asyncio.Future]] = []
        # torch's OpenMP thread count is per thread: set it on the worker that runs the batches
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name,
                                            initializer=_set_threads if threads else None,
                                            initargs=(threads,) if threads else ())
        self._worker: asyncio.Task | None = None
        self.batches = 0
        self.items = 0
        self.busy_seconds = 0.0

    @property
    def queued(self) -> int:
        return len(self._queue)

    async def submit(self, item):
        """Run ``item`` in the next batch and return its result (or raise its error)."""
        future = asyncio.get_running_loop().create_future()
        self._queue.append((item, future))
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        while self._queue:
            batch = [entry for entry in self._queue[: self.max_batch_size] if not entry[1].cancelled()]
            del self._queue[: self.max_batch_size]
            if not batch:
                continue
            start = loop.time()
            try:
                results = await loop.run_in_executor(self._executor, self.run_batch, [item for item, _ in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"batch function returned {len(results)} results for {len(batch)} calls")
                for (_, future), result in zip(batch, results):
                    if not future.done():
                        future.set_result(result)
            except BaseException as err:  # the whole batch failed (or the worker was cancelled): tell every caller
                for _, future in batch:
                    if not future.done():
                        future.set_exception(err if isinstance(err, Exception) else RuntimeError("batch cancelled"))
                if not isinstance(err, Exception):
                    raise
            finally:
                self.batches += 1
                self.items += len(batch)
                self.busy_seconds += loop.time() - start

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def _set_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)

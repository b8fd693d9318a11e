"""The tier deployments: ``Drafter``, ``SlimVerifier`` and ``FullVerifier``.

Each replica hosts one tier runner (models floor) and its KV pool, allocated at start: one
slot per generation it serves, keyed by generation id. A new generation is admitted when a
slot is free (or held by a finished generation, kept as a reusable prefix); otherwise it waits
in a bounded queue and is refused with 429 / RESOURCE_EXHAUSTED. Running generations are never
evicted. Concurrent calls of
different generations are micro-batched into one forward pass. Every call carries the
generation's committed tokens, so a replica without the cache (new replica, idle expiry,
failover) rebuilds it from token ids and continues.

A replica takes calls only once it is warm: its start ends with one tiny call through the runner
(a 1-token block after a 1-token prompt, cache released), so the first request pays no lazy
initialisation, and ``ready`` then answers the readiness checks (serving/health.py).

``TierServer`` is a plain class: tests construct it with an injected runner and no Ray;
``serving.app`` turns it into three Ray Serve deployments.
"""

from __future__ import annotations

import asyncio
import copy
import os
import time
import uuid
from typing import Any

from via_sd_ray.config import EngineConfig, parse_config
from via_sd_ray.core.engine import Draft, DraftCall, VerifyCall
from via_sd_ray.core.policy import Tier
from via_sd_ray.core.sampling import SamplingParams
from via_sd_ray.core.verify import Verdict
from via_sd_ray.errors import Overloaded
from via_sd_ray.models.runner import Pending
from via_sd_ray.serving.batcher import MicroBatcher
from via_sd_ray.serving.priority import apply_niceness

DEPLOYMENT_OF_TIER = {"drafter": "Drafter", "slim": "SlimVerifier", "full": "FullVerifier"}


class TierServer:
    def __init__(self, args: dict[str, Any] | EngineConfig, tier: str, runner=None, metrics=None,
                 warm_up: bool | None = None):
        """``warm_up``: run the warm-up call at the end of the start (None: only for a runner built here;
        an injected runner is the caller's)."""
        from via_sd_ray.models.tiers import build_tier, placed
        from via_sd_ray.serving.tp_workers import accelerator_ids, gpu_share, shard_launcher

        self.config = args if isinstance(args, EngineConfig) else parse_config(args)
        if runner is None:  # device: auto is the GPU Ray gave this replica, or the CPU
            self.config = placed(self.config, accelerator_ids())
            share = gpu_share()  # num_gpus: 0.25
            if self.config.serving.gpu_memory_share is None and share is not None:
                serving = self.config.serving.model_copy(update={"gpu_memory_share": share})
                self.config = self.config.model_copy(update={"serving": serving})
        apply_niceness(self.config.serving.niceness)  # before the batcher's and torch's threads start
        if self.config.threads:
            import torch

            torch.set_num_threads(self.config.threads)
        self.tier = tier
        self.runner = runner if runner is not None else build_tier(self.config, tier, shard_launcher(self.config, tier))
        self.metrics = metrics if metrics is not None else _default_metrics(tier)
        self.batcher = MicroBatcher(self._run_batch, self.config.serving.batch_size, name=tier,
                                    threads=self.config.threads, expected=self._active_generations,
                                    max_wait_s=self.config.serving.batch_wait_ms / 1000,
                                    again=lambda result: isinstance(result, Pending))
        self.started = time.monotonic()
        self.failed: str | None = None  # set when the runner raised: the health check reports it
        self._sweeper: asyncio.Task | None = None
        self.batch_profile: dict[int, list[float]] = {}  # batch size -> [batches, seconds, forward tokens]
        self._last_report: tuple[float, float] | None = None  # (loop time, busy seconds) at the last report
        # generation id -> when it was released: a call of a cancelled generation still in a batch (or
        # arriving after its release) must not leave a cache behind
        self._released: dict[str, float] = {}
        self.warm_up_s: float | None = None  # how long the warm-up call took; None: none ran
        self.admission_waiting = 0  # new generations waiting for a KV slot
        self.admitted_after_wait = 0  # generations that got a slot after waiting for one
        self._slot_freed: asyncio.Condition | None = None
        self._reported: dict[str, int] = {}  # slot event counters as last exported
        if warm_up if warm_up is not None else runner is None:
            self._warm_up()

    def _warm_up(self) -> None:
        """One greedy call through the runner, as small as a call gets: draft 1 token, or verify a 1-token
        block, after a 1-token prompt. Its cache is released and the runner's counters are put back:
        the warm-up is not traffic."""
        start = time.perf_counter()
        stats = getattr(self.runner, "stats", None)
        counters = copy.deepcopy(vars(stats)) if stats is not None else None
        generation_id = f"warm-up-{uuid.uuid4().hex[:8]}"
        params = SamplingParams(max_tokens=1)
        if self.tier == "drafter":
            self.runner.draft_batch([DraftCall(generation_id=generation_id, committed=[0], k=1, params=params,
                                               seed=0)])
        else:
            self.runner.verify_batch([VerifyCall(tier=Tier(self.tier), generation_id=generation_id, committed=[0],
                                                 block=[0], params=params, seed=0)])
        self.runner.release(generation_id)
        clear = getattr(self.runner, "clear_prefixes", None)
        if clear is not None:
            clear()  # the warm-up's one token is no prefix worth a slot
        if counters is not None:
            vars(stats).update(counters)
        self.warm_up_s = time.perf_counter() - start

    async def ready(self) -> bool:
        """Whether this replica can serve: its model is loaded and warm (a replica takes no call before
        its start ends) and its runner has not failed. Cheap: the readiness checks call it often."""
        return self.failed is None

    async def draft(self, call: DraftCall) -> Draft:
        return await self._call(call)

    async def verify(self, call: VerifyCall) -> Verdict:
        return await self._call(call)

    def _active_generations(self, window_s: float = 2.0) -> int:
        """Generations that called this replica in the last ``window_s`` seconds."""
        last_used = getattr(self.runner, "last_used", {})
        now = time.monotonic()
        return sum(1 for t in list(last_used.values()) if now - t < window_s)

    async def release(self, generation_id: str) -> None:
        """Drop the generation's KV cache (it finished or was cancelled), now and after any of its
        calls still in a batch."""
        self._released[generation_id] = time.monotonic()
        self.runner.release(generation_id)
        await self._notify_slot_freed()

    async def _notify_slot_freed(self) -> None:
        if self._slot_freed is not None:
            async with self._slot_freed:
                self._slot_freed.notify_all()

    async def _admit(self, generation_id: str) -> None:
        """Wait (bounded) until the generation holds or has reserved a KV slot; refuse it with ``Overloaded``
        (429 / RESOURCE_EXHAUSTED, Retry-After) when the wait queue is full or the wait times out.
        Running generations are never evicted to make room."""
        admit = getattr(self.runner, "admit", None)
        if admit is None or admit(generation_id):
            return
        serving = self.config.serving
        slots = self.runner.pool.slots
        if self.admission_waiting >= serving.admission_queue:
            self.runner.stats.refused += 1
            raise Overloaded(f"{self.tier} tier: all {slots} KV slots are in use and {self.admission_waiting} "
                             "generations wait for one; retry later")
        if self._slot_freed is None:
            self._slot_freed = asyncio.Condition()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + serving.admission_timeout_s
        self.admission_waiting += 1
        try:
            async with self._slot_freed:
                while not admit(generation_id):
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        self.runner.stats.refused += 1
                        raise Overloaded(f"{self.tier} tier: all {slots} KV slots stayed in use for "
                                         f"{serving.admission_timeout_s:g} s (serving.admission_timeout_s); "
                                         "retry later")
                    try:
                        await asyncio.wait_for(self._slot_freed.wait(), remaining)
                    except TimeoutError:
                        pass
            self.admitted_after_wait += 1
        finally:
            self.admission_waiting -= 1

    async def _call(self, call):
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep())
        start = time.perf_counter()
        try:
            await self._admit(call.generation_id)
            return await self.batcher.submit(call)
        finally:
            if call.generation_id in self._released:  # released while queued: its slot freed after the batch
                await self._notify_slot_freed()
            if self.metrics:
                self.metrics.observe_call(self.tier, time.perf_counter() - start)
                self._export_slots()

    def _export_slots(self) -> None:
        counts = getattr(self.runner, "slot_counts", None)
        if counts is None:
            return
        self.metrics.set_slots(self.tier, counts(), self.admission_waiting)
        stats = self.runner.stats
        now = {"refused": stats.refused, "preemption": stats.preemptions, "prefix_tokens": stats.prefix_tokens}
        self.metrics.count_slot_events(self.tier, {k: v - self._reported.get(k, 0) for k, v in now.items()})
        self._reported = now

    async def _sweep(self) -> None:
        """Drop caches idle for longer than ``serving.cache_idle_timeout_s``."""
        idle = self.config.serving.cache_idle_timeout_s
        expire = getattr(self.runner, "expire", None)
        while expire is not None:
            await asyncio.sleep(min(idle / 2, 5.0))
            if expire(idle):
                await self._notify_slot_freed()
            now = time.monotonic()
            for generation_id, when in list(self._released.items()):
                if now - when > idle:
                    del self._released[generation_id]

    def _run_batch(self, calls: list) -> list:
        if self.metrics:
            self.metrics.observe_batch(self.tier, len(calls))
        before = _cache_counters(self.runner)
        start, tokens_before = time.perf_counter(), _forward_tokens(self.runner)
        try:
            partial = {"partial": True} if hasattr(self.runner, "admit") else {}
            if isinstance(calls[0], DraftCall):
                return self.runner.draft_batch(calls, **partial)
            return self.runner.verify_batch(calls, **partial)
        except Exception as err:
            if not isinstance(err, ValueError):  # a bad request is not a broken runner
                self.failed = f"{type(err).__name__}: {err}"
            raise
        finally:
            for call in calls:
                if call.generation_id in self._released:  # released while its call was queued or running
                    self.runner.release(call.generation_id)
            entry = self.batch_profile.setdefault(len(calls), [0, 0.0, 0])
            entry[0] += 1
            entry[1] += time.perf_counter() - start
            entry[2] += _forward_tokens(self.runner) - tokens_before
            if self.metrics:
                after = _cache_counters(self.runner)
                self.metrics.count_cache(self.tier, after[0] - before[0], after[1] - before[1])

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """The tier's load, pushed to the Serve controller for ``autoscaling.TierLoadPolicy``.

        ``busy_fraction``: share of the time since the last report the model spent in forward
        passes; ``queued_calls``: calls waiting or running now; ``active_generations``: those that
        called in the last 2 s.
        """
        now = asyncio.get_running_loop().time()
        busy = self.batcher.busy_seconds_now(now)
        last_time, last_busy = self._last_report or (now - 1e-9, busy)
        self._last_report = (now, busy)
        return {
            "busy_fraction": min(1.0, max(0.0, (busy - last_busy) / max(now - last_time, 1e-9))),
            "queued_calls": float(self.batcher.queued + self.batcher.running),
            "active_generations": float(self._active_generations()),
        }

    def stats(self) -> dict[str, Any]:
        """What this replica holds and has done (tests, debugging, autoscaling signals)."""
        caches = getattr(self.runner, "caches", {})
        runner_stats = getattr(self.runner, "stats", None)
        pool = getattr(self.runner, "pool", None)
        slots = self.runner.slot_counts() if hasattr(self.runner, "slot_counts") else {}
        return {
            "tier": self.tier,
            "replica": _replica_id(),
            "pid": os.getpid(),
            "node_id": _node_id(),
            "caches": len(caches),
            "cache_bytes": getattr(self.runner, "cache_bytes", 0),
            "kv_pool": pool.describe() if pool is not None else None,
            "slot_tokens": pool.slot_tokens if pool is not None else None,
            **slots,
            "admission_waiting": self.admission_waiting,
            "admitted_after_wait": self.admitted_after_wait,
            "queued": self.batcher.queued,
            "batches": self.batcher.batches,
            "batched_calls": self.batcher.items,
            "busy_seconds": self.batcher.busy_seconds,
            "uptime_s": time.monotonic() - self.started,
            "warm_up_s": self.warm_up_s,
            "batch_profile": {size: {"batches": n, "seconds": sec, "forward_tokens": tok}
                              for size, (n, sec, tok) in sorted(self.batch_profile.items())},
            **({k: getattr(runner_stats, k) for k in vars(runner_stats)} if runner_stats else {}),
        }

    async def check_health(self) -> None:
        """Called by Serve; raising marks the replica unhealthy and Serve replaces it."""
        if self.failed:
            raise RuntimeError(f"{DEPLOYMENT_OF_TIER[self.tier]} model runner is broken: {self.failed}")
        check = getattr(self.runner, "check_health", None)
        if check is not None:  # e.g. a tensor-parallel worker died: the whole replica must be replaced
            await asyncio.to_thread(check)


def _replica_id() -> str:
    try:
        from ray import serve

        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # not inside a Serve replica (unit tests)
        return "local"


def _node_id() -> str | None:
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None


def _forward_tokens(runner) -> int:
    stats = getattr(runner, "stats", None)
    return stats.forward_tokens if stats else 0


def _cache_counters(runner) -> tuple[int, int]:
    stats = getattr(runner, "stats", None)
    return (stats.cache_hits, stats.cache_misses) if stats else (0, 0)


def _default_metrics(tier: str):
    try:
        import ray

        if not ray.is_initialized():
            return None
    except ImportError:
        return None
    from via_sd_ray.serving.metrics import TierMetrics

    return TierMetrics()

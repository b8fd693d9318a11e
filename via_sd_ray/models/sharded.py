"""Tensor-parallel verifier tiers in lock-step: rank 0 drives, the other ranks follow.

A verifier tier with ``tensor_parallel_size`` = tp runs on tp ranks, each holding a shard of
the model (``models.ds_engine``). Rank 0 lives in the tier's own process (a Serve replica, or
``LocalEngine``); the runners, the router and the other tiers see only it. Ranks 1..tp-1 are
``ShardWorker``s, started by a ``ShardLauncher`` (Ray actors when served, ``serving.tp_workers``).
Every rank builds the same decoder stacks from the same ``ShardSpec``, and every forward pass
needs all of them (its all-reduces), so rank 0's ``ShardedStack`` sends each pass to the
workers, in order, and runs its own part alongside:

    ShardCall(stack, dropped=[cache ids], rows=[ShardRow(cache id, keep, capacity, tokens)], num_logits)

Each rank keeps its own KV caches, of its own KV heads: the caches are sharded like the
weights. A worker's cache ``c`` mirrors rank 0's cache ``c`` token for token, so a row only
says how many cached tokens to keep (rank 0's rollback) and which tokens to run. Caches that
rank 0 drops (a slot reused by another generation) are named in the next call's ``dropped``.

A rank that fails or dies breaks the group for good (its peers' collectives fail or time
out): ``ShardFailure`` then reaches the tier, whose health check fails, and the host restarts
the whole tier replica, workers included.
"""

from __future__ import annotations

import itertools
import threading
import weakref
from collections import deque
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from via_sd_ray.config import VerifierConfig
from via_sd_ray.models.decoder import DecoderStack
from via_sd_ray.models.ds_engine import Rendezvous
from via_sd_ray.models.kv_cache import KVCache


class ShardFailure(RuntimeError):
    """A tensor-parallel rank failed, died or stopped answering; the group cannot go on."""


@dataclass(frozen=True)
class ShardSpec:
    """What every rank of a group builds (it travels to the workers)."""

    model: VerifierConfig
    load_layers: list[int] | None  # decoder layers read from the checkpoint (None: all)
    stacks: dict[str, list[int] | None]  # stack name -> layers of the loaded model it runs (None: all)
    rendezvous: Rendezvous | None  # None: a single rank
    threads: int | None = None  # torch intra-op threads per rank


@dataclass(frozen=True)
class ShardRow:
    cache_id: int
    keep: int  # cached tokens rank 0's cache kept (after rollback) before this pass
    capacity: int  # initial capacity, for a cache this pass starts
    tokens: list[int]


@dataclass(frozen=True)
class ShardCall:
    stack: str
    dropped: list[int]
    rows: list[ShardRow]
    num_logits: list[int]


class ShardPeers(Protocol):
    """Rank 0's handle on ranks 1..tp-1."""

    def ready(self) -> None:
        """Return once every worker has built its shard; raise ``ShardFailure`` if one could not."""

    def submit(self, call: ShardCall) -> Any:
        """Send ``call`` to every worker (each runs its calls in the order sent); return a handle for ``wait``."""

    def wait(self, pending: Any) -> None:
        """Return once every worker ran the call; raise ``ShardFailure`` if one failed or died."""

    def check(self) -> None:
        """Raise ``ShardFailure`` if a worker is gone (the tier's health check)."""

    def close(self) -> None:
        """Stop the workers."""


class ShardLauncher(Protocol):
    def address(self) -> str:
        """An address of rank 0's host that every worker can reach."""

    def start(self, spec: ShardSpec) -> ShardPeers:
        """Start ranks 1..world_size-1 building ``spec`` without waiting for them."""


class ShardWorker:
    """One rank > 0: runs rank 0's calls on its shard, keeping mirror caches."""

    def __init__(self, stacks: dict[str, DecoderStack]):
        self.stacks = stacks
        self.caches: dict[int, KVCache] = {}

    def run(self, call: ShardCall) -> None:
        for cache_id in call.dropped:
            self.caches.pop(cache_id, None)
        stack = self.stacks[call.stack]
        caches = []
        for row in call.rows:
            cache = self.caches.get(row.cache_id)
            if cache is None:
                cache = self.caches[row.cache_id] = stack.new_cache(row.capacity)
            if len(cache) < row.keep:
                raise ShardFailure(f"cache {row.cache_id} holds {len(cache)} tokens, rank 0 keeps {row.keep}: "
                                   "the ranks are out of step")
            cache.crop(row.keep)
            caches.append(cache)
        stack.forward_batch([row.tokens for row in call.rows], caches, call.num_logits)


class ShardGroup:
    """Rank 0's side of a group: numbers its caches and runs each pass on every rank, one pass at a time."""

    def __init__(self, peers: ShardPeers):
        self.peers = peers
        self._ids = itertools.count()
        self._cache_ids: weakref.WeakKeyDictionary[KVCache, int] = weakref.WeakKeyDictionary()
        self._dropped: deque[int] = deque()  # appended by finalizers, from whichever thread drops a cache
        self._lock = threading.Lock()

    def track(self, cache: KVCache) -> KVCache:
        cache_id = next(self._ids)
        self._cache_ids[cache] = cache_id
        weakref.finalize(cache, self._dropped.append, cache_id)
        return cache

    def run(self, name: str, stack: DecoderStack, token_lists: list[list[int]], caches: list[KVCache],
            num_logits: list[int]) -> list[torch.Tensor]:
        with self._lock:
            dropped = []
            while self._dropped:
                dropped.append(self._dropped.popleft())
            rows = [ShardRow(self._cache_ids[cache], len(cache), cache.capacity, list(tokens))
                    for cache, tokens in zip(caches, token_lists)]
            pending = self.peers.submit(ShardCall(name, dropped, rows, list(num_logits)))
            try:
                logits = stack.forward_batch(token_lists, caches, num_logits)
            except ValueError:  # a bad request (context window): every rank refused it alike, before any collective
                try:
                    self.peers.wait(pending)
                except ShardFailure:
                    pass  # the workers' copies of the same error; a dead worker shows in the next call or check
                raise
            except Exception as err:  # a collective failed: a peer crashed, or the group timed out
                raise ShardFailure(f"rank 0's part of a tensor-parallel pass failed: {err}") from err
            self.peers.wait(pending)
            return logits

    def check(self) -> None:
        self.peers.check()

    def close(self) -> None:
        self.peers.close()


class ShardedStack:
    """Rank 0's decoder stack of a tensor-parallel group: a ``DecoderStack`` whose passes all ranks run.

    Everything but the passes and new caches (context window, dtype, layers, the model) is rank
    0's stack's own.
    """

    def __init__(self, stack: DecoderStack, name: str, group: ShardGroup):
        self.stack = stack
        self.name = name
        self.group = group

    mirrored = True  # every rank keeps a mirror of each cache: a prefix cannot be copied on rank 0 alone

    def new_cache(self, capacity: int = 256) -> KVCache:
        return self.group.track(self.stack.new_cache(capacity))

    def pool_cache(self, pool, slot: int) -> KVCache:
        """A cache over a slot of rank 0's pool; the other ranks mirror it in caches of their own."""
        return self.group.track(pool.cache(slot))

    def forward(self, token_ids: list[int], cache: KVCache, num_logits: int) -> torch.Tensor:
        return self.forward_batch([token_ids], [cache], [num_logits])[0]

    __call__ = forward

    def forward_batch(self, token_lists: list[list[int]], caches: list[KVCache],
                      num_logits: list[int]) -> list[torch.Tensor]:
        return self.group.run(self.name, self.stack, token_lists, caches, num_logits)

    def check_health(self) -> None:
        """Raise ``ShardFailure`` if a rank of the group is gone."""
        self.group.check()

    def __getattr__(self, name: str):
        if name == "stack":  # not set yet (unpickling, copying)
            raise AttributeError(name)
        return getattr(self.stack, name)

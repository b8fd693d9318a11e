"""A tier runner: one decoder stack serving drafts or verifications for many generations.

The runner keeps a KV cache per generation id, within a memory budget (least recently
used caches are evicted). Every call carries the generation's committed tokens, so the
runner brings the cache in line before it runs the block:

    rollback  crop the cache to its longest common prefix with the committed tokens
              (rejected draft tokens, or a cache that ran ahead of an escalation);
    catch-up  run the committed tokens the cache lacks in the same forward pass as the
              block (blocks accepted directly, tokens another tier recovered, or, after an
              eviction or on a new replica, the whole sequence: a rebuild).

A verifier also rolls back its rejected tail right after verifying, so its cache ends
each call as a prefix of the new committed tokens.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch

from via_sd_ray.core.engine import Draft, DraftCall, VerifyCall
from via_sd_ray.core.sampling import generator, sample, warp
from via_sd_ray.core.verify import Verdict, verify
from via_sd_ray.models.decoder import DecoderStack
from via_sd_ray.models.kv_cache import KVCache


@dataclass
class RunnerStats:
    calls: int = 0
    forward_tokens: int = 0  # tokens run through the stack (catch-up + block)
    cache_hits: int = 0  # calls that found this generation's cache
    cache_misses: int = 0  # calls that started a cache: a new generation here, or one evicted / lost
    evictions: int = 0


class TierRunner:
    def __init__(self, stack: DecoderStack, max_cache_bytes: int | None = None, name: str = "tier"):
        self.stack = stack
        self.name = name
        self.max_cache_bytes = max_cache_bytes
        self.caches: OrderedDict[str, KVCache] = OrderedDict()
        self.stats = RunnerStats()
        self._lock = threading.Lock()  # calls of one runner run one at a time

    @property
    def max_context(self) -> int:
        return self.stack.max_context

    @property
    def cache_bytes(self) -> int:
        return sum(c.nbytes for c in self.caches.values())

    def release(self, generation_id: str) -> None:
        """Drop the generation's cache (it finished or was cancelled)."""
        self.caches.pop(generation_id, None)

    def draft(self, call: DraftCall) -> Draft:
        with self._lock:
            cache, missing = self._sync(call.generation_id, call.committed)
            logits = self._forward(missing, cache, 1)  # [1, V]
            gen = None if call.params.greedy else generator(call.seed)
            tokens, token_probs, rows = [], [], []
            for i in range(call.k):
                probs = warp(logits, call.params)[0]  # [V]
                token = int(probs.argmax()) if gen is None else sample(probs, gen)
                tokens.append(token)
                token_probs.append(float(probs[token]))
                if gen is not None:
                    rows.append(probs)
                if i == call.k - 1 or token_probs[-1] < call.stop_threshold:
                    break
                logits = self._forward([token], cache, 1)
            return Draft(tokens, token_probs, None if gen is None else torch.stack(rows))  # [k, V]

    def verify(self, call: VerifyCall) -> Verdict:
        with self._lock:
            cache, missing = self._sync(call.generation_id, call.committed)
            block = list(call.block)
            logits = self._forward(missing + block, cache, len(block) + 1)  # [K + 1, V]
            gen = None if call.params.greedy else generator(call.seed)
            verdict = verify(block, logits, call.params, call.draft_probs, gen, call.return_probs)
            cache.crop(len(call.committed) + verdict.accepted)  # roll back the rejected tail now
            return verdict

    def _forward(self, token_ids: list[int], cache: KVCache, num_logits: int):
        self.stats.forward_tokens += len(token_ids)
        return self.stack(token_ids, cache, num_logits)

    def _sync(self, generation_id: str, committed: list[int]) -> tuple[KVCache, list[int]]:
        """The generation's cache, rolled back to what it shares with ``committed``, and the
        committed tokens it lacks (at least the last one, whose logits the call needs)."""
        self.stats.calls += 1
        cache = self.caches.get(generation_id)
        if cache is None:
            cache = self.stack.new_cache(capacity=max(256, len(committed) + 64))
            self.caches[generation_id] = cache
            self.stats.cache_misses += 1
        else:
            self.stats.cache_hits += 1
        self.caches.move_to_end(generation_id)
        keep = min(cache.common_prefix(committed), len(committed) - 1)
        cache.crop(keep)
        self._evict(protect=generation_id)
        return cache, list(committed[keep:])

    def _evict(self, protect: str) -> None:
        if self.max_cache_bytes is None:
            return
        while self.cache_bytes > self.max_cache_bytes and len(self.caches) > 1:
            victim = next(iter(self.caches))
            if victim == protect:
                self.caches.move_to_end(victim)
                victim = next(iter(self.caches))
            del self.caches[victim]
            self.stats.evictions += 1

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
import time
from collections import OrderedDict
from dataclasses import dataclass

import torch

from via_sd_ray.core.engine import Draft, DraftCall, VerifyCall
from via_sd_ray.core.sampling import generator, sample, suppress, token_logprobs, warp
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
        self.last_used: dict[str, float] = {}  # monotonic time of each cache's last call
        self.stats = RunnerStats()
        self._lock = threading.Lock()  # calls of one runner run one at a time

    @property
    def max_context(self) -> int:
        return self.stack.max_context

    @property
    def cache_bytes(self) -> int:
        return sum(c.nbytes for c in self.caches.values())

    def check_health(self) -> None:
        """Raise if the stack cannot run any more (a tensor-parallel rank of it is gone)."""
        check = getattr(self.stack, "check_health", None)
        if check is not None:
            check()

    def release(self, generation_id: str) -> None:
        """Drop the generation's cache (it finished or was cancelled)."""
        with self._lock:
            self.caches.pop(generation_id, None)
            self.last_used.pop(generation_id, None)

    def expire(self, idle_seconds: float) -> int:
        """Drop caches unused for ``idle_seconds`` (a generation that moved to another replica, or whose
        release never arrived); returns how many."""
        with self._lock:
            now = time.monotonic()
            stale = [g for g, t in self.last_used.items() if now - t > idle_seconds]
            for generation_id in stale:
                self.caches.pop(generation_id, None)
                del self.last_used[generation_id]
            return len(stale)

    def draft(self, call: DraftCall) -> Draft:
        return self.draft_batch([call])[0]

    def verify(self, call: VerifyCall) -> Verdict:
        return self.verify_batch([call])[0]

    def draft_batch(self, calls: list[DraftCall]) -> list[Draft]:
        """Draft for several generations, one forward pass per draft position for all of them."""
        with self._lock:
            return _by_unique_generation(calls, self._draft_batch)

    def verify_batch(self, calls: list[VerifyCall]) -> list[Verdict]:
        """Verify the blocks of several generations in one forward pass."""
        with self._lock:
            return _by_unique_generation(calls, self._verify_batch)

    def _draft_batch(self, calls: list[DraftCall]) -> list[Draft]:
        synced = [self._sync(c.generation_id, c.committed) for c in calls]
        caches = [cache for cache, _ in synced]
        logits = self._forward_batch([missing for _, missing in synced], caches, [1] * len(calls))
        gens = [None if c.params.greedy else generator(c.seed) for c in calls]
        tokens: list[list[int]] = [[] for _ in calls]
        token_probs: list[list[float]] = [[] for _ in calls]
        rows: list[list[torch.Tensor]] = [[] for _ in calls]
        logprobs: list[list] = [[] for _ in calls]
        active = list(range(len(calls)))
        while True:
            going = []
            for i, row_logits in zip(active, logits):
                call = calls[i]
                masked = suppress(row_logits, call.suppress_ids, call.suppress_rows - len(tokens[i]))
                probs = warp(masked, call.params)[0]  # [V]
                token = int(probs.argmax()) if gens[i] is None else sample(probs, gens[i])
                tokens[i].append(token)
                token_probs[i].append(float(probs[token]))
                if call.params.logprobs is not None:
                    logprobs[i] += token_logprobs(row_logits, [token], call.params.logprobs)
                if gens[i] is not None:
                    rows[i].append(probs)
                if len(tokens[i]) < calls[i].k and token_probs[i][-1] >= calls[i].stop_threshold:
                    going.append(i)
            if not going:
                break
            logits = self._forward_batch([[tokens[i][-1]] for i in going], [caches[i] for i in going],
                                         [1] * len(going))
            active = going
        return [Draft(tokens[i], token_probs[i], torch.stack(rows[i]) if rows[i] else None,  # [k, V]
                      logprobs[i] if calls[i].params.logprobs is not None else None)
                for i in range(len(calls))]

    def _verify_batch(self, calls: list[VerifyCall]) -> list[Verdict]:
        synced = [self._sync(c.generation_id, c.committed) for c in calls]
        blocks = [list(c.block) for c in calls]
        logits = self._forward_batch([missing + block for (_, missing), block in zip(synced, blocks)],
                                     [cache for cache, _ in synced], [len(b) + 1 for b in blocks])
        verdicts = []
        for call, (cache, _), block, row_logits in zip(calls, synced, blocks, logits):  # row_logits: [K + 1, V]
            gen = None if call.params.greedy else generator(call.seed)
            verdict = verify(block, row_logits, call.params, call.draft_probs, gen, call.return_probs,
                             call.suppress_ids, call.suppress_rows)
            cache.crop(len(call.committed) + verdict.accepted)  # roll back the rejected tail now
            verdicts.append(verdict)
        return verdicts

    def _forward_batch(self, token_lists: list[list[int]], caches: list[KVCache], num_logits: list[int]):
        self.stats.forward_tokens += sum(len(t) for t in token_lists)
        # sampling and verification run on the CPU: seeded CPU generators give the same tokens on every device
        return [rows.to("cpu") for rows in self.stack.forward_batch(token_lists, caches, num_logits)]

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
        self.last_used[generation_id] = time.monotonic()
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
            self.last_used.pop(victim, None)
            self.stats.evictions += 1


def _by_unique_generation(calls: list, run) -> list:
    """``run`` over ``calls`` in rounds where each generation appears once (a generation's calls
    must see each other's cache updates in order), results in the order of ``calls``."""
    results: list = [None] * len(calls)
    pending = list(range(len(calls)))
    while pending:
        seen, now, later = set(), [], []
        for i in pending:
            (later if calls[i].generation_id in seen else now).append(i)
            seen.add(calls[i].generation_id)
        for i, result in zip(now, run([calls[i] for i in now])):
            results[i] = result
        pending = later
    return results

"""A tier runner: one decoder stack serving drafts or verifications for many generations.

The runner keeps a KV cache per generation id, in one slot of its KV pool (admission:
a new generation gets a free slot or a finished one's; running ones are never evicted; a
finished generation's slot stays as a reusable prefix). Every call carries the generation's
committed tokens, so the runner brings the cache in line before it runs the block:

    rollback  crop the cache to its longest common prefix with the committed tokens
              (rejected draft tokens, or a cache that ran ahead of an escalation);
    catch-up  run the committed tokens the cache lacks in the same forward pass as the
              block (blocks accepted directly, tokens another tier recovered, or, after
              an idle expiry or on a new replica, the whole sequence: a rebuild; a cached prefix
              shortens it). A catch-up longer than the prefill chunk runs one chunk per pass.

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
from via_sd_ray.core.sampling import (
    Proposal,
    as_float32,
    exponentials,
    generator,
    race,
    sampled_proposal,
    suppress,
    token_logprobs,
    warp,
)
from via_sd_ray.core.verify import Verdict, read_verdict, verify_on_device
from via_sd_ray.errors import Overloaded
from via_sd_ray.models import qmm
from via_sd_ray.models.decoder import SHORT_ROW, DecoderStack
from via_sd_ray.models.kv_cache import KVCache, KVPool


@dataclass
class RunnerStats:
    calls: int = 0
    forward_tokens: int = 0  # tokens run through the stack (catch-up + block)
    cache_hits: int = 0  # calls that found this generation's cache
    cache_misses: int = 0  # calls that started a cache: a new generation here, or one lost (moved, expired)
    prefix_hits: int = 0  # new caches that started from a cached prefix
    prefix_tokens: int = 0  # tokens those prefixes held (prefill they saved)
    prefill_chunks: int = 0  # chunks of a long catch-up run ahead of its call (chunked prefill)
    preemptions: int = 0  # calls of a running generation whose cache was gone (expired while it ran)
    refused: int = 0  # new generations refused a slot: every slot held by a running generation


class Pending:
    """The result of a call whose catch-up runs on in later passes (chunked prefill): run it again."""

    def __repr__(self) -> str:
        return "PENDING"


PENDING = Pending()


class TierRunner:
    def __init__(self, stack: DecoderStack, pool: KVPool | None = None, name: str = "tier",
                 prefill_chunk: int | None = None, prefix_min_tokens: int | None = 16,
                 proposal_top_k: int = 64, host_steps: bool | None = None):
        """``pool``: the slots caches live in (None: each cache owns storage that grows; nothing is kept
        after a release). ``prefill_chunk``: most catch-up tokens of one call in one pass (None: all).
        ``prefix_min_tokens``: shortest cached prefix a new generation copies (None: never copy; a
        finished generation's own slot is still taken over). ``proposal_top_k``: the tokens of a sampled
        proposal (the drafter samples from the renormalised top-k of its warped distribution; 0: all).
        ``host_steps``: decide a block's early stop after every draft position (default: on a CPU, where
        reading a number back is no transfer)."""
        self.stack = stack
        self.name = name
        self.pool = pool
        self.prefill_chunk = prefill_chunk
        self.proposal_top_k = proposal_top_k
        # a call's read-back is float32, exact for token ids below 2**24
        assert stack.vocab_size < 2**24, f"{name} tier: {stack.vocab_size} vocabulary ids, at most 2**24 read back"
        # rejection sampling's draws as one C++ op where the stack runs the C++ ops (bit for bit the torch ones)
        self.draws = qmm.residual_draws if stack.fused_cpu_ops else None
        # a drafter whose LM head scores a frequency-ranked subset of the vocabulary (models/draft_vocab.py)
        self.draft_vocab = getattr(getattr(stack, "hf_model", None), "draft_vocab", None)
        self.host_steps = stack.device.type == "cpu" if host_steps is None else host_steps
        self.prefix_min_tokens = None if getattr(stack, "mirrored", False) else prefix_min_tokens
        self.caches: dict[str, KVCache] = {}  # running generations
        self.last_used: dict[str, float] = {}  # monotonic time of each running cache's last call
        self.slot_of: dict[str, int] = {}  # running generation -> its pool slot
        self.finished: OrderedDict[int, KVCache] = OrderedDict()  # slot -> a finished cache kept as prefix, LRU
        self.free: list[int] = list(range(pool.slots - 1, -1, -1)) if pool is not None else []
        self.reserved: set[str] = set()  # admitted generations whose first call has not run yet
        self.started: set[str] = set()  # generations that hold or held a cache here and were not released
        self.stats = RunnerStats()
        self._lock = threading.Lock()  # calls of one runner run one at a time
        self._continuing = False  # a call whose catch-up ran ahead runs on (``_run``)
        self._slots = threading.Lock()  # slot bookkeeping (admission runs off the batch thread)

    @property
    def max_context(self) -> int:
        limit = self.stack.max_context
        return limit if self.pool is None else min(limit, self.pool.slot_tokens)

    @property
    def cache_bytes(self) -> int:
        if self.pool is not None:
            return self.pool.nbytes
        return sum(c.nbytes for c in list(self.caches.values()))

    def slot_counts(self) -> dict[str, int]:
        """Pool slots held by running generations, kept as finished prefixes, and free."""
        with self._slots:
            total = self.pool.slots if self.pool is not None else 0
            return {"slots": total, "slots_used": len(self.slot_of) + len(self.reserved),
                    "slots_prefix": len(self.finished), "slots_free": len(self.free)}

    def check_health(self) -> None:
        """Raise if the stack cannot run any more (a tensor-parallel rank of it is gone)."""
        check = getattr(self.stack, "check_health", None)
        if check is not None:
            check()

    # -- slots -------------------------------------------------------------------------------

    def admit(self, generation_id: str) -> bool:
        """Reserve a slot for the generation (if it holds none): False when every slot is held or reserved
        by a running generation. Which slot it gets is decided by its first call (a finished one holding
        its prefix, a free one, or the least recently used finished one). Without a pool: True."""
        if self.pool is None:
            return True
        with self._slots:
            if generation_id in self.slot_of or generation_id in self.reserved:
                return True
            if len(self.slot_of) + len(self.reserved) >= self.pool.slots:
                return False
            self.reserved.add(generation_id)
            return True

    def release(self, generation_id: str) -> None:
        """The generation finished or was cancelled: its slot's cache stays as a reusable prefix."""
        with self._slots:
            self._retire(generation_id)
            self.started.discard(generation_id)

    def expire(self, idle_seconds: float) -> int:
        """Retire caches unused for ``idle_seconds`` (a generation that moved to another replica, or whose
        release never arrived); returns how many."""
        with self._slots:
            now = time.monotonic()
            stale = [g for g, t in list(self.last_used.items()) if now - t > idle_seconds]
            for generation_id in stale:
                self._retire(generation_id)
            return len(stale)

    def clear_prefixes(self) -> None:
        """Forget every finished generation's cached prefix (their slots become free)."""
        with self._slots:
            self.free.extend(self.finished)
            self.finished.clear()

    def _retire(self, generation_id: str) -> None:
        self.reserved.discard(generation_id)
        cache = self.caches.pop(generation_id, None)
        self.last_used.pop(generation_id, None)
        slot = self.slot_of.pop(generation_id, None)
        if slot is None:
            return
        if cache is not None and len(cache):
            self.finished[slot] = cache
        else:
            self.free.append(slot)

    def _cache_for(self, generation_id: str, committed: list[int]) -> KVCache:
        """A new cache for the generation: its slot's (admitted now if it was not), starting from the best
        cached prefix of ``committed``: a finished generation's slot is taken over as it is, a running
        one's prefix is copied."""
        if self.pool is None:
            return self.stack.new_cache(capacity=max(256, len(committed) + 64))
        if not self.admit(generation_id):
            self.stats.refused += 1
            raise Overloaded(f"{self.name} tier: all {self.pool.slots} KV slots are held by running generations; "
                             "retry later")
        with self._slots:
            self.reserved.discard(generation_id)
            limit = len(committed) - 1  # the last committed token runs again: its logits are needed
            best, best_len = None, 0
            for candidate in [*self.finished.items(), *((self.slot_of[g], c) for g, c in self.caches.items())]:
                n = min(candidate[1].common_prefix(committed), limit)
                if n > best_len:
                    best, best_len = candidate, n
            if best is not None and best[0] in self.finished:  # take the finished slot over as it is
                slot, cache = best
                del self.finished[slot]
                self.slot_of[generation_id] = slot
                cache.crop(best_len)
                self._count_prefix(best_len)
                return cache
            slot = self.free.pop() if self.free else self.finished.popitem(last=False)[0]
            self.slot_of[generation_id] = slot
            cache = self.stack.pool_cache(self.pool, slot)
            if best is not None and self.prefix_min_tokens is not None and best_len >= self.prefix_min_tokens:
                cache.copy_prefix(best[1], best_len)  # a running generation's prefix
                self._count_prefix(best_len)
            return cache

    def _count_prefix(self, tokens: int) -> None:
        if tokens:
            self.stats.prefix_hits += 1
            self.stats.prefix_tokens += tokens

    # -- calls -------------------------------------------------------------------------------

    def draft(self, call: DraftCall) -> Draft:
        return self.draft_batch([call])[0]

    def verify(self, call: VerifyCall) -> Verdict:
        return self.verify_batch([call])[0]

    def draft_batch(self, calls: list[DraftCall], partial: bool = False) -> list[Draft | Pending]:
        """Draft for several generations, one forward pass per draft position for all of them.
        ``partial``: a call whose catch-up is longer than ``prefill_chunk`` gets ``PENDING`` after one
        chunk (the caller runs it again with later batches); otherwise every call is run to its end."""
        return self._run(calls, self._draft_batch, partial)

    def verify_batch(self, calls: list[VerifyCall], partial: bool = False) -> list[Verdict | Pending]:
        """Verify the blocks of several generations in one forward pass (``partial``: see ``draft_batch``)."""
        return self._run(calls, self._verify_batch, partial)

    def _run(self, calls: list, run, partial: bool) -> list:
        # inference mode for the whole call, not only its passes: its picking and verification ops then skip
        # autograd's version counters too (~20 us of a tiny model's sampled verify call)
        with self._lock, torch.inference_mode():
            results = _by_unique_generation(calls, run)
            while True:  # a catch-up that ran ahead without only its last token ends now, partial or not
                again = [i for i, r in enumerate(results) if r is PENDING and (not partial or self._one_left(calls[i]))]
                if not again:
                    return results
                self._continuing = True  # the same calls: not counted again
                try:
                    for i, result in zip(again, _by_unique_generation([calls[i] for i in again], run)):
                        results[i] = result
                finally:
                    self._continuing = False

    def _one_left(self, call) -> bool:
        """Whether the generation's cache lacks only the last committed token of ``call`` (its catch-up ran
        ahead of it, see ``_ahead``): the rest of the call is a decode-shaped pass, not another prefill chunk."""
        cache = self.caches.get(call.generation_id)
        return cache is not None and len(call.committed) - cache.common_prefix(call.committed) == 1

    def _ahead(self, missing: list[int], tail: int) -> int:
        """How many of a call's catch-up tokens (``missing``, before ``tail`` block tokens) run ahead of it in a
        pass of their own (0: none). A call whose pass would be longer than a decode-shaped row
        (``SHORT_ROW``) or the prefill chunk runs its catch-up ahead, at most a chunk at a time and never its
        last token: the pass with the logits is then always [last committed token] + block, as a one-token step
        is, and each position is computed by the same code whatever block rides along (on packed CPU models,
        bit for bit: greedy sd equals ar in bf16). A catch-up of one token never runs ahead."""
        limit = SHORT_ROW if self.prefill_chunk is None else min(SHORT_ROW, self.prefill_chunk)
        if len(missing) <= 1 or len(missing) + tail <= limit:
            return 0
        return min(len(missing) - 1, self.prefill_chunk or len(missing))

    def _draft_batch(self, calls: list[DraftCall]) -> list[Draft | Pending]:
        """Draft on the stack's device: each position's token is picked there and fed to the next pass
        as a device tensor; the blocks, their probabilities and (sampling) proposals come back in one
        host transfer at the end. A block ends early after a token below its ``stop_threshold``: where
        the device is the host (``host_steps``) that is decided after every position, elsewhere every
        row drafts its ``k`` tokens and the block is cut on the host (a decode step per block instead
        of a transfer per position)."""
        synced = [self._sync(c.generation_id, c.committed) for c in calls]
        ahead = [self._ahead(missing, 0) for _, missing in synced]
        chunked = [n > 0 for n in ahead]
        caches = [cache for cache, _ in synced]
        rows = [missing[:n] if n else missing for (_, missing), n in zip(synced, ahead)]
        logits = self.stack.forward_batch(rows, caches, [0 if chunk else 1 for chunk in chunked])
        self.stats.forward_tokens += sum(len(r) for r in rows)
        self.stats.prefill_chunks += sum(chunked)
        device = self.stack.device
        active = [i for i in range(len(calls)) if not chunked[i]]
        gens = {i: generator(calls[i].seed) for i in active if not calls[i].params.greedy}
        races: dict[int, torch.Tensor] = {}  # per sampled row: Exp(1) draws [k, W], drawn at its first position
        tokens: dict[int, list[torch.Tensor]] = {i: [] for i in active}  # per row: a [1] token per position
        probs: dict[int, list[torch.Tensor]] = {i: [] for i in active}  # per row: its [1] probability
        proposals: dict[int, list[Proposal]] = {i: [] for i in gens}
        raw: dict[int, list[torch.Tensor]] = {i: [] for i in active}  # [1, V] logits per position (logprobs)
        logits = [logits[i] for i in active]
        host_steps = self.host_steps and any(c.stop_threshold > 0 for c in calls)
        start = {i: len(caches[i]) for i in active}  # where the cache records its draft tokens
        vocab = self.draft_vocab  # a narrowed head: its rows are these vocabulary ids
        banned = {i: vocab.rows(calls[i].suppress_ids) if vocab else calls[i].suppress_ids for i in active}
        while active:
            for i, row_logits in zip(active, logits):
                call, step = calls[i], len(tokens[i])
                masked = suppress(row_logits, banned[i], call.suppress_rows - step)
                if i not in gens:
                    prob, token = warp(masked, call.params).max(dim=-1)  # [1] each
                    if vocab:
                        token = vocab.ids[token]
                else:  # the block's token drawn from the proposal it ships, by an exponential race over its ids
                    proposal = sampled_proposal(masked, call.params, self.proposal_top_k)
                    if vocab:
                        proposal = Proposal(vocab.ids[proposal.ids], proposal.probs)
                    if step == 0:
                        races[i] = exponentials(gens[i], (call.k, proposal.ids.shape[1]), device)
                    choice = race(proposal.probs, races[i][step])  # [1, 1]
                    token, prob = proposal.ids.gather(1, choice).view(1), proposal.probs.gather(1, choice).view(1)
                    proposals[i].append(proposal)
                tokens[i].append(token)
                probs[i].append(prob)
                if call.params.logprobs is not None:
                    raw[i].append(vocab.widen(row_logits) if vocab else row_logits)
            if host_steps:  # no transfer: the device is the host
                last = torch.cat([probs[i][-1] for i in active]).tolist()
                going = [i for i, p in zip(active, last)
                         if len(tokens[i]) < calls[i].k and p >= calls[i].stop_threshold]
            else:
                going = [i for i in active if len(tokens[i]) < calls[i].k]
            if not going:
                break
            feed = [tokens[i][-1] for i in going]
            logits = self.stack.forward_batch(feed, [caches[i] for i in going], [1] * len(going))
            self.stats.forward_tokens += len(going)
            active = going
        drafts = self._read_drafts(calls, tokens, probs, proposals)
        for i, (draft, ran) in drafts.items():
            caches[i].fill(start[i], ran)  # the draft tokens the cache holds, now known on the host
            if len(ran) > len(draft.tokens) - 1:  # drafted past an early stop: keep only what the block holds
                caches[i].crop(start[i] + max(len(draft.tokens) - 1, 0))
            if calls[i].params.logprobs is not None:  # their own transfer, only when asked for
                draft.logprobs = token_logprobs(torch.cat(raw[i])[: len(draft.tokens)], draft.tokens,
                                                calls[i].params.logprobs)
        return [PENDING if chunked[i] else drafts[i][0] for i in range(len(calls))]

    def _read_drafts(self, calls: list[DraftCall], tokens: dict, probs: dict, proposals: dict
                     ) -> dict[int, tuple[Draft, list[int]]]:
        """The drafts of ``tokens`` and ``probs`` (per row, a [1] device tensor per position) read back in one
        transfer, each with the tokens that ran through the stack (all drafted tokens but the last)."""
        back = _ReadBack()
        props = {i: Proposal.cat(proposals[i]) for i in tokens if proposals.get(i)}
        for i in tokens:
            back.add(torch.cat(tokens[i]))
            back.add(torch.cat(probs[i]))
            if i in props:
                back.add_proposal(props[i])
        back.fetch()
        drafts = {}
        for i in tokens:
            n = len(tokens[i])
            ids, token_probs = [int(t) for t in back.take(n).tolist()], back.take(n).tolist()
            keep = _cut(token_probs, calls[i].stop_threshold)
            draft = Draft(ids[:keep], token_probs[:keep])
            if i in props:
                draft.probs = back.take_proposal(props[i])[:keep]
            drafts[i] = (draft, ids[: n - 1])
        return drafts

    def _verify_batch(self, calls: list[VerifyCall]) -> list[Verdict | Pending]:
        synced = [self._sync(c.generation_id, c.committed) for c in calls]
        blocks = [list(c.block) for c in calls]
        ahead = [self._ahead(missing, len(block)) for (_, missing), block in zip(synced, blocks)]
        chunked = [n > 0 for n in ahead]
        rows = [missing[:n] if n else missing + block for (_, missing), block, n in zip(synced, blocks, ahead)]
        logits = self.stack.forward_batch(rows, [cache for cache, _ in synced],
                                          [0 if chunk else len(b) + 1 for b, chunk in zip(blocks, chunked)])
        self.stats.forward_tokens += sum(len(r) for r in rows)
        self.stats.prefill_chunks += sum(chunked)
        done = [i for i in range(len(calls)) if not chunked[i]]  # a prefill chunk ran for the others: no logits
        back, on_device = _ReadBack(), {}
        for i in done:
            call = calls[i]
            gen = None if call.params.greedy else generator(call.seed)
            on_device[i] = verify_on_device(blocks[i], logits[i], call.params, call.draft_probs, gen,
                                            call.return_probs, call.suppress_ids, call.suppress_rows,
                                            self.proposal_top_k, self.draws)
            for part in on_device[i].parts:
                back.add(part)
            if on_device[i].proposal is not None:
                back.add_proposal(on_device[i].proposal)
        back.fetch()
        verdicts: list[Verdict | Pending] = [PENDING] * len(calls)
        for i in done:
            call, verdict_on_device = calls[i], on_device[i]
            values = back.take(verdict_on_device.size).tolist()
            proposal = None if verdict_on_device.proposal is None else back.take_proposal(verdict_on_device.proposal)
            verdict = read_verdict(blocks[i], values, call.params, verdict_on_device, proposal, logits[i])
            synced[i][0].crop(len(call.committed) + verdict.accepted)  # roll back the rejected tail now
            verdicts[i] = verdict
        return verdicts

    def _sync(self, generation_id: str, committed: list[int]) -> tuple[KVCache, list[int]]:
        """The generation's cache, rolled back to what it shares with ``committed``, and the
        committed tokens it lacks (at least the last one, whose logits the call needs)."""
        self.stats.calls += not self._continuing
        cache = self.caches.get(generation_id)
        if cache is None:
            if generation_id in self.started:
                self.stats.preemptions += 1
            cache = self._cache_for(generation_id, committed)
            self.caches[generation_id] = cache
            self.started.add(generation_id)
            self.stats.cache_misses += 1
        else:
            self.stats.cache_hits += not self._continuing
        self.last_used[generation_id] = time.monotonic()
        keep = min(cache.common_prefix(committed), len(committed) - 1)
        cache.crop(keep)
        return cache, list(committed[keep:])


class _ReadBack:
    """Device tensors of one tier call gathered for its one device -> host transfer (``fetch``), then
    taken back on the host in the order they were added."""

    def __init__(self):
        self.parts: list[torch.Tensor] = []
        self.host: torch.Tensor | None = None
        self.offset = 0

    def add(self, tensor: torch.Tensor) -> None:
        # float32 holds token ids exactly (below 2**24: every vocabulary is), and probabilities as computed
        self.parts.append(as_float32(tensor if tensor.dim() == 1 else tensor.flatten()))

    def add_proposal(self, proposal: Proposal) -> None:
        self.add(proposal.ids)
        self.add(proposal.probs)

    def fetch(self) -> None:
        if self.parts:  # the one device -> host transfer of the call
            self.host = (self.parts[0] if len(self.parts) == 1 else torch.cat(self.parts)).cpu()

    def take(self, n: int) -> torch.Tensor:
        out = self.host[self.offset : self.offset + n]
        self.offset += n
        return out

    def take_proposal(self, like: Proposal) -> Proposal:
        """A proposal shaped as ``like`` (the device one that was added)."""
        n, width = like.ids.shape
        return Proposal(self.take(n * width).view(n, width).long(), self.take(n * width).view(n, width))


def _cut(token_probs: list[float], stop_threshold: float) -> int:
    """Length of a block that ends after its first token below ``stop_threshold``."""
    for n, p in enumerate(token_probs, 1):
        if p < stop_threshold:
            return n
    return len(token_probs)


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

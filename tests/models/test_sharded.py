"""The lock-step protocol of tensor-parallel verifier tiers (``models.sharded``), without DeepSpeed or
Ray: a worker given rank 0's calls, in order, keeps caches holding exactly rank 0's tokens and K/V
through generations with rollback, catch-up, slot reuse and release; bad requests leave the group
usable; a dead worker fails the tier's calls and its health check."""

from __future__ import annotations

import pytest
import torch

from via_sd_ray.core.engine import VerifyCall
from via_sd_ray.core.policy import RouterPolicy, Tier
from via_sd_ray.core.sampling import SamplingParams
from via_sd_ray.models.decoder import DecoderStack
from via_sd_ray.models.runner import TierRunner
from via_sd_ray.models.sharded import ShardedStack, ShardFailure, ShardGroup, ShardWorker
from via_sd_ray.models.tiny import tiny_model

PROMPTS = ["a", "hello world", "def add(a, b):\n    return a + b\n"]
POLICIES = [RouterPolicy(mode="sd", block_size=4), RouterPolicy(mode="via-sd", block_size=4, lossless=True,
                                                                  slim_threshold=0.0)]
SLIM_LAYERS = [0, 1, 3]


class InlinePeers:
    """Runs each call on in-process workers as it is submitted. No collectives here: every "rank" holds
    the whole model, so a worker's caches must equal rank 0's exactly."""

    def __init__(self, workers):
        self.workers = workers
        self.calls = []
        self.dead = False

    def ready(self):
        pass

    def submit(self, call):
        self.calls.append(call)
        errors = []
        for worker in self.workers:
            try:
                worker.run(call)
            except Exception as err:
                errors.append(err)
        return errors

    def wait(self, errors):
        self.check()
        if errors:
            raise ShardFailure(f"worker failed: {errors[0]!r}") from errors[0]

    def check(self):
        if self.dead:
            raise ShardFailure("a tensor-parallel worker failed to answer a health check: actor died")

    def close(self):
        pass


def worker_stacks():
    model = tiny_model("verifier", dtype=torch.float64)
    return {"full": DecoderStack(model), "slim": DecoderStack(model, SLIM_LAYERS)}


@pytest.fixture
def sharded_engine(build_tiny_engine):
    """A tiny engine whose verifier tiers drive one in-process worker, and that worker."""
    engine = build_tiny_engine()
    worker = ShardWorker(worker_stacks())
    group = ShardGroup(InlinePeers([worker]))
    engine.full = TierRunner(ShardedStack(engine.full.stack, "full", group), engine.full.stack.new_pool(4, 1024),
                             name="full", prefill_chunk=64)
    engine.slim = TierRunner(ShardedStack(engine.slim.stack, "slim", group), engine.slim.stack.new_pool(4, 1024),
                             name="slim", prefill_chunk=64)
    return engine, group, worker


def assert_in_step(engine, group, worker):
    """Every live cache of rank 0 has its mirror, starting with the same tokens and K/V (a verifier rolls
    back its rejected tail after its pass; the mirror does so at the next pass, told by ``keep``); the
    worker holds nothing else but caches rank 0 dropped since its last pass."""
    live = {}
    for runner in (engine.full, engine.slim):
        for cache in [*runner.caches.values(), *runner.finished.values()]:  # running, and kept as prefixes
            mirror = worker.caches[group._cache_ids[cache]]
            n = len(cache)
            assert mirror.token_ids[:n] == cache.token_ids
            assert torch.equal(mirror.data[..., :n, :], cache.data[..., :n, :])
            live[group._cache_ids[cache]] = cache
    assert set(worker.caches) <= set(live) | set(group._dropped)  # refcounting dropped them at once


def test_worker_caches_stay_in_step_and_outputs_are_unchanged(sharded_engine, tiny_engine, monkeypatch):
    engine, group, worker = sharded_engine
    checked = []

    def dispatch(call, times, _dispatch=engine._dispatch):
        reply = _dispatch(call, times)
        if isinstance(call, VerifyCall):
            assert_in_step(engine, group, worker)
            checked.append(call.tier)
        return reply

    monkeypatch.setattr(engine, "_dispatch", dispatch)
    for text in PROMPTS:
        ids = engine.encode(text)
        for policy in POLICIES:
            for params in (SamplingParams(max_tokens=32), SamplingParams(max_tokens=32, temperature=1.0, seed=4)):
                expected = tiny_engine.generate(ids, params, policy)
                assert engine.generate(ids, params, policy).token_ids == expected.token_ids
    assert {Tier.SLIM, Tier.FULL} <= set(checked)
    assert any(call.dropped for call in group.peers.calls)  # releases reached the worker
    assert_in_step(engine, group, worker)


def test_caches_of_reused_slots_are_mirrored():
    """One slot for two generations: each call after the other's release takes the slot over with a new
    cache (the old one's mirror is dropped); the first ids share a prefix, which is taken over in place."""
    worker = ShardWorker(worker_stacks())
    group = ShardGroup(InlinePeers([worker]))
    stack = ShardedStack(worker_stacks()["full"], "full", group)
    runner = TierRunner(stack, stack.new_pool(1, 256), name="full", prefill_chunk=8)
    committed = {"a": list(range(10, 30)), "b": list(range(10, 15)) + list(range(40, 45))}
    for step in range(4):
        for generation_id, ids in committed.items():
            verdict = runner.verify(VerifyCall(Tier.FULL, generation_id, ids, [ids[-1], 7, 8],
                                               SamplingParams(max_tokens=64), seed=step))
            ids.extend(verdict.tokens([ids[-1], 7, 8]))
            (cache,) = runner.caches.values()
            mirror = worker.caches[group._cache_ids[cache]]
            assert mirror.token_ids[: len(cache)] == cache.token_ids
            assert torch.equal(mirror.data[..., : len(cache), :], cache.data[..., : len(cache), :])
            assert set(worker.caches) <= {group._cache_ids[cache]} | set(group._dropped)
            runner.release(generation_id)
    assert runner.stats.cache_misses == 8 and runner.stats.prefix_hits == 7  # the 5 shared tokens, after the first
    assert runner.stats.prefill_chunks > 0 and runner.stats.preemptions == 0


def test_a_bad_request_is_refused_by_every_rank_and_the_group_goes_on(sharded_engine):
    engine, group, worker = sharded_engine
    too_long = list(range(200)) * 6  # past the tiny models' 1024-token context window
    call = VerifyCall(Tier.FULL, "g", too_long, [1, 2], SamplingParams(max_tokens=8), seed=0)
    with pytest.raises(ValueError, match="context window"):
        engine.full.verify(call)
    ids = engine.encode("hello world")
    assert engine.generate(ids, SamplingParams(max_tokens=16), POLICIES[1]).token_ids
    assert_in_step(engine, group, worker)


def test_a_dead_worker_fails_the_tier_and_its_health_check(sharded_engine):
    engine, group, _ = sharded_engine
    engine.full.check_health()  # all well
    group.peers.dead = True
    with pytest.raises(ShardFailure, match="health check"):
        engine.full.check_health()
    with pytest.raises(ShardFailure):
        engine.generate(engine.encode("hello"), SamplingParams(max_tokens=8), RouterPolicy(mode="ar"))

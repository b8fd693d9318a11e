"""The tier deployments' class without Ray: a TierServer over a tiny float64 runner answers draft and
verify calls through its micro-batcher, batches concurrent generations without changing their
verdicts, drops caches on release and when idle, and reports a broken runner in its health check."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from tests.serving.conftest import SERVING_ARGS
from tests.serving.fakes import fresh_runners
from via_sd_ray.config import parse_config
from via_sd_ray.core.engine import DraftCall, VerifyCall
from via_sd_ray.core.policy import Tier
from via_sd_ray.core.sampling import SamplingParams
from via_sd_ray.serving.tiers import TierServer

GREEDY = SamplingParams(max_tokens=64)
SAMPLED = SamplingParams(max_tokens=64, temperature=0.9, top_k=40, seed=5)
PROMPTS = ["def fibonacci(n):", "Write a haiku about caches.", "import numpy as np\n"]


def run(coro, limit_s: float = 60.0):
    """``asyncio.run`` with a bound: a lost wake-up fails the test instead of hanging it."""
    return asyncio.run(asyncio.wait_for(coro, limit_s))


class RecordingRunner:
    """A tier runner that records its batch sizes and raises ``fail`` while it is set."""

    def __init__(self, runner):
        self.runner = runner
        self.batch_sizes: list[int] = []
        self.fail: BaseException | None = None

    def draft_batch(self, calls, **options):
        return self._run(self.runner.draft_batch, calls, options)

    def verify_batch(self, calls, **options):
        return self._run(self.runner.verify_batch, calls, options)

    def _run(self, method, calls, options):
        self.batch_sizes.append(len(calls))
        if self.fail is not None:
            raise self.fail
        return method(calls, **options)

    def __getattr__(self, name):  # caches, stats, release, expire, ...
        return getattr(self.runner, name)


@pytest.fixture
def build(local_engine):
    """``build(tier, config=None) -> (server, recording runner, a second fresh runner of the tier)``."""
    servers = []

    def make(tier, config=None):
        config = config or local_engine.config
        runner = RecordingRunner(fresh_runners(local_engine, config)[tier])
        server = TierServer(config, tier, runner=runner, metrics=None)
        servers.append(server)
        return server, runner, fresh_runners(local_engine, config)[tier]

    yield make
    for server in servers:
        server.batcher.shutdown()


def committed(local_engine, i: int) -> list[int]:
    return local_engine.encode(f"{PROMPTS[i % 3]} #{i}")


def verify_calls(local_engine, n: int) -> list[VerifyCall]:
    """Verify calls of ``n`` generations, greedy and sampled, with drafter blocks (partly accepted)."""
    drafter = fresh_runners(local_engine)["drafter"]
    calls = []
    for i in range(n):
        params = GREEDY if i % 2 == 0 else SAMPLED
        ids = committed(local_engine, i)
        draft = drafter.draft(DraftCall(f"g{i}", ids, 4, params, seed=100 + i))
        calls.append(VerifyCall(Tier.FULL, f"g{i}", ids, draft.tokens, params, seed=200 + i,
                                draft_probs=draft.probs, return_probs=i % 3 == 0))
    return calls


def assert_same_verdict(got, want):
    assert (got.accepted, got.next_token) == (want.accepted, want.next_token)
    assert got.confidence == pytest.approx(want.confidence, abs=1e-6)
    assert (got.probs is None) == (want.probs is None)
    if want.probs is not None:
        assert torch.equal(got.probs.ids, want.probs.ids)
        assert float((got.probs.probs - want.probs.probs).abs().max()) < 1e-6


def test_draft_and_verify_through_the_batcher(local_engine, build):
    drafter, _, reference_drafter = build("drafter")
    full, _, reference_full = build("full")
    ids = committed(local_engine, 0)
    for params in (GREEDY, SAMPLED):
        call = DraftCall("g0", ids, 4, params, seed=3)
        draft = run(drafter.draft(call))
        want = reference_drafter.draft(call)
        assert draft.tokens == want.tokens and len(draft.tokens) == 4
        assert draft.token_probs == pytest.approx(want.token_probs, abs=1e-6)
        assert (draft.probs is None) == params.greedy
        verify = VerifyCall(Tier.FULL, "g0", ids, draft.tokens, params, seed=4, draft_probs=draft.probs)
        assert_same_verdict(run(full.verify(verify)), reference_full.verify(verify))
    assert drafter.batcher.batches == 2 and full.batcher.batches == 2


def test_concurrent_verifies_are_batched_with_the_same_verdicts(local_engine, build):
    server, runner, reference = build("full")
    calls = verify_calls(local_engine, 6)

    async def all_at_once():
        return await asyncio.gather(*(server.verify(call) for call in calls))

    verdicts = run(all_at_once())
    assert server.batcher.batches < len(calls) and max(runner.batch_sizes) > 1
    assert server.batcher.items == len(calls)
    assert sum(v.accepted for v in verdicts) > 0 and any(v.accepted < len(c.block) for v, c in zip(verdicts, calls))
    for call, verdict in zip(calls, verdicts):
        assert_same_verdict(verdict, reference.verify(call))


def test_release_drops_the_cache(local_engine, build):
    server, runner, _ = build("slim")
    calls = [VerifyCall(Tier.SLIM, c.generation_id, c.committed, c.block, c.params, c.seed, c.draft_probs)
             for c in verify_calls(local_engine, 2)]

    async def scenario():
        for call in calls:
            await server.verify(call)
        assert set(runner.caches) == {"g0", "g1"}
        await server.release("g0")
        assert set(runner.caches) == {"g1"} and "g0" not in runner.last_used
        await server.release("never-seen")  # a release that went elsewhere is harmless
        assert set(runner.caches) == {"g1"}
        return server.stats()

    assert run(scenario())["caches"] == 1


def test_a_call_of_a_released_generation_leaves_no_cache(local_engine, build):
    """A cancelled generation's release can overtake its last call (queued, or running in a batch)."""
    server, runner, _ = build("full")
    first, other = verify_calls(local_engine, 2)

    async def scenario():
        await server.release(first.generation_id)  # arrives first
        queued = asyncio.ensure_future(server.verify(first))
        await server.verify(other)
        await queued
        return set(runner.caches)

    assert run(scenario()) == {other.generation_id}


def test_stats_fields(local_engine, build):
    server, runner, _ = build("full")
    calls = verify_calls(local_engine, 3)

    async def scenario():
        await asyncio.gather(*(server.verify(call) for call in calls))
        await server.verify(calls[0])  # a second call of g0: a cache hit
        return server.stats()

    stats = run(scenario())
    assert stats["tier"] == "full" and stats["replica"] == "local"
    assert stats["caches"] == 3 and stats["cache_bytes"] == runner.pool.nbytes > 0
    assert stats["slots_used"] == 3 and stats["slots_free"] == stats["slots"] - 3 and stats["slots_prefix"] == 0
    assert stats["kv_pool"].startswith(f"{runner.pool.slots} slots x ") and stats["admission_waiting"] == 0
    assert stats["queued"] == 0
    assert stats["batches"] == server.batcher.batches == len(runner.batch_sizes)
    assert stats["batched_calls"] == 4 and stats["busy_seconds"] > 0 and stats["uptime_s"] >= 0
    assert stats["calls"] == 4 and stats["cache_misses"] == 3 and stats["cache_hits"] == 1
    assert stats["preemptions"] == 0 and stats["refused"] == 0 and stats["forward_tokens"] > 0


@pytest.mark.parametrize(("tier", "deployment"), [("drafter", "Drafter"), ("slim", "SlimVerifier"),
                                                  ("full", "FullVerifier")])
def test_health_check_reports_a_broken_runner(local_engine, build, tier, deployment):
    server, runner, _ = build(tier)
    ids = committed(local_engine, 0)
    call = (DraftCall("g0", ids, 4, GREEDY, seed=1) if tier == "drafter"
            else VerifyCall(Tier(tier), "g0", ids, [65, 66], GREEDY, seed=1))
    method = server.draft if tier == "drafter" else server.verify

    async def scenario():
        await server.check_health()
        await method(call)
        runner.fail = ValueError("block: expected token ids, received garbage")
        with pytest.raises(ValueError):
            await method(call)
        await server.check_health()  # a bad request is not a broken runner
        runner.fail = RuntimeError("CUDA error: device lost")
        with pytest.raises(RuntimeError, match="device lost"):
            await method(call)
        with pytest.raises(RuntimeError) as err:
            await server.check_health()
        return str(err.value)

    message = run(scenario())
    assert deployment in message and "RuntimeError: CUDA error: device lost" in message


def test_runner_expire_drops_idle_caches(local_engine, build):
    server, runner, _ = build("full")
    calls = verify_calls(local_engine, 2)

    async def scenario():
        for call in calls:
            await server.verify(call)

    run(scenario())
    assert runner.expire(60.0) == 0 and set(runner.caches) == {"g0", "g1"}
    runner.last_used["g0"] -= 120.0  # g0 idle for two minutes
    assert runner.expire(60.0) == 1
    assert set(runner.caches) == {"g1"} and set(runner.last_used) == {"g1"}


def test_server_sweeps_idle_caches(local_engine, build):
    config = parse_config({**SERVING_ARGS, "serving": {**SERVING_ARGS["serving"], "cache_idle_timeout_s": 0.2}})
    server, runner, _ = build("full", config)
    call = verify_calls(local_engine, 1)[0]

    async def scenario():
        await server.verify(call)
        used = runner.last_used["g0"]  # not idle yet
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 5.0
        while "g0" in runner.caches:
            assert loop.time() < deadline, "the idle cache was never swept"
            await asyncio.sleep(0.01)
        return time.monotonic() - used

    assert run(scenario()) > 0.2  # not before it was idle for cache_idle_timeout_s


def test_prompt_lookup_drafter_behind_a_tier_server(local_engine):
    from via_sd_ray.core.ngram import PromptLookupDrafter

    server = TierServer(local_engine.config, "drafter", runner=PromptLookupDrafter(3, 1), metrics=None)
    ids = [10, 11, 12, 13, 14, 10, 11]  # "10 11" occurred before, followed by 12 13 14

    async def scenario():
        draft = await server.draft(DraftCall("g0", ids, 3, GREEDY, seed=1))
        await server.release("g0")
        await server.check_health()
        return draft

    draft = run(scenario())
    server.batcher.shutdown()
    assert draft.tokens == [12, 13, 14] and draft.token_probs == [0.5, 0.5, 0.5]
    stats = server.stats()
    assert stats["caches"] == 0 and stats["cache_bytes"] == 0 and stats["batches"] == 1
    assert "calls" not in stats  # a model-free drafter keeps no runner statistics


def slot_config(local_engine, **serving):
    args = local_engine.config.model_dump(mode="json")
    args["serving"] = {**args["serving"], "kv_max_slots": 2, **serving}
    return parse_config({**args, "profile": None})


def test_generations_over_the_slot_count_wait_for_a_slot_then_run(local_engine, build):
    """2 slots, 5 generations at once: 2 run, 3 wait; each release lets one more in; none is evicted and
    every verdict is the one it gets alone."""
    server, runner, reference = build("full", slot_config(local_engine, admission_timeout_s=30))
    calls = verify_calls(local_engine, 5)
    expected = []
    for call in calls:
        expected.append(reference.verify(call))
        reference.release(call.generation_id)
    done: list[str] = []

    async def one(call):
        verdict = await server.verify(call)
        done.append(call.generation_id)
        await asyncio.sleep(0.05)  # holds its slot a moment, then finishes
        await server.release(call.generation_id)
        return verdict

    async def scenario():
        tasks = [asyncio.create_task(one(c)) for c in calls]
        await asyncio.sleep(0.02)
        while server.batcher.running or server.batcher.queued:
            await asyncio.sleep(0.005)
        waiting = server.admission_waiting  # the three that found no slot
        return await asyncio.gather(*tasks), waiting

    verdicts, waiting = run(scenario())
    assert waiting == 3 and len(done) == 5
    for got, want in zip(verdicts, expected):
        assert_same_verdict(got, want)
    stats = server.stats()
    assert stats["slots_used"] == 0 and stats["refused"] == 0 and stats["preemptions"] == 0


def test_a_generation_that_finds_no_slot_in_time_is_refused_with_429(local_engine, build):
    from via_sd_ray.errors import Overloaded
    from via_sd_ray.serving.ingress import status_of

    server, runner, _ = build("full", slot_config(local_engine, admission_timeout_s=0.2, admission_queue=1))
    calls = verify_calls(local_engine, 4)

    async def scenario():
        await asyncio.gather(*(server.verify(c) for c in calls[:2]))  # both slots held by running generations
        outcomes = await asyncio.gather(server.verify(calls[2]), server.verify(calls[3]), return_exceptions=True)
        held = sorted(runner.caches)
        await server.release(calls[0].generation_id)
        late = await server.verify(calls[3])  # a slot is free now
        return outcomes, held, late

    outcomes, held, late = run(scenario())
    assert all(isinstance(o, Overloaded) for o in outcomes)
    messages = sorted(o.message for o in outcomes)
    assert "generations wait for one" in messages[0] and "stayed in use for 0.2 s" in messages[1]
    assert status_of(outcomes[0])[:2] == (429, "RESOURCE_EXHAUSTED")
    assert held == ["g0", "g1"] and late.accepted >= 0
    assert server.stats()["refused"] == 2 and runner.stats.preemptions == 0


def test_a_long_prompt_is_prefilled_in_chunks_beside_other_generations(local_engine, build):
    """A 900-token catch-up with 64-token chunks goes back to the queue after every chunk, so a short
    generation's calls run in the batches between them instead of after the whole prefill."""
    server, runner, reference = build("full", slot_config(local_engine, prefill_chunk_tokens=64, kv_max_slots=4))
    long_ids = (local_engine.encode("def long_function(x):\n    return x\n") * 60)[:900]
    long_call = VerifyCall(Tier.FULL, "long", long_ids, [65, 66], GREEDY, seed=1)
    short = verify_calls(local_engine, 1)[0]

    async def scenario():
        task = asyncio.create_task(server.verify(long_call))
        await asyncio.sleep(0)
        short_verdict = await server.verify(short)
        finished_first = not task.done()
        return await task, short_verdict, finished_first

    long_verdict, short_verdict, finished_first = run(scenario())
    assert finished_first  # the short call did not wait for the whole prefill
    assert_same_verdict(long_verdict, reference.verify(long_call))
    assert_same_verdict(short_verdict, reference.verify(short))
    assert runner.stats.prefill_chunks >= 900 // 64 - 1
    assert max(runner.batch_sizes) >= 2  # a chunk shared a pass with the short generation

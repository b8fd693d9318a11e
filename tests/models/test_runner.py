"""Tier runners' KV caches through real generations: after every call each cache holds exactly
the tokens it should, with the K/V a fresh prefill of them gives; rollback, catch-up in one
forward pass, release and rebuilding from token ids."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, replace

import pytest
import torch

from via_sd_ray.core.engine import DraftCall, Generation, VerifyCall, drive
from via_sd_ray.core.policy import RouterPolicy, Tier
from via_sd_ray.core.sampling import SamplingParams
from via_sd_ray.models.decoder import DecoderStack
from via_sd_ray.models.kv_cache import KVCache
from via_sd_ray.models.local import TierTimes
from via_sd_ray.models.runner import TierRunner

PROMPT_TEXT = "hello world"
GREEDY = SamplingParams(max_tokens=40, ignore_eos=True)  # every run is max_tokens long
SAMPLED = SamplingParams(max_tokens=40, temperature=1.0, seed=3, ignore_eos=True)
VIA_SD = RouterPolicy(mode="via-sd", block_size=4)


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def assert_matches_prefill(stack: DecoderStack, cache: KVCache) -> None:
    """The cache's K/V equal those of one fresh forward pass over its token ids."""
    n = len(cache)
    fresh = stack.new_cache()
    stack(cache.token_ids, fresh, 1)
    torch.testing.assert_close(cache.data[..., :n, :], fresh.data[..., :n, :], rtol=1e-9, atol=1e-10)


class CountingStack:
    """A decoder stack that records the length of every forward pass it runs."""

    def __init__(self, stack: DecoderStack):
        self.stack = stack
        self.passes: list[int] = []

    def __call__(self, token_ids, cache, num_logits):
        self.passes.append(len(token_ids))
        return self.stack(token_ids, cache, num_logits)

    def forward_batch(self, token_lists, caches, num_logits):
        self.passes.extend(len(t) for t in token_lists)  # one pass per generation in the batch
        return self.stack.forward_batch(token_lists, caches, num_logits)

    def __getattr__(self, name):
        return getattr(self.stack, name)


@dataclass
class CallRecord:
    tier: str
    call: DraftCall | VerifyCall
    reply: object
    cached_before: list[int]  # the tier's cached token ids when the call arrived
    passes: list[int]  # forward passes the call ran
    forward_tokens: int  # RunnerStats deltas
    calls: int


@dataclass
class CheckedRun:
    """Drives a generation through the engine's runners, checking every cache after every call and block."""

    engine: object
    records: list[CallRecord] = field(default_factory=list)
    events: Counter = field(default_factory=Counter)

    def runner(self, call) -> tuple[str, TierRunner]:
        if isinstance(call, DraftCall):
            return "drafter", self.engine.drafter
        return call.tier.value, self.engine.slim if call.tier is Tier.SLIM else self.engine.full

    def dispatch(self, call):
        name, runner = self.runner(call)
        cache = runner.caches.get(call.generation_id)
        if cache is None:  # a new cache starts empty here: no earlier generation's prefix (tested elsewhere)
            runner.clear_prefixes()
        before = list(cache.token_ids) if cache is not None else []
        stats, passes = replace(runner.stats), len(runner.stack.passes)
        reply = self.engine._dispatch(call, TierTimes())
        cache = runner.caches[call.generation_id]
        if isinstance(call, DraftCall):  # the last draft token has not been run yet
            assert cache.token_ids == call.committed + reply.tokens[:-1]
        else:  # the rejected tail is rolled back at once
            assert cache.token_ids == call.committed + call.block[: reply.accepted]
            self.events["reject"] += reply.accepted < len(call.block)
        assert_matches_prefill(runner.stack.stack, cache)
        shared = min(common_prefix(before, call.committed), len(call.committed) - 1)
        self.events[f"{name} rollback"] += len(before) > shared
        self.records.append(CallRecord(name, call, reply, before, runner.stack.passes[passes:],
                                       runner.stats.forward_tokens - stats.forward_tokens,
                                       runner.stats.calls - stats.calls))
        return reply

    def run(self, generation: Generation) -> Generation:
        for commit in drive(generation.steps(), self.dispatch):
            self.events[commit.tier.value] += 1
            # The full verifier ends every call on committed tokens; the drafter and the slim verifier may
            # hold tokens another tier rejected until their next call (checked in dispatch).
            cache = self.engine.full.caches.get(generation.generation_id)
            if cache is not None:
                assert generation.committed[: len(cache)] == cache.token_ids
        self.events["escalation"] += generation.stats.escalations
        self.engine.release(generation.generation_id)
        return generation


@pytest.fixture
def checked(tiny_engine, monkeypatch):
    for runner in (tiny_engine.drafter, tiny_engine.slim, tiny_engine.full):
        monkeypatch.setattr(runner, "stack", CountingStack(runner.stack))
    return CheckedRun(tiny_engine)


@pytest.mark.parametrize(
    ("params", "policy"),
    [
        (GREEDY, VIA_SD),
        (SAMPLED, VIA_SD),
        (GREEDY, RouterPolicy(mode="sd", block_size=4)),
        (SAMPLED, RouterPolicy(mode="via-sd", block_size=3, lossless=True)),
    ],
    ids=["via-sd-greedy", "via-sd-sampled", "sd-greedy", "lossless-via-sd-sampled"],
)
def test_every_cache_equals_a_fresh_prefill_after_every_call(checked, params, policy):
    engine = checked.engine
    generation = checked.run(engine.new_generation(engine.encode(PROMPT_TEXT), params, policy))
    assert len(generation.output_ids) == params.max_tokens
    assert checked.events["reject"] > 0 and checked.events["drafter rollback"] > 0


def test_via_sd_generations_exercise_every_cache_path(checked):
    engine = checked.engine
    for params in (GREEDY, SAMPLED):
        checked.run(engine.new_generation(engine.encode(PROMPT_TEXT), params, VIA_SD))
    events = checked.events
    assert events["direct"] > 0 and events["slim"] > 0 and events["full"] > 0 and events["escalation"] > 0
    assert events["reject"] > 0 and events["drafter rollback"] > 0
    assert events["slim rollback"] > 0  # a slim cache that ran ahead of the full verifier's recovered token


def test_catch_up_runs_the_missing_tokens_in_one_forward_pass(checked):
    engine = checked.engine
    checked.run(engine.new_generation(engine.encode(PROMPT_TEXT), GREEDY, VIA_SD))
    catch_ups = []
    for record in checked.records:
        call, before = record.call, record.cached_before
        missing = len(call.committed) - min(common_prefix(before, call.committed), len(call.committed) - 1)
        assert record.calls == 1
        assert record.forward_tokens == sum(record.passes)
        if isinstance(call, VerifyCall):
            if record.tier == "full":  # the full verifier's cache is always a prefix: it never needs a rollback
                assert call.committed[: len(before)] == before
            assert record.passes == [missing + len(call.block)]
            catch_ups.append((record.tier, missing))
        else:
            assert record.passes == [missing] + [1] * (len(record.reply.tokens) - 1)
    # the full verifier skipped direct and slim blocks and caught up on all of them at once
    assert max(m for tier, m in catch_ups if tier == "full") > VIA_SD.block_size


# -- the runner's cache store ---------------------------------------------------------------


def verify_call(generation_id: str, committed: list[int], block: list[int] = ()) -> VerifyCall:
    return VerifyCall(Tier.FULL, generation_id, list(committed), list(block), SamplingParams(max_tokens=8), 0)


def verdict_key(verdict):
    return verdict.accepted, verdict.next_token, [round(c, 9) for c in verdict.confidence]


@pytest.fixture
def stack(tiny_engine):
    return DecoderStack(tiny_engine.verifier_model)


def test_release_drops_every_tier_cache(tiny_engine):
    generation = tiny_engine.new_generation([104, 105], SamplingParams(max_tokens=12), RouterPolicy(mode="sd"))
    events = tiny_engine.stream(generation)
    next(events)
    gid = generation.generation_id
    assert gid in tiny_engine.drafter.caches and gid in tiny_engine.full.caches
    tiny_engine.release(gid)
    assert all(gid not in r.caches for r in (tiny_engine.drafter, tiny_engine.slim, tiny_engine.full))
    events.close()


@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_generation_continues_identically_after_its_caches_are_dropped(tiny_engine, params):
    prompt = tiny_engine.encode(PROMPT_TEXT)
    reference = tiny_engine.generate(prompt, params, VIA_SD).token_ids
    misses = tiny_engine.drafter.stats.cache_misses
    generation = tiny_engine.new_generation(prompt, params, VIA_SD)
    for i, _ in enumerate(tiny_engine.stream(generation)):
        if i in (1, 4):  # as if every replica lost the generation: the next calls rebuild from token ids
            tiny_engine.release(generation.generation_id)
    assert generation.output_ids == reference
    assert tiny_engine.drafter.stats.cache_misses - misses == 3  # the start and after each release

"""The KV slot pool: packed rows over slots give what each row gives alone, chunked prefill equals
one pass and bounds activation memory by the chunk, admission never evicts a running generation,
and prefix reuse prefills only the new tail with identical results."""

from __future__ import annotations

import psutil
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from via_sd_ray.core.engine import VerifyCall
from via_sd_ray.core.policy import RouterPolicy, Tier
from via_sd_ray.core.sampling import SamplingParams
from via_sd_ray.errors import Overloaded
from via_sd_ray.models.decoder import DecoderStack
from via_sd_ray.models.runner import PENDING, TierRunner
from via_sd_ray.models.tiny import tiny_model

GREEDY = SamplingParams(max_tokens=64)


@pytest.fixture(scope="module")
def stack():
    return DecoderStack(tiny_model("verifier", dtype=torch.float64))


def verify_call(generation_id, committed, block=(5, 6, 7), seed=0):
    return VerifyCall(Tier.FULL, generation_id, list(committed), list(block), GREEDY, seed=seed)


def key(verdict):
    return verdict.accepted, verdict.next_token, [round(c, 9) for c in verdict.confidence]


def test_packed_rows_over_pool_slots_equal_each_row_alone(stack):
    pool = stack.new_pool(4, 256)
    prefixes = [list(range(5, 65)), list(range(70, 73)), list(range(100, 200))]
    news = [[7, 8, 9], [11], [12, 13, 14, 15, 16, 17]]
    slots = [pool.cache(i) for i in (2, 0, 3)]
    alone = []
    for prefix, new, cache in zip(prefixes, news, slots):
        stack(prefix, cache, 1)
        solo = stack.new_cache(8)  # its own growable storage
        stack(prefix, solo, 1)
        alone.append((stack(new, solo, len(new)), solo))
    outs = stack.forward_batch(news, slots, [len(n) for n in news])
    for (ref, solo), out, cache in zip(alone, outs, slots):
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-10)
        assert cache.token_ids == solo.token_ids
        n = len(cache)
        torch.testing.assert_close(cache.data[..., :n, :], solo.data[..., :n, :], rtol=0, atol=1e-10)
    assert pool.data.data_ptr() == slots[1].data.data_ptr()  # slot 0's cache is the pool's storage


def test_rows_without_logits_only_fill_their_cache(stack):
    pool = stack.new_pool(2, 64)
    a, b = pool.cache(0), pool.cache(1)
    outs = stack.forward_batch([[1, 2, 3, 4], [9]], [a, b], [0, 1])
    assert outs[0].shape == (0, stack.vocab_size) and outs[1].shape == (1, stack.vocab_size)
    assert a.token_ids == [1, 2, 3, 4] and b.token_ids == [9]


def test_a_slot_refuses_a_sequence_longer_than_itself(stack):
    cache = stack.new_pool(1, 32).cache(0)
    with pytest.raises(ValueError, match="KV slot of 32 tokens"):
        stack(list(range(40)), cache, 1)


def test_chunked_prefill_equals_one_pass(stack):
    prompt = [(7 * i) % 250 + 3 for i in range(300)]
    one = TierRunner(stack, stack.new_pool(1, 512), "full")
    chunked = TierRunner(stack, stack.new_pool(2, 512), "full", prefill_chunk=64)
    call = verify_call("g", prompt)
    assert chunked.verify_batch([call], partial=True) == [PENDING]  # one chunk ran; the caller comes back
    results = [chunked.verify_batch([call], partial=True)[0] for _ in range(4)]
    # 300 tokens: four chunks of 64, then the 43 before the last (a pass with logits is [last] + block) and,
    # in the same call, the decode-shaped pass: a call comes back only after a full chunk
    assert results[:3] == [PENDING] * 3 and results[3] is not PENDING
    assert chunked.stats.prefill_chunks == 5 and chunked.stats.calls == 5
    expected = one.verify(call)
    assert key(results[3]) == key(expected)
    a, b = one.caches["g"], chunked.caches["g"]
    assert a.token_ids == b.token_ids
    torch.testing.assert_close(b.data[..., : len(b), :], a.data[..., : len(a), :], rtol=0, atol=1e-9)
    assert chunked.verify(verify_call("h", prompt)).accepted == expected.accepted  # not partial: runs to its end


class LargestTensor(TorchDispatchMode):
    """Records the largest new tensor (elements) any op produces (views of their inputs, such as a pool
    slot's cache, allocate nothing and are left out)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor)}
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("chunk", [32, 64])
def test_a_whole_context_prompt_needs_activations_bounded_by_the_chunk(stack, chunk):
    """The longest tensor a pass builds (activations, masks, logits) scales with the chunk, not with the
    prompt: a prompt of the whole 1,024-token window with chunk C stays within C x max(MLP width,
    window) elements (the MLP's activations, or one chunk's mask over the window), while one
    unchunked pass goes past it."""
    config = stack.config
    window = stack.max_context
    prompt = [(11 * i) % 250 + 3 for i in range(window - 4)]
    bound = chunk * max(config.intermediate_size, window)

    def largest(prefill_chunk):
        runner = TierRunner(stack, stack.new_pool(1, window), "full", prefill_chunk=prefill_chunk)
        with LargestTensor() as probe:
            verdict = runner.verify(verify_call("g", prompt, block=(5, 6)))
        return probe.largest, verdict

    chunked, verdict = largest(chunk)
    whole, reference = largest(None)
    assert chunked <= bound < whole
    assert key(verdict) == key(reference)


def test_admission_never_evicts_a_running_generation(stack):
    runner = TierRunner(stack, stack.new_pool(2, 128), "full")
    for gid in ("a", "b"):
        runner.verify(verify_call(gid, [1, 2, 3, 4]))
    held = {gid: list(runner.caches[gid].token_ids) for gid in ("a", "b")}
    assert not runner.admit("c")
    with pytest.raises(Overloaded, match="all 2 KV slots are held by running generations"):
        runner.verify(verify_call("c", [9, 9, 9]))
    assert {gid: runner.caches[gid].token_ids for gid in ("a", "b")} == held and runner.stats.refused == 1
    runner.release("a")  # a's slot is kept as a prefix until someone needs it
    assert runner.slot_counts() == {"slots": 2, "slots_used": 1, "slots_prefix": 1, "slots_free": 0}
    assert runner.admit("c") and not runner.admit("d")
    runner.verify(verify_call("c", [9, 9, 9]))  # takes the finished slot over
    assert runner.slot_counts() == {"slots": 2, "slots_used": 2, "slots_prefix": 0, "slots_free": 0}
    assert runner.caches["b"].token_ids == held["b"] and runner.stats.preemptions == 0
    for gid in ("b", "c"):
        runner.release(gid)
    assert runner.slot_counts()["slots_used"] == 0


def test_an_expired_running_cache_counts_as_a_preemption(stack):
    runner = TierRunner(stack, stack.new_pool(2, 128), "full")
    runner.verify(verify_call("a", [1, 2, 3, 4]))
    assert runner.expire(idle_seconds=-1) == 1
    runner.verify(verify_call("a", [1, 2, 3, 4, 5]))  # its slot's prefix is taken back; counted, not hidden
    assert runner.stats.preemptions == 1 and runner.stats.prefix_tokens == 4


@pytest.mark.parametrize("first_running", [False, True], ids=["after-release", "while-running"])
def test_a_shared_1000_token_prefix_is_prefilled_once(stack, first_running):
    prefix = [(13 * i) % 250 + 3 for i in range(1000)]
    runner = TierRunner(stack, stack.new_pool(2, 1024), "full", prefill_chunk=None)
    runner.verify(verify_call("a", prefix + [21, 22]))
    if not first_running:
        runner.release("a")
    before = runner.stats.forward_tokens
    second = verify_call("b", prefix + [31, 32, 33], block=(5, 6, 7))
    verdict = runner.verify(second)
    assert runner.stats.forward_tokens - before == 3 + 3  # the 3-token tail after the 1,000 shared ones + block
    assert runner.stats.prefix_hits == 1 and runner.stats.prefix_tokens == 1000
    fresh = TierRunner(stack, stack.new_pool(1, 1024), "full")
    assert key(verdict) == key(fresh.verify(second))
    torch.testing.assert_close(runner.caches["b"].data[..., :1003, :], fresh.caches["b"].data[..., :1003, :],
                               rtol=0, atol=1e-9)


def test_generations_sharing_a_prefix_give_identical_tokens(build_tiny_engine):
    engine = build_tiny_engine(serving={"prefill_chunk_tokens": 32, "prefix_min_tokens": 8})
    system = engine.encode("You are a careful assistant. " * 12)
    prompts = [system + engine.encode(q) for q in ("hello world", "the quick brown fox", "print(1)")]
    policy = RouterPolicy(mode="via-sd", block_size=4)
    alone = []
    for p in prompts:
        for runner in (engine.drafter, engine.slim, engine.full):
            runner.clear_prefixes()
        alone.append(engine.generate(p, GREEDY, policy).token_ids)
    reused = engine.full.stats.prefix_tokens
    again = [engine.generate(p, GREEDY, policy).token_ids for p in prompts]
    assert again == alone and engine.full.stats.prefix_tokens - reused >= len(system) * 3


def test_batched_generation_equals_generations_one_by_one(build_tiny_engine):
    engine = build_tiny_engine(serving={"prefill_chunk_tokens": 16})
    prompts = [engine.encode(t) for t in ("hello world", "a much longer prompt " * 6, "x", "def f(a, b):")]
    for policy in (RouterPolicy(mode="sd", block_size=4), RouterPolicy(mode="via-sd", block_size=4),
                   RouterPolicy(mode="ar")):
        params = SamplingParams(max_tokens=24)
        alone = [engine.generate(p, params, policy).token_ids for p in prompts]
        together = engine.generate_batch(prompts, params, policy)
        assert [r.token_ids for r in together] == alone
    assert engine.full.stats.prefill_chunks > 0
    assert engine.full.slot_counts()["slots_used"] == 0  # every generation released its slot


def test_batched_generation_shrinks_its_blocks_with_the_load_as_the_router_does(build_tiny_engine):
    """serving.verify_token_budget caps each block by the generations still running (``load_block_cap``), in
    ``generate_batch`` as in the served router: budget 8 over 4 running is 8 // 4 - 1 = 1 draft token, under
    min_block 2, so nobody drafts; over 2 running, blocks of at most 3. The tokens stay those of the
    generations one by one, which draft blocks of 4."""
    engine = build_tiny_engine(serving={"verify_token_budget": 8, "min_block": 2})
    prompts = [engine.encode(t) for t in ("hello world", "a much longer prompt " * 3, "x", "def f(a, b):")]
    policy = RouterPolicy(mode="sd", block_size=4)
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    alone = [engine.generate(p, params, policy) for p in prompts]
    assert max(r.stats.records[0].proposed for r in alone) == 4
    four = engine.generate_batch(prompts, params, policy)
    assert [r.token_ids for r in four] == [r.token_ids for r in alone]
    assert sum(r.stats.proposed for r in four) == 0
    two = engine.generate_batch(prompts[:2], params, policy)
    assert [r.token_ids for r in two] == [r.token_ids for r in alone[:2]]
    proposed = [b.proposed for r in two for b in r.stats.records]
    assert max(proposed) == 3


def _resident_bytes() -> int:
    return psutil.Process().memory_info().rss


def test_a_cpu_pool_is_zero_and_becomes_resident_as_its_slots_fill():
    from via_sd_ray.models.kv_cache import KVPool

    before = _resident_bytes()
    pool = KVPool([0, 1, 2, 3], 2, 64, torch.float32, "cpu", slots=16, slot_tokens=4096)  # 16 MiB a slot
    slot_bytes = pool.nbytes // pool.slots
    assert _resident_bytes() - before < slot_bytes  # reserved, not written
    cache = pool.cache(5)
    assert cache.data.abs().max() == 0 and pool.data[:, :, 6].abs().max() == 0  # zeros where nothing was written
    cache.data.fill_(1.0)  # one slot used whole
    grown = _resident_bytes() - before
    assert slot_bytes * 0.9 < grown < 3 * slot_bytes
    assert float(pool.data[:, :, 5].sum()) == pool.data[:, :, 5].numel() and pool.data[:, :, 4].abs().max() == 0

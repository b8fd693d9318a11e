"""Batched forward passes: several generations' blocks in one pass give what they give alone."""

import torch

from via_sd_ray.core.engine import DraftCall, VerifyCall
from via_sd_ray.core.policy import Tier
from via_sd_ray.core.sampling import SamplingParams
from via_sd_ray.models.decoder import DecoderStack
from via_sd_ray.models.runner import TierRunner
from via_sd_ray.models.tiny import tiny_model

GREEDY = SamplingParams(max_tokens=64)


def stack():
    return DecoderStack(tiny_model("verifier", dtype=torch.float64))


def test_forward_batch_equals_row_by_row_with_ragged_caches():
    st = stack()
    prefixes = [list(range(5, 25)), list(range(40, 43)), list(range(60, 100))]
    news = [[7, 8, 9], [11], [12, 13, 14, 15, 16, 17]]
    alone, batched = [], [st.new_cache(8) for _ in prefixes]
    for prefix, new, cache in zip(prefixes, news, batched):
        st(prefix, cache, 1)
        solo = st.new_cache(8)
        st(prefix, solo, 1)
        alone.append((st(new, solo, len(new)), solo))
    outs = st.forward_batch(news, batched, [len(n) for n in news])
    for (ref, solo), out, cache in zip(alone, outs, batched):
        assert torch.allclose(out, ref, atol=1e-10)
        assert cache.token_ids == solo.token_ids
        n = len(cache)
        assert torch.allclose(cache.data[..., :n, :], solo.data[..., :n, :], atol=1e-10)


def test_runner_batches_match_single_calls():
    batch_runner, single_runner = TierRunner(stack()), TierRunner(stack())
    committed = {"a": list(range(10, 30)), "b": list(range(50, 54)), "c": list(range(70, 110))}
    drafts = [DraftCall(g, ids, 4, GREEDY, seed=1) for g, ids in committed.items()]
    batch = batch_runner.draft_batch(drafts)
    for call, got in zip(drafts, batch):
        want = single_runner.draft(call)
        assert got.tokens == want.tokens and got.token_probs == want.token_probs
    verifies = [VerifyCall(Tier.FULL, g, ids, [3, 4, 5], GREEDY, seed=2) for g, ids in committed.items()]
    for call, got in zip(verifies, batch_runner.verify_batch(verifies)):
        want = single_runner.verify(call)
        assert (got.accepted, got.next_token) == (want.accepted, want.next_token)


def test_same_generation_twice_in_a_batch_runs_in_order():
    runner = TierRunner(stack())
    ids = list(range(10, 30))
    first = VerifyCall(Tier.FULL, "g", ids, [1, 2], GREEDY, seed=0)
    second = VerifyCall(Tier.FULL, "g", ids + [1], [2], GREEDY, seed=0)
    a, b = runner.verify_batch([first, second])
    assert (a.accepted, a.next_token) == (runner.verify(first).accepted, runner.verify(first).next_token)
    assert b.next_token == runner.verify(second).next_token

"""Tier calls stay on the tier's device: one device -> host transfer per call, no tensor built without
the device, sparse proposals, and sampled speculative decoding through real runners still committing
tokens distributed as the full model's (the proof needs only that the draft was drawn from the q shipped).

The guard (``HostTransfers``) makes a CPU run see what a GPU would pay: see ``models/device_guard.py``."""

from __future__ import annotations

import pytest
import torch

from tests.core.distribution import empirical, tv_bound, tv_distance
from via_sd_ray.core.engine import DraftCall, VerifyCall
from via_sd_ray.core.policy import Tier
from via_sd_ray.core.sampling import Proposal, SamplingParams, warp
from via_sd_ray.models.decoder import DecoderStack
from via_sd_ray.models.device_guard import HostTransfers
from via_sd_ray.models.runner import TierRunner
from via_sd_ray.models.tiny import tiny_model

PROMPT = [5, 17, 42, 9, 3, 77, 21]
GREEDY = SamplingParams(max_tokens=32, ignore_eos=True)
SAMPLED = SamplingParams(max_tokens=32, temperature=1.0, ignore_eos=True)


@pytest.fixture(scope="module")
def models():
    return tiny_model("drafter"), tiny_model("verifier")


def runners(models, **kwargs):
    drafter, verifier = models
    draft, full = DecoderStack(drafter), DecoderStack(verifier)
    return (TierRunner(draft, draft.new_pool(4, 256), "drafter", host_steps=False, **kwargs),
            TierRunner(full, full.new_pool(4, 256), "full", **kwargs))


def guarded(runner: TierRunner, call):
    with HostTransfers([runner.stack, runner.pool.data]) as guard:
        result = runner.draft_batch(call) if isinstance(call[0], DraftCall) else runner.verify_batch(call)
    return result, guard


@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_a_tier_call_reads_back_once_and_builds_every_tensor_on_its_device(models, params):
    drafter, full = runners(models)
    calls = [DraftCall(f"g{i}", PROMPT + [i], k=5, params=params, seed=i, stop_threshold=0.2) for i in range(3)]
    drafts, guard = guarded(drafter, calls)  # three generations, prefill and five positions, in one call
    assert guard.transfers == ["cpu"] and guard.deviceless == []
    verify = [VerifyCall(Tier.FULL, f"g{i}", PROMPT + [i], d.tokens, params, seed=i, draft_probs=d.probs,
                         return_probs=i == 0) for i, d in enumerate(drafts)]
    verdicts, guard = guarded(full, verify)
    assert guard.transfers == ["cpu"] and guard.deviceless == []
    assert all(0 <= v.accepted <= len(d.tokens) for v, d in zip(verdicts, drafts))
    # the guard sees a transfer where one happens: a second read of the logits counts
    with HostTransfers([full.stack]) as guard:
        logits = full.stack.forward_batch([[1, 2, 3]], [full.stack.new_cache()], [1])[0]
        logits.argmax().item()
        logits.tolist()
    assert guard.transfers == ["item", "tolist"]


def test_sampled_proposals_are_sparse_rows_of_the_drafters_warped_distribution(models):
    drafter, _ = runners(models, proposal_top_k=8)
    draft = drafter.draft(DraftCall("g", PROMPT, k=4, params=SAMPLED, seed=1))
    assert isinstance(draft.probs, Proposal) and draft.probs.ids.shape == (4, 8)
    assert torch.allclose(draft.probs.probs.sum(-1), torch.ones(4))
    for pos, token in enumerate(draft.tokens):  # each token is one of its row's ids, with its probability
        row = draft.probs.ids[pos].tolist()
        assert token in row
        assert draft.token_probs[pos] == pytest.approx(float(draft.probs.probs[pos, row.index(token)]), rel=1e-6)


@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_an_early_stop_decided_on_the_host_or_after_the_block_gives_the_same_block(models, params):
    on_device, _ = runners(models)
    on_host = TierRunner(on_device.stack, on_device.stack.new_pool(4, 256), "drafter", host_steps=True)
    for seed in range(6):
        call = DraftCall(f"g{seed}", PROMPT + [seed], k=6, params=params, seed=seed, stop_threshold=0.15)
        a, b = on_device.draft(call), on_host.draft(call)
        assert (a.tokens, a.token_probs) == (b.tokens, pytest.approx(b.token_probs, abs=1e-9))
        # the cache holds what the block ran, however many positions were drafted past its stop
        assert on_device.caches[call.generation_id].token_ids == call.committed + a.tokens[:-1]
        assert on_device.caches[call.generation_id].token_ids == on_host.caches[call.generation_id].token_ids
        on_device.release(call.generation_id)
        on_host.release(call.generation_id)


def test_sampled_sd_through_runners_commits_tokens_distributed_as_the_full_model(models):
    """4,000 blocks of 2 drafted from the drafter's top-4 proposals and verified by the full model: the
    first and second committed tokens follow the full model's (top-8 warped) distribution there."""
    params = SamplingParams(max_tokens=8, temperature=1.0, top_k=8, ignore_eos=True)
    drafter, full = runners(models, proposal_top_k=4)
    stack = full.stack
    p0 = warp(stack.forward_batch([PROMPT], [stack.new_cache()], [1])[0], params)[0]  # [V]
    support = p0.nonzero().flatten().tolist()
    assert len(support) == 8
    first, pairs = [], []
    for seed in range(4000):
        gid = f"s{seed}"
        draft = drafter.draft(DraftCall(gid, PROMPT, k=2, params=params, seed=seed))
        verdict = full.verify(VerifyCall(Tier.FULL, gid, PROMPT, draft.tokens, params, seed=10_000 + seed,
                                         draft_probs=draft.probs))
        committed = verdict.tokens(draft.tokens)
        first.append(support.index(committed[0]))
        if len(committed) > 1:
            pairs.append(committed[:2])
        drafter.release(gid)
        full.release(gid)
        drafter.clear_prefixes()
        full.clear_prefixes()
    assert tv_distance(empirical(first, 8), p0[support]) < tv_bound(8, len(first))
    # the second token, given the most common first one, against the full model after it
    head = max(set(c[0] for c in pairs), key=[c[0] for c in pairs].count)
    second = [c[1] for c in pairs if c[0] == head]
    p1 = warp(stack.forward_batch([PROMPT + [head]], [stack.new_cache()], [1])[0], params)[0]
    support1 = p1.nonzero().flatten().tolist()
    assert len(second) > 300
    assert tv_distance(empirical([support1.index(t) for t in second], 8), p1[support1]) < tv_bound(8, len(second))

"""Logprobs of the tier that decided each token, per-token tiers, and min_tokens, on the tiny models."""

from __future__ import annotations

import pytest
import torch

from via_sd_ray.core.policy import RouterPolicy, Tier
from via_sd_ray.core.sampling import SamplingParams

PROMPT = "def add(a, b):\n    return a + b\n"
MAX_TOKENS = 16


def stream(engine, ids, params, policy):
    generation = engine.new_generation(ids, params, policy)
    events = list(engine.stream(generation))
    tokens = [t for e in events for t in e.token_ids]
    logprobs = [lp for e in events for lp in e.logprobs]
    tiers = [t for e in events for t in e.token_tiers]
    assert len(tokens) == len(logprobs) == len(tiers) == len(generation.output_ids)
    return tokens, logprobs, tiers


def own_log_softmax(model, ids: list[int], output: list[int]) -> torch.Tensor:
    """The model's log-softmax at each output position, from one plain forward pass: [len(output), V]."""
    with torch.inference_mode():
        logits = model(torch.tensor([ids + output])).logits[0].double()
    return torch.log_softmax(logits, dim=-1)[len(ids) - 1: len(ids) + len(output) - 1]


@pytest.mark.parametrize("mode", ["ar", "sd", "via-sd-lossless"])
def test_logprobs_are_the_full_models_own_log_softmax(tiny_engine, mode):
    ids = tiny_engine.encode(PROMPT)
    policy = {"ar": RouterPolicy(mode="ar"), "sd": RouterPolicy(mode="sd", block_size=4),
              "via-sd-lossless": RouterPolicy(mode="via-sd", block_size=4, lossless=True)}[mode]
    tokens, logprobs, tiers = stream(tiny_engine, ids, SamplingParams(max_tokens=MAX_TOKENS, logprobs=3), policy)
    ref = own_log_softmax(tiny_engine.verifier_model, ids, tokens)
    assert set(tiers) <= {Tier.FULL, Tier.SLIM}
    for i, (token, lp) in enumerate(zip(tokens, logprobs)):
        if tiers[i] is Tier.SLIM:  # accepted by the slim tier in lossless via-sd; the full model agreed later
            continue
        assert lp.logprob == pytest.approx(float(ref[i, token]), abs=1e-5)
        top_ids = [t for t, _ in lp.top]
        assert len(top_ids) == 3 and top_ids[0] == token  # greedy: the chosen token is the most likely
        assert top_ids == ref[i].topk(3).indices.tolist()
        assert [v for _, v in lp.top] == pytest.approx(ref[i].topk(3).values.tolist(), abs=1e-5)
        assert sum(torch.tensor([v for _, v in lp.top]).exp()) <= 1.0 + 1e-6
    assert any(t is Tier.FULL for t in tiers)


def test_directly_committed_tokens_carry_the_drafters_logprobs(tiny_engine):
    ids = tiny_engine.encode(PROMPT)
    policy = RouterPolicy(mode="via-sd", block_size=4, lossless=False, deferred_check=False,
                          direct_threshold=0.0, slim_threshold=0.0)  # every drafted block is committed directly
    tokens, logprobs, tiers = stream(tiny_engine, ids, SamplingParams(max_tokens=MAX_TOKENS, logprobs=0), policy)
    assert Tier.DIRECT in tiers
    ref = own_log_softmax(tiny_engine.drafter_model, ids, tokens)
    for i, (token, lp, tier) in enumerate(zip(tokens, logprobs, tiers)):
        if tier is Tier.DIRECT:
            assert lp.logprob == pytest.approx(float(ref[i, token]), abs=1e-5) and lp.top == ()


def test_no_logprobs_unless_asked(tiny_engine):
    generation = tiny_engine.new_generation(tiny_engine.encode(PROMPT), SamplingParams(max_tokens=4),
                                            RouterPolicy(mode="sd", block_size=2))
    assert all(e.logprobs is None for e in tiny_engine.stream(generation))


@pytest.mark.parametrize("mode", ["ar", "sd"])
def test_min_tokens_holds_stop_tokens_back(tiny_engine, mode):
    ids = tiny_engine.encode(PROMPT)
    policy = RouterPolicy(mode=mode, block_size=4)
    free = tiny_engine.generate(ids, SamplingParams(max_tokens=MAX_TOKENS), RouterPolicy(mode="ar")).token_ids
    stop = free[2]  # a token the model emits third: as a stop token it ends the generation there
    first = free.index(stop)
    stopped = tiny_engine.generate(ids, SamplingParams(max_tokens=MAX_TOKENS, stop_token_ids=(stop,)), policy)
    assert stopped.token_ids == free[: first + 1] and stopped.finish_reason == "stop"
    held = tiny_engine.generate(ids, SamplingParams(max_tokens=MAX_TOKENS, stop_token_ids=(stop,), min_tokens=8),
                                policy)
    assert len(held.token_ids) >= 8 and stop not in held.token_ids[:7]
    assert held.token_ids[:first] == free[:first]
    ar = tiny_engine.generate(ids, SamplingParams(max_tokens=MAX_TOKENS, stop_token_ids=(stop,), min_tokens=8),
                              RouterPolicy(mode="ar"))
    assert held.token_ids == ar.token_ids  # greedy sd is still exactly ar under min_tokens

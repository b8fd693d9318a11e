"""Verification of a block: literal greedy cases, confidences, and rejection sampling
(seeded determinism, one-hot proposals, and the committed tokens following the target p)."""

from __future__ import annotations

import pytest
import torch

from tests.core.distribution import empirical, tv_bound, tv_distance
from via_sd_ray.core.sampling import SamplingParams, draw, exponentials, generator, race, top_k_proposal, warp
from via_sd_ray.core.verify import verify

V = 8
GREEDY = SamplingParams(max_tokens=16)
SAMPLED = SamplingParams(max_tokens=16, temperature=1.0)


def argmax_logits(choices: list[int]) -> torch.Tensor:
    """Logits [len(choices), V] whose argmax at row i is choices[i]."""
    logits = torch.zeros(len(choices), V)
    logits[torch.arange(len(choices)), torch.tensor(choices)] = 5.0
    return logits


def logits_of(probs: list[list[float]]) -> torch.Tensor:
    """Logits [N, V'] whose softmax (temperature 1) is ``probs``."""
    return torch.tensor(probs, dtype=torch.float64).log()


# -- greedy -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("block", "choices", "accepted", "committed"),
    [
        pytest.param([3, 1, 4], [3, 1, 4, 5], 3, [3, 1, 4, 5], id="all-accepted-plus-bonus"),
        pytest.param([3, 1, 4], [2, 1, 4, 5], 0, [2], id="first-rejected-recovered"),
        pytest.param([3, 1, 4], [3, 6, 4, 5], 1, [3, 6], id="middle-rejected-recovered"),
        pytest.param([3, 1, 4], [3, 1, 7, 5], 2, [3, 1, 7], id="last-rejected-recovered"),
        pytest.param([], [7], 0, [7], id="empty-block-is-one-ar-token"),
    ],
)
def test_greedy_verdict(block, choices, accepted, committed):
    verdict = verify(block, argmax_logits(choices), GREEDY)
    assert verdict.accepted == accepted
    assert verdict.next_token == committed[-1]
    assert verdict.tokens(block) == committed
    assert len(verdict.confidence) == accepted + 1
    assert verdict.probs is None


def test_greedy_confidence_is_the_verifier_top_probability_up_to_the_recovered_position():
    rows = [
        [0.7, 0.1, 0.1, 0.1],
        [0.2, 0.3, 0.5, 0.0],  # the block proposes 1, the verifier prefers 2
        [0.25, 0.25, 0.25, 0.25],
    ]
    verdict = verify([0, 1], logits_of(rows), GREEDY, return_probs=True)
    assert (verdict.accepted, verdict.next_token) == (1, 2)
    assert verdict.confidence == pytest.approx([0.7, 0.5])
    assert len(verdict.probs) == 2  # a proposal over the whole vocabulary (proposal_top_k 0)
    assert torch.allclose(verdict.probs.dense(4).double(), torch.tensor(rows[:2], dtype=torch.float64), atol=1e-6)


def test_sampled_confidence_comes_from_the_warped_distribution():
    logits = logits_of([[0.6, 0.3, 0.1]])
    params = SamplingParams(max_tokens=4, temperature=0.5)
    verdict = verify([], logits, params, gen=generator(0))
    sharpened = torch.tensor([0.36, 0.09, 0.01]) / 0.46  # p ** (1 / T), normalised
    assert verdict.confidence == pytest.approx([float(sharpened.max())], rel=1e-5)
    assert verdict.confidence[0] == pytest.approx(float(warp(logits, params).max()))


# -- rejection sampling: determinism and one-hot proposals ---------------------------------

P = torch.tensor([
    [0.30, 0.20, 0.15, 0.10, 0.10, 0.08, 0.05, 0.02],
    [0.05, 0.05, 0.40, 0.05, 0.05, 0.10, 0.10, 0.20],
    [0.10, 0.10, 0.10, 0.10, 0.20, 0.20, 0.10, 0.10],
], dtype=torch.float64)  # [K + 1, V] target
Q = torch.tensor([
    [0.02, 0.05, 0.08, 0.10, 0.10, 0.15, 0.20, 0.30],
    [0.30, 0.05, 0.05, 0.20, 0.05, 0.05, 0.25, 0.05],
], dtype=torch.float64)  # [K, V] proposals


def test_same_seed_same_verdict_and_seeds_vary_the_verdict():
    logits, block = P.log(), [6, 0]

    def run(seed):
        verdict = verify(block, logits, SAMPLED, Q.float(), generator(seed), return_probs=True)
        return verdict.accepted, verdict.next_token, verdict.confidence

    assert all(run(seed) == run(seed) for seed in range(20))
    assert len({run(seed)[:2] for seed in range(50)}) > 3


def test_one_hot_proposals_accept_what_the_target_always_picks_and_never_recover_the_rejected_token():
    certain = logits_of([[1.0] + [0.0] * 7, [1 / V] * V])  # the target picks token 0
    impossible = logits_of([[0.0] + [1 / 7] * 7, [1 / V] * V])  # the target never picks token 0
    for seed in range(30):
        assert verify([0], certain, SAMPLED, None, generator(seed)).accepted == 1
        verdict = verify([0], impossible, SAMPLED, None, generator(seed))
        assert verdict.accepted == 0 and verdict.next_token != 0


def first_committed(block, verdict) -> int:
    return verdict.tokens(block)[0]


def test_one_hot_proposal_commits_tokens_distributed_as_the_target():
    n, gen = 20_000, generator(1)
    logits = P[:2].log()
    samples = [first_committed([0], verify([0], logits, SAMPLED, None, gen)) for _ in range(n)]
    assert tv_distance(empirical(samples, V), P[0]) < tv_bound(V, n)


# -- rejection sampling: committed tokens follow the target --------------------------------


def wrong_residual_distribution(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """What a sampler that recovers from p instead of max(0, p - q) would commit."""
    overlap = torch.minimum(p, q)
    return overlap + (1 - overlap.sum()) * p


@pytest.fixture(scope="module")
def rejection_trials():
    """20k verdicts of 2-token blocks drawn from Q, verified against P."""
    n = 20_000
    drafts = torch.stack([torch.multinomial(Q[i], n, replacement=True, generator=generator(10 + i))
                          for i in range(2)], dim=1).tolist()  # [n, 2]
    gen, logits, q = generator(2), P.log(), Q.float()
    return [(block, verify(block, logits, SAMPLED, q, gen)) for block in drafts]


def test_first_committed_token_follows_the_target(rejection_trials):
    samples = [first_committed(block, verdict) for block, verdict in rejection_trials]
    bound = tv_bound(V, len(samples))
    assert tv_distance(empirical(samples, V), P[0]) < bound
    # the test has the power to see the classic mistake
    assert tv_distance(wrong_residual_distribution(P[0], Q[0]), P[0]) > 3 * bound


def test_second_committed_token_follows_the_target_given_the_first_was_accepted(rejection_trials):
    samples = [verdict.tokens(block)[1] for block, verdict in rejection_trials if verdict.accepted >= 1]
    assert len(samples) > 5_000
    bound = tv_bound(V, len(samples))
    assert tv_distance(empirical(samples, V), P[1]) < bound
    assert tv_distance(wrong_residual_distribution(P[1], Q[1]), P[1]) > 3 * bound


def test_bonus_token_follows_the_target_after_a_fully_accepted_block(rejection_trials):
    samples = [verdict.next_token for _, verdict in rejection_trials if verdict.accepted == 2]
    assert len(samples) > 2_000
    assert tv_distance(empirical(samples, V), P[2]) < tv_bound(V, len(samples))


# -- sparse proposals: a drafter's top-k rows, shipped as (ids, probs) ---------------------


def test_draw_follows_the_weights_and_never_picks_a_zero_weight_token():
    weights = torch.tensor([[0.0, 2.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0]])  # unnormalised
    n, gen = 20_000, generator(5)
    u = torch.rand(n, generator=gen, dtype=torch.float64)
    samples = draw(weights.expand(n, -1), u).tolist()
    assert set(samples) <= {1, 3, 4}
    assert tv_distance(empirical(samples, V), weights[0] / weights.sum()) < tv_bound(V, n)


def test_an_exponential_race_follows_the_weights_and_never_picks_a_zero_weight_token():
    """How a drafter draws its token from the proposal it ships: argmax(probs / Exp(1)) per row."""
    weights = torch.tensor([[0.0, 2.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0]])  # unnormalised
    n = 20_000
    samples = race(weights.expand(n, -1), exponentials(generator(5), (n, V), "cpu"))[:, 0].tolist()
    assert set(samples) <= {1, 3, 4}
    assert tv_distance(empirical(samples, V), weights[0] / weights.sum()) < tv_bound(V, n)
    # seeded: the same draws wherever a call runs
    assert torch.equal(exponentials(generator(9), (3, 4), "cpu"), exponentials(generator(9), (3, 4), "cpu"))
    assert bool((exponentials(generator(9), (64, 64), "cpu") > 0).all())


def test_top_k_proposal_is_the_renormalised_head():
    proposal = top_k_proposal(Q[:1].float(), 3)
    assert proposal.ids.tolist() == [[7, 6, 5]]
    dense = proposal.dense(V)[0]
    assert float(dense.sum()) == pytest.approx(1.0)
    assert dense[[7, 6, 5]].tolist() == pytest.approx([0.30 / 0.65, 0.20 / 0.65, 0.15 / 0.65], rel=1e-6)


def test_blocks_drawn_from_sparse_proposals_commit_tokens_distributed_as_the_target():
    """The drafter samples from the renormalised top-3 of its distribution and ships only those rows: with
    that sparse q, rejection sampling commits tokens distributed exactly as the target."""
    n = 20_000
    proposal = top_k_proposal(Q.float(), 3)  # [2, 3]
    q = proposal.dense(V).double()
    drafts = torch.stack([torch.multinomial(q[i], n, replacement=True, generator=generator(20 + i))
                          for i in range(2)], dim=1).tolist()  # [n, 2]
    gen, logits = generator(3), P.log()
    trials = [(block, verify(block, logits, SAMPLED, proposal, gen)) for block in drafts]
    first = [verdict.tokens(block)[0] for block, verdict in trials]
    second = [verdict.tokens(block)[1] for block, verdict in trials if verdict.accepted >= 1]
    assert tv_distance(empirical(first, V), P[0]) < tv_bound(V, n)
    assert tv_distance(empirical(second, V), P[1]) < tv_bound(V, len(second))
    # checking against the dense q the block was *not* drawn from would be biased: the test can see it
    dense_q = [first_committed(block, verify(block, logits, SAMPLED, Q.float(), gen)) for block in drafts]
    assert tv_distance(empirical(dense_q, V), P[0]) > 3 * tv_bound(V, n)

"""The offline replay of the router used by calibration."""

from via_sd_ray.core.policy import Mode, RouterPolicy
from via_sd_ray.core.simulate import Costs, Trace, simulate

COSTS = Costs(draft_token=0.2, full_call=1.0, slim_call=0.5)


def trace(target, draft, prob, slim=None, slim_prob=None):
    return Trace(list(target), list(draft), list(prob), slim and list(slim), slim_prob and list(slim_prob))


def test_ar_commits_one_token_per_full_call():
    tr = trace([1, 2, 3, 4], [1, 2, 3, 4], [1.0] * 4)
    res = simulate([tr], RouterPolicy(mode=Mode.AR), COSTS)
    assert (res.committed, res.errors, res.blocks) == (4, 0, 4)
    assert res.cost == 4.0 and res.speedup == 1.0


def test_sd_block_accepts_matching_prefix_and_recovers():
    # drafter wrong at position 2: block [1, 2, 9] -> commits 1, 2 and the recovered 3
    tr = trace([1, 2, 3, 4, 5, 6], [1, 2, 9, 4, 5, 6], [0.5] * 6)
    res = simulate([tr], RouterPolicy(mode=Mode.SD, block_size=3), COSTS)
    assert res.errors == 0 and res.committed == 6
    assert res.tier_blocks["full"] == res.blocks == 2
    assert abs(res.cost - (3 * 0.2 + 1.0 + 2 * 0.2 + 1.0)) < 1e-9  # second block is cut at the end


def test_direct_blocks_cost_no_verifier_and_count_errors():
    tr = trace([1, 2, 3, 4, 5], [1, 2, 7, 4, 5], [0.99] * 5)
    policy = RouterPolicy(mode=Mode.VIA_SD, block_size=4, direct_threshold=0.9, slim_threshold=0.5)
    res = simulate([tr], policy, COSTS)
    assert res.tier_blocks["direct"] == 1 and res.errors == 1
    assert res.fidelity < 1.0


def test_slim_escalates_unsure_positions_to_full():
    target = [1, 2, 3, 4, 5, 6]
    draft = [1, 2, 3, 4, 5, 6]
    slim = [1, 2, 8, 4, 5, 6]  # the slim verifier would reject the correct 3 ...
    slim_prob = [0.99, 0.99, 0.4, 0.99, 0.99, 0.99]  # ... but is unsure there: escalate from position 2
    policy = RouterPolicy(mode=Mode.VIA_SD, block_size=4, direct_threshold=0.99, slim_threshold=0.5,
                          escalate_threshold=0.8)
    res = simulate([trace(target, draft, [0.7] * 6, slim, slim_prob)], policy, COSTS)
    assert res.escalations >= 1 and res.errors == 0


def test_lossless_via_sd_never_errs():
    target = [5, 6, 7, 8, 9, 10, 11, 12]
    draft = [5, 0, 7, 8, 0, 10, 11, 0]
    slim = [5, 6, 0, 8, 9, 0, 11, 12]
    tr = trace(target, draft, [0.8, 0.3, 0.9, 0.99, 0.6, 0.7, 0.99, 0.2], slim, [0.9] * 8)
    policy = RouterPolicy(mode=Mode.VIA_SD, block_size=3, direct_threshold=0.95, slim_threshold=0.5, lossless=True)
    res = simulate([tr], policy, COSTS)
    assert res.errors == 0 and res.committed == len(target)


def test_catch_up_after_direct_blocks_is_charged_to_the_next_verifier_call():
    # block 1 is confident (direct, 3 tokens); block 2 is not: the full verifier runs 3 catch-up tokens
    tr = trace([1, 2, 3, 4, 5, 6, 7], [1, 2, 3, 4, 5, 6, 7], [0.99, 0.99, 0.99, 0.1, 0.1, 0.1, 0.1])
    policy = RouterPolicy(mode=Mode.VIA_SD, block_size=3, direct_threshold=0.9, slim_threshold=0.9)
    base = simulate([tr], policy, COSTS)
    charged = simulate([tr], policy, Costs(COSTS.draft_token, COSTS.full_call, COSTS.slim_call, catch_up_token=0.1))
    assert base.tier_blocks["direct"] == 1
    assert abs(charged.cost - base.cost - 3 * 0.1) < 1e-9


def test_prefix_fraction_estimates_the_first_committed_error():
    tr = trace([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], [1, 2, 3, 4, 5, 6, 0, 8, 9, 10], [0.99] * 10)
    policy = RouterPolicy(mode=Mode.VIA_SD, block_size=4, direct_threshold=0.9, slim_threshold=0.9)
    res = simulate([tr, trace([1, 2, 3], [1, 2, 3], [0.99] * 3)], policy, COSTS)
    assert res.prefix_fractions == [0.6, 1.0]  # the first error is at position 6 of 10
    assert res.prefix_fraction == 0.8 and res.identical_share == 0.5


def test_deferred_check_commits_no_error_and_pays_for_the_rolled_back_drafts():
    target = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
    draft = [1, 2, 3, 4, 5, 6, 0, 8, 9, 10]
    prob = [0.99] * 6 + [0.2] + [0.99] * 3
    lossy = RouterPolicy(mode=Mode.VIA_SD, block_size=4, direct_threshold=0.9, slim_threshold=0.9)
    checked = RouterPolicy(mode=Mode.VIA_SD, block_size=4, direct_threshold=0.9, slim_threshold=0.9,
                           deferred_check=True)
    sd = RouterPolicy(mode=Mode.SD, block_size=4)
    res = simulate([trace(target, draft, prob)], checked, COSTS)
    assert res.errors == 0 and res.prefix_fraction == 1.0 and res.committed == 10
    assert res.tier_blocks["direct"] >= 1
    # held block [1..4] and block [5, 6, 0, 8] verified in one call: 6 accepted + recovered 7; then [8, 9]
    assert res.tier_blocks["full"] == 2
    sure = trace(target, draft, [0.99] * 10)  # the drafter is sure of its wrong token too
    assert simulate([sure], lossy, COSTS).errors > 0 and simulate([sure], checked, COSTS).errors == 0
    assert res.speedup > simulate([trace(target, draft, prob)], sd, COSTS).speedup

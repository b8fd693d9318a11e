"""The routing policy: block confidence scores, route() per mode, escalation, config errors."""

from __future__ import annotations

import math

import pytest

from via_sd_ray.core.policy import Mode, RouterPolicy, Tier, block_confidence, load_block_cap
from via_sd_ray.errors import ConfigError

THRESHOLDS = dict(direct_threshold=0.9, slim_threshold=0.4, escalate_threshold=0.7)


# -- block confidence ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("score", "expected"),
    [("min", 0.5), ("prod", 0.36), ("mean", 2.2 / 3), ("geomean", 0.36 ** (1 / 3))],
)
def test_block_confidence_scores(score, expected):
    assert block_confidence([0.9, 0.5, 0.8], score) == pytest.approx(expected)


@pytest.mark.parametrize("score", ["min", "prod", "mean", "geomean"])
def test_empty_block_has_zero_confidence(score):
    assert block_confidence([], score) == 0.0


def test_scores_order_a_block_between_its_weakest_token_and_its_joint_probability():
    probs = [0.95, 0.6, 0.99, 0.8]
    scores = {s: block_confidence(probs, s) for s in ("min", "prod", "mean", "geomean")}
    assert scores["prod"] <= scores["min"] <= scores["geomean"] <= scores["mean"]
    assert scores["prod"] == pytest.approx(math.prod(probs))


def test_unknown_score_is_a_config_error():
    with pytest.raises(ConfigError, match=r"router\.score.*'median'"):
        block_confidence([0.5], "median")
    with pytest.raises(ConfigError, match=r"router\.score.*'median'"):
        RouterPolicy(score="median")


# -- route --------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [Mode.AR, Mode.SD])
@pytest.mark.parametrize("lossless", [False, True])
def test_ar_and_sd_route_every_block_to_the_full_verifier(mode, lossless):
    policy = RouterPolicy(mode=mode, lossless=lossless, **THRESHOLDS)
    assert {policy.route(c) for c in (0.0, 0.4, 0.5, 0.9, 1.0)} == {Tier.FULL}


@pytest.mark.parametrize(
    ("confidence", "tier"),
    [(1.0, Tier.DIRECT), (0.9, Tier.DIRECT), (0.89, Tier.SLIM), (0.4, Tier.SLIM), (0.39, Tier.FULL), (0.0, Tier.FULL)],
)
def test_via_sd_routes_by_confidence_with_inclusive_thresholds(confidence, tier):
    assert RouterPolicy(mode="via-sd", **THRESHOLDS).route(confidence) is tier


@pytest.mark.parametrize(
    ("confidence", "tier"),
    [(1.0, Tier.FULL), (0.9, Tier.FULL), (0.89, Tier.SLIM), (0.4, Tier.SLIM), (0.39, Tier.FULL)],
)
def test_lossless_via_sd_never_routes_direct(confidence, tier):
    assert RouterPolicy(mode="via-sd", lossless=True, **THRESHOLDS).route(confidence) is tier


def test_only_ar_runs_without_a_drafter():
    assert [RouterPolicy(mode=m).uses_drafter for m in ("ar", "sd", "via-sd")] == [False, True, True]


# -- escalation ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("slim_confidence", "cut"),
    [
        ([0.9, 0.85, 0.6, 0.95], 2),
        ([0.5, 0.95], 0),
        ([0.9, 0.8, 0.75], None),  # the threshold itself is sure enough
        ([0.99], None),
        ([], None),
    ],
)
def test_escalate_at_the_first_position_below_the_threshold(slim_confidence, cut):
    assert RouterPolicy(**THRESHOLDS).escalate_at(slim_confidence) == cut


def test_lossless_escalates_every_slim_candidate_from_its_start():
    policy = RouterPolicy(lossless=True, **THRESHOLDS)
    assert policy.escalate_at([0.99, 0.99]) == 0
    assert policy.escalate_at([1.0]) == 0


# -- configuration errors -----------------------------------------------------------------


@pytest.mark.parametrize("name", ["direct_threshold", "slim_threshold", "escalate_threshold", "draft_stop_threshold"])
@pytest.mark.parametrize("value", [-0.1, 1.5])
def test_threshold_out_of_range_names_the_field_and_the_value(name, value):
    with pytest.raises(ConfigError) as err:
        RouterPolicy(**{name: value, **({"slim_threshold": 0.0} if name == "direct_threshold" else {})})
    assert f"router.{name}" in str(err.value)
    assert "[0, 1]" in str(err.value)
    assert repr(value) in str(err.value)


def test_thresholds_out_of_order_name_both_values():
    with pytest.raises(ConfigError) as err:
        RouterPolicy(direct_threshold=0.6, slim_threshold=0.7)
    message = str(err.value)
    assert message.startswith("router.slim_threshold: expected a value <= direct_threshold")
    assert "slim_threshold=0.7" in message and "direct_threshold=0.6" in message


def test_equal_thresholds_are_allowed():
    policy = RouterPolicy(direct_threshold=0.5, slim_threshold=0.5)
    assert policy.route(0.5) is Tier.DIRECT and policy.route(0.49) is Tier.FULL


@pytest.mark.parametrize("block_size", [0, 65])
def test_block_size_out_of_range(block_size):
    with pytest.raises(ConfigError, match=rf"router\.block_size.*\[1, 64\].*{block_size}"):
        RouterPolicy(block_size=block_size)


def test_unknown_mode_is_a_config_error_naming_the_field():
    with pytest.raises(ConfigError, match=r"router\.mode.*'fast'"):
        RouterPolicy(mode="fast")


def test_policy_is_immutable():
    policy = RouterPolicy()
    with pytest.raises(AttributeError):
        policy.direct_threshold = 0.1


@pytest.mark.parametrize("active, budget, expected", [
    (1, None, None),  # no budget: no cap
    (1, 24, 23), (4, 24, 5), (8, 24, 2), (9, 24, 0),  # 24 // 9 - 1 = 1 < min_block: decode without drafts
    (0, 24, 23),  # the first generation counts as one
])
def test_load_block_cap_spreads_the_verify_budget_over_active_generations(active, budget, expected):
    assert load_block_cap(active, budget, min_block=2) == expected

"""TierLoadPolicy's arithmetic and the load a tier replica reports, without Ray."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from via_sd_ray.serving.autoscaling import TierLoadPolicy


def context(busy=None, queued=None, target=1):
    metrics = {}
    if busy is not None:
        metrics["busy_fraction"] = {f"r{i}": b for i, b in enumerate(busy)}
    if queued is not None:
        metrics["queued_calls"] = {f"r{i}": q for i, q in enumerate(queued)}
    return SimpleNamespace(aggregated_metrics=metrics, target_num_replicas=target, current_num_replicas=target,
                           policy_state={"kept": 1})


@pytest.mark.parametrize("busy, expected", [
    ([0.0], 0.0),  # idle: Serve's min_replicas bound applies
    ([0.3], 0.5),
    ([1.0], 1 / 0.6),  # one saturated replica: grow
    ([0.9, 0.9], 3.0),
])
def test_desired_replicas_fit_the_summed_busy_time_under_the_target(busy, expected):
    desired, state = TierLoadPolicy(target_busy_fraction=0.6)(context(busy, queued=[0] * len(busy)))
    assert desired == pytest.approx(expected)
    assert state["busy_replicas"] == pytest.approx(sum(busy))


def test_queued_calls_raise_the_count_only_when_a_target_is_set():
    ctx = context(busy=[0.5], queued=[12])
    assert TierLoadPolicy(0.5)(ctx)[0] == pytest.approx(1.0)
    assert TierLoadPolicy(0.5, target_queued_calls=4)(ctx)[0] == pytest.approx(3.0)


def test_no_reports_yet_keep_the_current_target():
    assert TierLoadPolicy()(context(target=2)) == (2, {"kept": 1})


@pytest.mark.parametrize("kwargs, field", [({"target_busy_fraction": 0}, "target_busy_fraction"),
                                           ({"target_busy_fraction": 1.5}, "target_busy_fraction"),
                                           ({"target_queued_calls": -1}, "target_queued_calls")])
def test_bad_targets_name_their_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        TierLoadPolicy(**kwargs)


def test_a_tier_reports_its_busy_fraction_and_queue(local_engine):
    from tests.serving.fakes import local_tiers, shutdown
    from via_sd_ray.core.engine import VerifyCall
    from via_sd_ray.core.policy import Tier
    from via_sd_ray.core.sampling import SamplingParams

    clients = local_tiers(local_engine, local_engine.config)
    server = clients["full"].server
    try:
        async def scenario():
            idle = await server.record_autoscaling_stats()
            await asyncio.sleep(0.05)
            idle = await server.record_autoscaling_stats()
            calls = [VerifyCall(Tier.FULL, f"g{i}", list(range(5, 250)), [], SamplingParams(max_tokens=4), 0)
                     for i in range(6)]
            await asyncio.gather(*(server.verify(c) for c in calls))
            return idle, await server.record_autoscaling_stats()

        idle, loaded = asyncio.run(asyncio.wait_for(scenario(), 60))
    finally:
        shutdown(clients)
    assert idle["busy_fraction"] == 0.0 and idle["queued_calls"] == 0.0
    assert 0.0 < loaded["busy_fraction"] <= 1.0
    assert loaded["active_generations"] == 6.0

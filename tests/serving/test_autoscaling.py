"""Tiers on the nodes meant for them, and per-tier autoscaling on tier load, on a multi-node local
Ray cluster (``multinode_scenario.py``, run in its own process: the other serving tests hold a
one-node cluster for the whole session)."""

from __future__ import annotations

import pytest


@pytest.mark.scenario("tests.serving.multinode_scenario")
def test_low_confidence_burst_scales_the_full_verifier_only_and_settles_back(scenario):
    code, record, log = scenario(timeout_s=480)
    print(log)  # the replica counts over time (pytest -s, or shown on failure)
    assert code == 0, log
    assert set(record["placement"]) == {"Router", "Drafter", "SlimVerifier", "FullVerifier"}
    assert all(p["on_its_node"] for p in record["placement"].values()), record["placement"]
    assert record["errors"] == [] and record["requests"] > 0
    load = [row for row in record["timeline"] if row["phase"] == "load"]
    assert max(row["FullVerifier"] for row in load) >= 2, (record.get("tier_stats"), record["requests"],
                                                            record["timeline"])
    assert max(row["Drafter"] for row in record["timeline"]) == 1, record["timeline"]
    assert max(row["SlimVerifier"] for row in record["timeline"]) == 1, record["timeline"]
    assert record["timeline"][-1] | {"t": 0, "phase": ""} == {
        "t": 0, "phase": "", "Drafter": 1, "SlimVerifier": 1, "FullVerifier": 1}, record["timeline"]

"""Tiers on the nodes meant for them, and per-tier autoscaling on tier load, on a multi-node local
Ray cluster (``multinode_scenario.py``, run in its own process: the other serving tests hold a
one-node cluster for the whole session)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_low_confidence_burst_scales_the_full_verifier_only_and_settles_back(tmp_path):
    out = tmp_path / "scenario.json"
    run = subprocess.run([sys.executable, "-m", "tests.serving.multinode_scenario", str(out)], cwd=ROOT,
                         capture_output=True, text=True, timeout=420)
    print(run.stdout)  # the replica counts over time (pytest -s, or shown on failure)
    assert run.returncode == 0, run.stderr[-3000:]
    record = json.loads(out.read_text())
    assert set(record["placement"]) == {"Router", "Drafter", "SlimVerifier", "FullVerifier"}
    assert all(p["on_its_node"] for p in record["placement"].values()), record["placement"]
    assert record["errors"] == [] and record["requests"] > 0
    load = [row for row in record["timeline"] if row["phase"] == "load"]
    assert max(row["FullVerifier"] for row in load) >= 2, record["timeline"]
    assert max(row["Drafter"] for row in record["timeline"]) == 1, record["timeline"]
    assert max(row["SlimVerifier"] for row in record["timeline"]) == 1, record["timeline"]
    assert record["timeline"][-1] | {"t": 0, "phase": ""} == {
        "t": 0, "phase": "", "Drafter": 1, "SlimVerifier": 1, "FullVerifier": 1}, record["timeline"]

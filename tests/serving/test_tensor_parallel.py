"""Tensor-parallel verifier tiers: tp = 2 over Ray gives the tokens of tp = 1 (``tp_scenario.py``, in
its own process and Ray cluster: the other serving tests hold a one-node cluster for the session),
a dead worker fails the replica's health check, and the launcher reads its bundles from config."""

from __future__ import annotations

import asyncio
import importlib.util
import json
from types import SimpleNamespace

import pytest

from tests.models.test_sharded import InlinePeers, worker_stacks
from via_sd_ray.config import parse_config
from via_sd_ray.errors import ConfigError
from via_sd_ray.models.ds_engine import Rendezvous
from via_sd_ray.models.runner import TierRunner
from via_sd_ray.models.sharded import ShardedStack, ShardFailure, ShardGroup, ShardSpec, ShardWorker
from via_sd_ray.serving.tiers import TierServer
from via_sd_ray.serving.tp_workers import RayShardLauncher, shard_launcher

TINY = {"models": {"drafter": {"source": "tiny-random:drafter", "dtype": "float64", "quantization": "none"},
                   "verifier": {"source": "tiny-random:verifier", "dtype": "float64"}},
        "slim": {"layers": [0, 1, 3]}}


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                    reason="deepspeed is not installed (pip install 'via-sd-ray[deepspeed]')")
@pytest.mark.scenario("tests.serving.tp_scenario", "tiny")
def test_tp2_in_a_placement_group_gives_the_tokens_of_tp1_and_a_dead_rank_fails_it(scenario):
    code, record, log = scenario(timeout_s=540)
    print(json.dumps(record, indent=1)[:4000])
    assert code == 0, log
    info = record["tp2_info"]
    assert (info["q_proj"], info["o_proj"], info["lm_head"]) == ("LinearLayer", "LinearAllreduce",
                                                                 "LmHeadLinearAllreduce")
    assert info["kv_heads"] == 1 and info["q_rows"] == 32  # half of the tiny model's 2 KV heads and 64 q rows
    assert record["compared"] == 12 and record["mismatches"] == {}
    assert record["slim_blocks"] > 0
    assert record["healthy_before_kill"] is None
    assert record["check_after_kill"].startswith("ShardFailure"), record["check_after_kill"]
    assert record["generate_after_kill"].startswith("ShardFailure"), record["generate_after_kill"]
    # served: the router sees one replica per verifier tier; a dead rank gets the replica replaced
    assert record["served_mismatches"] == [] and record["full_verifier_workers"] == 1
    assert record["recovered_tokens_equal"] is True, record.get("failures_while_replaced")


def server_over(peers) -> TierServer:
    config = parse_config(TINY)
    group = ShardGroup(peers)
    runner = TierRunner(ShardedStack(worker_stacks()["full"], "full", group), name="full")
    return TierServer(config, "full", runner=runner, metrics=False)


def test_health_check_fails_when_a_tensor_parallel_worker_is_gone():
    peers = InlinePeers([ShardWorker(worker_stacks())])
    server = server_over(peers)
    asyncio.run(server.check_health())
    peers.dead = True
    with pytest.raises(ShardFailure, match="health check"):
        asyncio.run(server.check_health())


def test_a_worker_failing_a_pass_breaks_the_replica_for_good():
    from via_sd_ray.core.engine import VerifyCall
    from via_sd_ray.core.policy import Tier
    from via_sd_ray.core.sampling import SamplingParams

    class Broken(ShardWorker):
        def run(self, call):
            raise RuntimeError("gloo: connection closed by peer")

    server = server_over(InlinePeers([Broken(worker_stacks())]))
    call = VerifyCall(Tier.FULL, "g", [5, 6, 7], [8, 9], SamplingParams(max_tokens=8), seed=0)
    with pytest.raises(ShardFailure):
        asyncio.run(server.verify(call))
    with pytest.raises(RuntimeError, match="FullVerifier model runner is broken: ShardFailure"):
        asyncio.run(server.check_health())


def test_launcher_wants_a_bundle_per_rank():
    spec = ShardSpec(parse_config(TINY).models.verifier, None, {"full": None}, Rendezvous("127.0.0.1", 1, 2))
    one_bundle = SimpleNamespace(bundle_specs=[{"CPU": 1.0}])
    with pytest.raises(ConfigError, match=r"serving.deployments.SlimVerifier.placement_group_bundles: expected 2 "
                                          r"bundles .* received 1"):
        RayShardLauncher("SlimVerifier", one_bundle).start(spec)


def test_only_verifier_tiers_with_several_ranks_get_a_launcher():
    tp2 = parse_config({**TINY, "models": {**TINY["models"], "verifier": {
        "source": "tiny-random:verifier", "dtype": "float32", "engine": "deepspeed", "tensor_parallel_size": 2}}})
    assert shard_launcher(parse_config(TINY), "full") is None
    assert shard_launcher(tp2, "drafter") is None
    assert [shard_launcher(tp2, tier).deployment for tier in ("slim", "full")] == ["SlimVerifier", "FullVerifier"]

"""Tier calls that land on a replica without the generation's KV cache rebuild it from token ids;
with affinity on, a generation's calls stay on one replica."""

from __future__ import annotations

import copy
import time

import pytest
from ray import serve

from tests.serving.conftest import SERVING_ARGS
from via_sd_ray.core.sampling import SamplingParams
from via_sd_ray.serving.app import build_app
from via_sd_ray.serving.router import GenerateRequest

PROMPTS = ["def quicksort(xs):", "SELECT * FROM", "The cache was", "class Tree:"]


def two_full_replicas(affinity: bool) -> dict:
    args = copy.deepcopy(SERVING_ARGS)
    args["serving"]["affinity"] = affinity
    args["serving"]["cache_idle_timeout_s"] = 2.0  # caches left on a replica a generation moved away from
    args["serving"]["deployments"]["FullVerifier"]["num_replicas"] = 2
    args["router"]["direct_threshold"] = 1.0  # every block goes to a verifier
    args["router"]["slim_threshold"] = 1.0
    return args


def replica_stats(app_name: str) -> dict[str, dict]:
    """Stats of every FullVerifier replica (calls are routed at random until both answered)."""
    handle = serve.get_deployment_handle("FullVerifier", app_name)
    seen, deadline = {}, time.monotonic() + 60
    while len(seen) < 2 and time.monotonic() < deadline:
        stats = handle.stats.remote().result(timeout_s=30)
        seen[stats["replica"]] = stats
    assert len(seen) == 2, seen
    return seen


@pytest.mark.parametrize("affinity", [False, True])
def test_generations_survive_replicas_without_their_cache(cluster, local_engine, affinity):
    name = f"rebuild-{affinity}"
    serve.run(build_app(two_full_replicas(affinity)), name=name, route_prefix=f"/{name}")
    try:
        router = serve.get_deployment_handle("Router", name)
        policy = local_engine.config.router.policy(direct_threshold=1.0, slim_threshold=1.0)
        for prompt in PROMPTS:
            events = list(router.options(stream=True).generate.remote(
                GenerateRequest(prompt=prompt, max_tokens=40)))
            got = [t for e in events for t in e["token_ids"]]
            want = local_engine.generate(local_engine.encode(prompt), SamplingParams(max_tokens=40), policy)
            assert got == want.token_ids
        stats = replica_stats(name)
        calls = sum(s["calls"] for s in stats.values())
        misses = sum(s["cache_misses"] for s in stats.values())
        assert calls > 4 * len(PROMPTS)
        if affinity:
            assert misses == len(PROMPTS)  # one cache per generation, never rebuilt
        else:
            assert misses > len(PROMPTS)  # generations moved between replicas and rebuilt their caches
        deadline = time.monotonic() + 30  # released when generations end, or expired when idle
        while any(s["caches"] for s in replica_stats(name).values()) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not any(s["caches"] for s in replica_stats(name).values())
    finally:
        serve.delete(name)

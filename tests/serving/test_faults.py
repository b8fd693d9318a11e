"""Replica faults on a real local Ray Serve: a tier replica killed (SIGKILL, by its own pid) in the
middle of a streamed generation, and the Router replica killed likewise.

A dead tier replica: the router retries the tier call; Serve's replacement rebuilds the KV cache
from the token ids the call carries; the stream goes on without a repeated or skipped token, and
greedy output equals a fault-free run. A dead Router replica: the stream ends with an explicit
retriable error (SSE error frame with status 503, gRPC UNAVAILABLE), never a silent truncation,
and the next request is served.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import time

import grpc
import httpx
import pytest
from ray import serve

from tests.serving.conftest import SERVING_ARGS
from via_sd_ray.core.sampling import SamplingParams
from via_sd_ray.serving.app import build_app
from via_sd_ray.serving.grpc_gen import via_sd_pb2 as pb
from via_sd_ray.serving.grpc_gen import via_sd_pb2_grpc as pb_grpc

APP = "faults"
PROMPT = "def binary_search(xs, x):"
MAX_TOKENS = 160
# per-request thresholds that make the killed tier decide every block after the kill
ROUTE_TO = {
    "Drafter": {},  # every block is drafted
    "SlimVerifier": {"direct_threshold": 1.0, "slim_threshold": 0.0},
    "FullVerifier": {"direct_threshold": 1.0, "slim_threshold": 1.0},
}


@pytest.fixture(scope="module")
def app(cluster):
    args = copy.deepcopy(SERVING_ARGS)
    args["serving"]["tier_retries"] = 6  # with backoff up to 2 s: ~8 s for Serve to start a replacement
    serve.run(build_app(args), name=APP, route_prefix=f"/{APP}")
    yield f"{cluster.http}/{APP}"
    serve.delete(APP)


def pid_of(deployment: str) -> int:
    return serve.get_deployment_handle(deployment, APP).stats.remote().result(timeout_s=60)["pid"]


def sse_events(response):
    for line in response.iter_lines():
        if line.startswith("data: ") and line != "data: [DONE]":
            yield json.loads(line[len("data: "):])


def stream_and_kill(base: str, deployment: str, body_extra: dict) -> tuple[list[dict], int]:
    """Stream a completion and SIGKILL ``deployment``'s replica after the second chunk."""
    body = {"model": "via-sd-tiny", "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0,
            "ignore_eos": True, "stream": True, "via_sd": {"return_token_ids": True, **body_extra}}
    victim = pid_of(deployment)
    events, after_kill = [], 0
    with httpx.Client(base_url=base, timeout=120) as http, http.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        for event in sse_events(r):
            events.append(event)
            if len(events) == 2:
                os.kill(victim, signal.SIGKILL)
            elif len(events) > 2:
                after_kill += 1
    return events, victim


def wait_for_new_replica(deployment: str, old_pid: int, limit_s: float = 60) -> dict:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        try:
            stats = serve.get_deployment_handle(deployment, APP).stats.remote().result(timeout_s=30)
            if stats["pid"] != old_pid:
                return stats
        except Exception:  # the replica is being replaced
            pass
        time.sleep(0.5)
    raise AssertionError(f"{deployment}: no replacement replica within {limit_s} s")


@pytest.mark.parametrize("deployment", ["Drafter", "SlimVerifier", "FullVerifier"])
def test_a_tier_replica_killed_mid_stream_changes_nothing_in_the_output(app, local_engine, deployment):
    events, victim = stream_and_kill(app, deployment, ROUTE_TO[deployment])
    assert all("error" not in e for e in events), events[-1]
    streamed = [t for e in events for t in e["choices"][0]["token_ids"]]
    policy = local_engine.config.router.policy(**ROUTE_TO[deployment])
    want = local_engine.generate(local_engine.encode(PROMPT), SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True),
                                 policy).token_ids
    assert streamed == want  # neither a repeated nor a skipped token
    assert events[-1]["choices"][0]["finish_reason"] == "length"
    replacement = wait_for_new_replica(deployment, victim)
    # the generation went on at the replacement, which rebuilt its cache from the call's token ids
    assert replacement["calls"] > 0 and replacement["cache_misses"] >= 1, replacement


def test_router_killed_mid_stream_ends_the_stream_with_a_retriable_error(app, cluster):
    events, victim = stream_and_kill(app, "Router", {})
    assert "error" in events[-1], f"silent truncation: the last event is {events[-1]}"
    error = events[-1]["error"]
    assert error["code"] == "service_unavailable" and "retry" in error["message"], error
    wait_for_new_replica("Router", victim)
    with httpx.Client(base_url=app, timeout=60) as http:
        ok = http.post("/v1/completions", json={"model": "via-sd-tiny", "prompt": PROMPT, "max_tokens": 8})
    assert ok.status_code == 200, ok.text

    # gRPC: the same fault ends the stream with UNAVAILABLE
    victim = pid_of("Router")
    channel = grpc.insecure_channel(cluster.grpc)
    stub = pb_grpc.ViaSDStub(channel)
    request = pb.GenerateRequest(prompt=PROMPT, max_tokens=MAX_TOKENS, ignore_eos=True)
    chunks = 0
    with pytest.raises(grpc.RpcError) as err:
        for _ in stub.GenerateStream(request, metadata=(("application", APP),), timeout=120):
            chunks += 1
            if chunks == 2:
                os.kill(victim, signal.SIGKILL)
    channel.close()
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value.details()
    assert "retry" in err.value.details()
    wait_for_new_replica("Router", victim)

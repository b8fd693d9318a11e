"""Readiness on a real local Ray: an application whose full verifier is slow to load (tests/serving/gated.py)
answers /health 503 and gRPC Health NOT_SERVING while it loads (liveness and the model list answer
already), then 200 / SERVING once the tier has loaded and warmed up, and the first request is served."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from ray import serve

from tests.serving.apps import _wait, applications
from tests.serving.conftest import SERVING_ARGS
from tests.serving.gated import gated_app
from via_sd_ray.serving import openai_api as oa

NAME = "gated"
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


def _status(url: str) -> int | None:
    try:
        return httpx.get(url, timeout=10).status_code
    except httpx.HTTPError:
        return None


@pytest.fixture
def gated(cluster, tmp_path):
    """(base URL, gRPC metadata, gate path, the serve.run future): the app deploying, its full verifier held."""
    gate = tmp_path / "open"
    pool = ThreadPoolExecutor(1)
    deploying = pool.submit(serve.run, gated_app(SERVING_ARGS, str(gate)), name=NAME, route_prefix=f"/{NAME}")
    base, metadata = f"{cluster.http}/{NAME}", (("application", NAME),)
    try:
        yield base, metadata, gate, deploying
    finally:
        gate.touch()  # let the replica start, so serve.run returns
        try:
            deploying.result(timeout=180)
        finally:
            pool.shutdown(wait=False)
            serve.delete(NAME)
            _wait(lambda: NAME not in applications(cluster.grpc), f"the gRPC proxy forgets {NAME}")


def test_health_is_503_until_a_slow_tier_loads_then_200(cluster, gated):
    base, metadata, gate, deploying = gated
    # the ingress answers (its liveness) while the full verifier is still "loading"
    _wait(lambda: _status(f"{base}/livez") == 200, f"{base}/livez answers", limit_s=120)
    _wait(lambda: NAME in applications(cluster.grpc), f"the gRPC proxy routes to {NAME}")
    answers = []

    def waits_for_the_full_verifier_only() -> bool:  # the router may still be starting at first
        response = httpx.get(f"{base}/health", timeout=10)
        answers.append((response.status_code, response.json()["error"]["message"], response.headers))
        return answers[-1][1].startswith("not ready: FullVerifier: ")

    _wait(waits_for_the_full_verifier_only, "/health waits for the FullVerifier alone", limit_s=120)
    assert {status for status, _, _ in answers} == {503}, answers
    assert all(headers["retry-after"] for _, _, headers in answers)
    message = answers[-1][1]
    assert httpx.get(f"{base}/health", timeout=10).json() == oa.error_body(message, 503)
    assert httpx.get(f"{base}/v1/models", timeout=10).status_code == 200  # may answer earlier
    assert not deploying.done()  # serve.run still waits for the app

    with grpc.insecure_channel(cluster.grpc) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        assert health.Check(health_pb2.HealthCheckRequest(), metadata=metadata, timeout=30).status == NOT_SERVING
        watch = health.Watch(health_pb2.HealthCheckRequest(service="via_sd.v1.ViaSD"), metadata=metadata,
                             timeout=240)
        statuses, first = [], threading.Event()

        def follow():
            try:
                for message in watch:
                    statuses.append(message.status)
                    first.set()
                    if message.status == SERVING:
                        return
            except grpc.RpcError:  # cancelled below if the test fails first
                pass

        follower = threading.Thread(target=follow, daemon=True)
        follower.start()
        try:
            assert first.wait(60) and statuses[0] == NOT_SERVING
            started = time.monotonic()
            gate.touch()  # the model "loads" now
            _wait(lambda: _status(f"{base}/health") == 200, f"{base}/health answers 200", limit_s=180)
            follower.join(timeout=30)
            assert statuses == [NOT_SERVING, SERVING], statuses
        finally:
            watch.cancel()
        assert health.Check(health_pb2.HealthCheckRequest(), metadata=metadata, timeout=30).status == SERVING
    assert httpx.get(f"{base}/health", timeout=10).json() == {"status": "ok", "model": "via-sd-tiny"}
    deploying.result(timeout=120)  # the app is RUNNING: every replica started
    completion = httpx.post(f"{base}/v1/completions", json={"model": "via-sd-tiny", "prompt": "def f(",
                                                           "max_tokens": 8}, timeout=60)
    assert completion.status_code == 200, completion.text
    assert completion.json()["usage"]["completion_tokens"] >= 1
    assert time.monotonic() - started < 180

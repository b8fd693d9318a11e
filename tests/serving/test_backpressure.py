"""Backpressure on the session's local Ray Serve: with one request running and one queued, excess load
gets HTTP 429 with Retry-After and gRPC RESOURCE_EXHAUSTED, and the accepted requests complete.

Two places refuse work, each in its own application:
- the Ingress (Serve's proxy refuses; the status and Retry-After come from the Ingress's
  ``backpressure_config``, which via-sd sets to 429 and 1 s by default), and
- the Router (the Ingress's handle raises ``BackPressureError``; the Ingress maps it).
A long greedy stream holds the one running slot while a burst arrives, so which requests are
refused does not depend on timing; the test checks that premise instead of sleeping.
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import httpx
import pytest
from ray.serve.exceptions import BackPressureError

from tests.serving.apps import deployed, tiny_args
from via_sd_ray.config import parse_config
from via_sd_ray.core.sampling import SamplingParams
from via_sd_ray.serving import ingress
from via_sd_ray.serving.grpc_gen import via_sd_pb2 as pb

MODEL = "via-sd-tiny"
LONG = {"prompt": "def f(x):", "max_tokens": 256, "ignore_eos": True, "mode": "ar"}  # ~256 sequential tier calls
SHORT = {"prompt": "import numpy as np\n", "max_tokens": 8}
ONE_SLOT = {"max_ongoing_requests": 1, "max_queued_requests": 1}


def reference(engine, prompt: str, max_tokens: int, mode: str = "via-sd", ignore_eos: bool = False) -> list[int]:
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=ignore_eos)
    return engine.generate(engine.encode(prompt), params, engine.config.router.policy(mode=mode)).token_ids


class LongStream(threading.Thread):
    """Streams LONG over HTTP; ``started`` is set once its first block arrived, ``done_at`` when it ended."""

    def __init__(self, base: str):
        super().__init__(daemon=True)
        self.base, self.started, self.token_ids, self.done_at, self.error = base, threading.Event(), [], None, None

    def run(self):
        body = {"model": MODEL, "prompt": LONG["prompt"], "max_tokens": LONG["max_tokens"], "temperature": 0,
                "ignore_eos": True, "stream": True, "via_sd": {"mode": LONG["mode"], "return_token_ids": True}}
        try:
            with httpx.Client(timeout=120) as client, client.stream("POST", f"{self.base}/v1/completions",
                                                                    json=body) as response:
                assert response.status_code == 200, response.read()
                for line in response.iter_lines():
                    if line.startswith("data: {"):
                        chunk = json.loads(line.removeprefix("data: "))
                        assert "error" not in chunk, chunk
                        self.token_ids += chunk["choices"][0]["token_ids"]
                        self.started.set()
            self.done_at = time.monotonic()
        except BaseException as err:  # reported by the test thread
            self.error = err
            self.started.set()


def http_short(base: str) -> tuple[str, float, object]:
    response = httpx.post(f"{base}/v1/completions", timeout=120, json={
        "model": MODEL, "prompt": SHORT["prompt"], "max_tokens": SHORT["max_tokens"], "temperature": 0,
        "via_sd": {"return_token_ids": True}})
    return "http", time.monotonic(), response


def grpc_short(address: str, metadata) -> tuple[str, float, object]:
    with grpc.insecure_channel(address) as channel:
        generate = channel.unary_unary("/via_sd.v1.ViaSD/Generate",
                                       request_serializer=pb.GenerateRequest.SerializeToString,
                                       response_deserializer=pb.GenerateResponse.FromString)
        try:
            out = generate(pb.GenerateRequest(prompt=SHORT["prompt"], max_tokens=SHORT["max_tokens"]),
                           metadata=metadata, timeout=120)
        except grpc.RpcError as err:
            out = err
    return "grpc", time.monotonic(), out


def burst_while_one_runs(app, local_engine, per_protocol: int = 3) -> dict[str, list]:
    """Hold the running slot with a long stream, send a burst, check every answer; return them by kind."""
    long = LongStream(app.http)
    long.start()
    assert long.started.wait(120) and long.error is None, long.error
    with ThreadPoolExecutor(2 * per_protocol) as pool:
        futures = [pool.submit(http_short, app.http) for _ in range(per_protocol)]
        futures += [pool.submit(grpc_short, app.grpc, app.metadata) for _ in range(per_protocol)]
        answers = [f.result(timeout=180) for f in futures]
    long.join(180)
    assert not long.is_alive() and long.error is None, long.error
    assert long.token_ids == reference(local_engine, LONG["prompt"], LONG["max_tokens"], LONG["mode"], True)

    want = reference(local_engine, SHORT["prompt"], SHORT["max_tokens"])
    kinds: dict[str, list] = {"accepted": [], "http_refused": [], "grpc_refused": []}
    for protocol, at, out in answers:
        if protocol == "http" and out.status_code == 429:
            assert int(out.headers["retry-after"]) >= 1, out.headers
            assert at < long.done_at, "the long stream ended before the burst was refused: make LONG longer"
            kinds["http_refused"].append(out.text)
        elif protocol == "grpc" and isinstance(out, grpc.RpcError):
            assert out.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, (out.code(), out.details())
            assert at < long.done_at, "the long stream ended before the burst was refused: make LONG longer"
            kinds["grpc_refused"].append(out.details())
        else:  # accepted: queued behind the long stream, then served in full
            assert protocol == "grpc" or out.status_code == 200, out.text
            got = out.json()["choices"][0]["token_ids"] if protocol == "http" else list(out.token_ids)
            assert got == want
            kinds["accepted"].append(protocol)
    print({kind: len(items) for kind, items in kinds.items()}, kinds["http_refused"][:1], kinds["grpc_refused"][:1])
    assert kinds["accepted"] and kinds["http_refused"] and kinds["grpc_refused"], kinds
    return kinds


def test_ingress_backpressure_gives_429_and_resource_exhausted(cluster, local_engine):
    with deployed(cluster, "bp-ingress", tiny_args(Ingress=ONE_SLOT)) as app:
        kinds = burst_while_one_runs(app, local_engine)
    assert all("backpressure" in text for text in kinds["http_refused"] + kinds["grpc_refused"]), kinds


def test_router_backpressure_gives_429_and_resource_exhausted(cluster, local_engine):
    with deployed(cluster, "bp-router", tiny_args(Router=ONE_SLOT)) as app:
        kinds = burst_while_one_runs(app, local_engine)
    # refused by the Ingress's handle to the Router: the Ingress answers, in OpenAI's error shape
    for text in kinds["http_refused"]:
        error = json.loads(text)["error"]
        assert error["type"] == "rate_limit_error" and error["code"] == "rate_limit_exceeded", error
        assert error["message"].startswith("the server is at capacity, retry after 1 s"), error
    assert len(kinds["accepted"]) == 1, kinds  # one Router slot queued behind the running one, the rest refused
    assert all(d.startswith("the server is at capacity") for d in kinds["grpc_refused"]), kinds


# -- the mapping, without a server ---------------------------------------------------------------

@pytest.mark.parametrize(("retry_after_s", "header"), [(None, "1"), (2.5, "3"), (0, "0")])
def test_backpressure_error_maps_to_429_with_retry_after(retry_after_s, header):
    error = BackPressureError(num_queued_requests=1, max_queued_requests=1, status_code=429,
                              retry_after_s=retry_after_s)
    status, code, message = ingress.status_of(error)
    assert (status, code) == (429, "RESOURCE_EXHAUSTED") and "max_queued_requests=1" in message
    response = ingress._error_response(error)
    assert response.status_code == 429 and response.headers["retry-after"] == header
    assert json.loads(response.body)["error"]["type"] == "rate_limit_error"
    assert json.loads(response.body)["error"]["param"] is None


def test_front_deployments_default_to_429_with_retry_after():
    config = parse_config({})
    for name in ("Ingress", "Router"):
        assert config.serving.deployments[name].serve_options()["backpressure_config"] == {
            "status_code": 429, "retry_after_s": 1.0}


def test_max_queued_requests_zero_is_refused():
    from via_sd_ray.errors import ConfigError

    with pytest.raises(ConfigError, match=r"serving.deployments.Router.max_queued_requests: expected -1"):
        parse_config({"serving": {"deployments": {"Router": {"max_queued_requests": 0}}}})

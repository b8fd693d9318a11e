"""Extra applications in the session's cluster (``conftest.py``): the tiny config with a few changes,
under its own name and route prefix, deleted afterwards.

With more than one application, Serve's gRPC proxy routes by the ``application`` metadata key, so
calls to an extra app carry ``App.metadata``; ``deployed`` waits until the proxies route to the app,
and after deleting it until they stop, so the other tests' gRPC calls (which name no app) keep
reaching the only one left.
"""

from __future__ import annotations

import copy
import time
from contextlib import contextmanager
from dataclasses import dataclass

import grpc
import httpx
from ray import serve
from ray.serve.generated import serve_pb2, serve_pb2_grpc

from tests.serving.conftest import SERVING_ARGS
from via_sd_ray.serving.app import build_app

MAIN_APP = "via-sd"


@dataclass
class App:
    name: str
    http: str  # base URL: http://127.0.0.1:PORT/<name>
    grpc: str  # 127.0.0.1:PORT
    metadata: tuple[tuple[str, str], ...]  # gRPC metadata that routes to this app


def tiny_args(**deployments) -> dict:
    """The session's tiny config with per-deployment Serve options merged in."""
    args = copy.deepcopy(SERVING_ARGS)
    for name, options in deployments.items():
        args["serving"]["deployments"][name] = {**args["serving"]["deployments"][name], **options}
    return args


def applications(grpc_address: str) -> list[str]:
    with grpc.insecure_channel(grpc_address) as channel:
        stub = serve_pb2_grpc.RayServeAPIServiceStub(channel)
        return list(stub.ListApplications(serve_pb2.ListApplicationsRequest(), timeout=10).application_names)


def _wait(condition, what: str, limit_s: float = 60.0) -> None:
    deadline = time.monotonic() + limit_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {limit_s:.0f} s waiting until {what}"
        time.sleep(0.25)


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


@contextmanager
def deployed(cluster, name: str, args: dict):
    serve.run(build_app(args), name=name, route_prefix=f"/{name}")
    try:
        app = App(name, f"{cluster.http}/{name}", cluster.grpc, (("application", name),))
        _wait(lambda: _answers(f"{app.http}/health"), f"{app.http}/health answers")
        _wait(lambda: name in applications(cluster.grpc), f"the gRPC proxy routes to {name}")
        yield app
    finally:
        serve.delete(name)
        _wait(lambda: name not in applications(cluster.grpc), f"the gRPC proxy forgets {name}")

"""Readiness without Ray (serving/health.py): the Readiness rules (time limit, a yes kept a few seconds,
busy is not unready), a TierServer's warm-up and ``ready``, the Router's per-tier readiness, and the
Ingress's /health, /livez and grpc.health.v1 Check / Watch over a stand-in router. Served end to end:
test_readiness.py."""

from __future__ import annotations

import asyncio
import json

import pytest
from grpc_health.v1 import health_pb2

from tests.serving.fakes import fresh_runners
from via_sd_ray.core.ngram import PromptLookupDrafter
from via_sd_ray.serving import health
from via_sd_ray.serving import openai_api as oa
from via_sd_ray.serving.health import Readiness
from via_sd_ray.serving.ingress import Ingress
from via_sd_ray.serving.router import GenerationRouter
from via_sd_ray.serving.tiers import TierServer

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


def run(coro, limit_s: float = 30.0):
    return asyncio.run(asyncio.wait_for(coro, limit_s))


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Probe:
    """Answers ``answers`` in turn (a str: not ready; None: ready; "hang": never answers; an exception: raised)."""

    def __init__(self, *answers):
        self.answers, self.calls = list(answers), 0

    async def __call__(self):
        self.calls += 1
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if answer == "hang":
            await asyncio.sleep(3600)
        if isinstance(answer, BaseException):
            raise answer
        return answer


# ---- Readiness ---------------------------------------------------------------------------------


def test_a_yes_is_kept_for_cache_s_and_a_no_is_asked_again():
    clock, probe = Clock(), Probe("loading", None, "broken")
    readiness = Readiness(probe, timeout_s=1, cache_s=5, clock=clock)

    async def scenario():
        answers = [await readiness.check()]  # no
        answers.append(await readiness.check())  # asked again: yes
        clock.now += 4.9
        answers.append(await readiness.check())  # kept
        clock.now += 0.2
        answers.append(await readiness.check())  # asked again: no
        return answers

    assert run(scenario()) == ["loading", None, None, "broken"] and probe.calls == 3


def test_a_timeout_is_not_ready_at_start_but_busy_once_ready():
    clock = Clock()
    probe = Probe("hang", None, "hang", "tier died", "hang")
    readiness = Readiness(probe, timeout_s=0.05, name="Router", cache_s=1, clock=clock)

    async def scenario():
        answers = []
        for _ in range(5):
            answers.append(await readiness.check())
            clock.now += 2  # past the cache
        return answers

    first, ready, busy, died, after = run(scenario())
    assert first == "Router: no answer within 0.05 s (still starting)"
    assert ready is None and busy is None  # a saturated router keeps its last answer
    assert died == "tier died"
    assert after.startswith("Router: no answer")  # after a definite no, a timeout is a no again


def test_an_error_is_a_definite_no_naming_it():
    readiness = Readiness(Probe(RuntimeError("replica gone")), timeout_s=1, name="Router")
    assert run(readiness.check()) == "Router: RuntimeError: replica gone"


def test_ask_cancels_the_request_when_the_waiter_gives_up():
    class Response:
        cancelled = False

        def __await__(self):
            return asyncio.sleep(3600).__await__()

        def cancel(self):
            self.cancelled = True

    response = Response()

    async def scenario():
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(health.ask(response), 0.05)

    run(scenario())
    assert response.cancelled


# ---- TierServer: warm-up and ready -------------------------------------------------------------


@pytest.mark.parametrize("tier", ["drafter", "slim", "full"])
def test_warm_up_runs_one_call_and_leaves_no_trace(local_engine, tier):
    runner = fresh_runners(local_engine)[tier]
    before = dict(vars(runner.stats))
    server = TierServer(local_engine.config, tier, runner=runner, metrics=None, warm_up=True)
    try:
        assert server.warm_up_s is not None and server.warm_up_s > 0
        assert runner.caches == {} and runner.last_used == {}  # its cache released
        assert dict(vars(runner.stats)) == before  # not counted as traffic
        assert server.stats()["warm_up_s"] == server.warm_up_s
        assert run(server.ready()) is True
    finally:
        server.batcher.shutdown()


def test_an_injected_runner_is_warmed_only_when_asked(local_engine):
    server = TierServer(local_engine.config, "full", runner=fresh_runners(local_engine)["full"], metrics=None)
    lookup = TierServer(local_engine.config, "drafter", runner=PromptLookupDrafter(3, 1), metrics=None, warm_up=True)
    try:
        assert server.warm_up_s is None and lookup.warm_up_s is not None  # a model-free drafter warms up too
    finally:
        server.batcher.shutdown()
        lookup.batcher.shutdown()


def test_a_broken_runner_is_not_ready(local_engine):
    server = TierServer(local_engine.config, "slim", runner=fresh_runners(local_engine)["slim"], metrics=None)
    try:
        server.failed = "RuntimeError: device lost"
        assert run(server.ready()) is False
    finally:
        server.batcher.shutdown()


# ---- Router.readiness --------------------------------------------------------------------------


class TierStandIn:
    """The ready() of a TierClient: answers ``ready`` (True / False) after ``delay_s``."""

    def __init__(self, ready: bool = True, delay_s: float = 0.0):
        self.ready_answer, self.delay_s, self.calls = ready, delay_s, 0

    async def ready(self) -> bool:
        self.calls += 1
        await asyncio.sleep(self.delay_s)
        return self.ready_answer


def router_over(local_engine, **tiers) -> GenerationRouter:
    from via_sd_ray.models.tiers import text_info

    clients = {name: tiers.get(name, TierStandIn()) for name in ("drafter", "slim", "full")}
    return GenerationRouter(local_engine.config, clients["drafter"], clients["slim"], clients["full"],
                            text=text_info(local_engine.config), metrics=None)


def test_router_readiness_names_each_tier_and_keeps_a_yes(local_engine, monkeypatch):
    monkeypatch.setattr(health, "TIER_TIMEOUT_S", 0.1)
    loading, broken = TierStandIn(delay_s=3600), TierStandIn(ready=False)
    router = router_over(local_engine, slim=loading, full=broken)
    reasons = run(router.readiness())
    assert reasons == {"drafter": None, "slim": "no answer within 0.1 s (still starting)",
                       "full": "its model runner is broken"}
    assert run(router.ready()) is False

    drafter = TierStandIn()
    ready = router_over(local_engine, drafter=drafter)
    assert run(ready.readiness()) == {"drafter": None, "slim": None, "full": None}
    assert run(ready.ready()) is True and drafter.calls == 1  # the second answer came from the cache


# ---- Ingress: /health, /livez, Check, Watch ----------------------------------------------------


class RouterStandIn:
    """A Router handle whose ``readiness.remote()`` answers ``reasons`` (changeable)."""

    def __init__(self, reasons: dict):
        self.reasons = reasons
        self.readiness = self

    def remote(self):
        reasons = dict(self.reasons)

        class Response:
            def __await__(self):
                return asyncio.sleep(0, reasons).__await__()

            def cancel(self):
                pass

        return Response()


class HealthRoutes:
    """The Ingress's health methods over a stand-in router (the Ingress class itself needs Serve)."""

    _not_ready, _router_readiness = Ingress._not_ready, Ingress._router_readiness
    health, livez, Check, Watch = Ingress.health, Ingress.livez, Ingress.Check, Ingress.Watch

    def __init__(self, reasons: dict):
        self.router, self.model_name = RouterStandIn(reasons), "via-sd-tiny"


class Context:
    def __init__(self):
        self.code = self.details = None

    def set_code(self, code):
        self.code = code

    def set_details(self, details):
        self.details = details


LOADING = {"drafter": None, "slim": None, "full": "no answer within 2 s (still starting)"}
READY = {"drafter": None, "slim": None, "full": None}


def test_health_is_503_with_an_openai_error_until_every_tier_is_ready():
    routes = HealthRoutes(LOADING)
    response = run(routes.health())
    body = json.loads(response.body)
    assert response.status_code == 503 and response.headers["retry-after"] == "1"
    assert body == oa.error_body("not ready: FullVerifier: no answer within 2 s (still starting)", 503)
    assert run(routes.livez()) == {"status": "ok"}  # alive all the same

    routes.router.reasons = READY
    assert run(routes.health()) == {"status": "ok", "model": "via-sd-tiny"}


def test_grpc_check_serving_not_serving_and_unknown_services():
    import grpc

    routes = HealthRoutes(LOADING)
    for service in ("", "via_sd.v1.ViaSD"):
        assert run(routes.Check(health_pb2.HealthCheckRequest(service=service))).status == NOT_SERVING
    routes.router.reasons = READY
    routes._readiness = None  # forget the last answer (kept a few seconds)
    assert run(routes.Check(health_pb2.HealthCheckRequest())).status == SERVING
    context = Context()
    run(routes.Check(health_pb2.HealthCheckRequest(service="nope.Service"), context))
    assert context.code == grpc.StatusCode.NOT_FOUND and "'nope.Service'" in context.details


def test_grpc_watch_sends_the_status_then_each_change(monkeypatch):
    monkeypatch.setattr(health, "WATCH_POLL_S", 0.01)
    routes = HealthRoutes(LOADING)
    routes._readiness = Readiness(routes._router_readiness, timeout_s=1, cache_s=0)  # every look asks

    async def scenario():
        stream = routes.Watch(health_pb2.HealthCheckRequest())
        statuses = [(await stream.__anext__()).status]
        routes.router.reasons = READY
        statuses.append((await stream.__anext__()).status)
        routes.router.reasons = {**READY, "slim": "its model runner is broken"}
        statuses.append((await stream.__anext__()).status)
        await stream.aclose()
        unknown = routes.Watch(health_pb2.HealthCheckRequest(service="nope.Service"))
        statuses.append((await unknown.__anext__()).status)
        await unknown.aclose()
        return statuses

    assert run(scenario()) == [NOT_SERVING, SERVING, NOT_SERVING, health_pb2.HealthCheckResponse.SERVICE_UNKNOWN]


def test_grpc_watch_ends_after_its_limit(monkeypatch):
    monkeypatch.setattr(health, "WATCH_POLL_S", 0.01)
    monkeypatch.setattr(health, "WATCH_LIMIT_S", 0.05)

    async def scenario():
        return [m.status async for m in HealthRoutes(READY).Watch(health_pb2.HealthCheckRequest())]

    assert run(scenario(), limit_s=5) == [SERVING]

"""The Router deployment's class without Ray: in-process tier clients (tests/serving/fakes.py) over
TierServers on the tiny float64 models. Streams equal the in-process engine, request errors name
their field, failed tier calls are retried (and only those), caches are released on every exit."""

from __future__ import annotations

import asyncio

import pytest

from tests.serving.conftest import SERVING_ARGS
from tests.serving.fakes import TIERS, local_tiers, shutdown
from via_sd_ray.config import parse_config
from via_sd_ray.core.sampling import SamplingParams
from via_sd_ray.errors import InvalidRequest, Overloaded, TierUnavailable
from via_sd_ray.serving.router import GenerateRequest, GenerationRouter

PROMPTS = ["def fibonacci(n):", "Write a haiku about caches.", "import numpy as np\n"]


def run(coro, limit_s: float = 60.0):
    """``asyncio.run`` with a bound: a lost wake-up fails the test instead of hanging it."""
    return asyncio.run(asyncio.wait_for(coro, limit_s))


@pytest.fixture(scope="module")
def text(local_engine):
    from via_sd_ray.models.tiers import text_info

    return text_info(local_engine.config)  # what the Router deployment builds for itself


@pytest.fixture
def make(local_engine, text):
    """``make(config=None) -> (router, clients)``; the clients' batcher threads stop after the test."""
    made = []

    def build(config=None):
        config = config or local_engine.config
        clients = local_tiers(local_engine, config)
        made.append(clients)
        router = GenerationRouter(config, clients["drafter"], clients["slim"], clients["full"], text=text)
        return router, clients

    yield build
    for clients in made:
        shutdown(clients)


def config_with(**serving):
    return parse_config({**SERVING_ARGS, "serving": {**SERVING_ARGS["serving"], **serving}})


def reference(engine, prompt_ids, max_tokens, mode, **sampling):
    params = SamplingParams(max_tokens=max_tokens, **sampling)
    return engine.generate(prompt_ids, params, engine.config.router.policy(mode=mode))


async def collect(router, request) -> list[dict]:
    return [event async for event in router.generate(request)]


def of_request(request_id: str, generation_ids) -> list[str]:
    """The generation ids the router made for ``request_id`` (it appends a unique suffix)."""
    return [g for g in generation_ids if g.startswith(f"{request_id}-")]


async def settle(clients, generation_id, rounds=100):
    """Let the router's fire-and-forget release tasks run (bounded)."""
    for _ in range(rounds):
        if all(of_request(generation_id, c.released) for c in clients.values()):
            return
        await asyncio.sleep(0)
    raise AssertionError(f"release({generation_id!r}) did not reach every tier: "
                         f"{ {t: c.released for t, c in clients.items()} }")


def assert_released(clients, generation_id):
    for tier, client in clients.items():
        assert len(of_request(generation_id, client.released)) == 1, tier
        assert generation_id not in client.server.runner.caches, tier
        assert generation_id not in client.server.runner.last_used, tier


# -- streams equal the in-process engine -------------------------------------------------------------

@pytest.mark.parametrize("mode", ["ar", "sd", "via-sd"])
def test_stream_equals_local_engine(local_engine, make, mode):
    router, clients = make()
    prompt_ids = local_engine.encode(PROMPTS[0])
    want = reference(local_engine, prompt_ids, 24, mode)
    request = GenerateRequest(prompt=PROMPTS[0], max_tokens=24, mode=mode)
    events = run(collect(router, request))
    assert [t for e in events for t in e["token_ids"]] == want.token_ids
    assert "".join(e["text"] for e in events) == want.text
    assert [e["tier"] for e in events] == [r.tier.value for r in want.stats.records]
    assert all(e["finish_reason"] is None and "usage" not in e and "stats" not in e for e in events[:-1])
    last = events[-1]
    assert last["finish_reason"] == want.finish_reason
    assert last["usage"] == {"prompt_tokens": len(prompt_ids), "completion_tokens": len(want.token_ids),
                             "total_tokens": len(prompt_ids) + len(want.token_ids)}
    stats = last["stats"]
    assert stats["mode"] == mode and stats["lossless"] is False
    assert stats["blocks"] == len(events) == want.stats.blocks
    assert stats["tier_blocks"] == want.stats.tier_blocks and stats["accepted"] == want.stats.accepted
    assert stats["elapsed_s"] > 0 and stats["tokens_per_s"] > 0
    if mode == "ar":
        assert clients["drafter"].calls == clients["slim"].calls == 0
    if mode == "via-sd":
        assert stats["tier_blocks"]["slim"] > 0  # the test exercises the slim tier
    assert router.active == set()


def test_chat_token_ids_and_sampled_generations_equal_local_engine(local_engine, make):
    router, _ = make()
    messages = [{"role": "user", "content": PROMPTS[1]}]
    chat_ids = local_engine.encode(messages, chat=True)
    cases = [
        (GenerateRequest(messages=messages, max_tokens=20), chat_ids, "via-sd", {}),
        (GenerateRequest(prompt_token_ids=chat_ids, max_tokens=20, mode="sd"), chat_ids, "sd", {}),
        (GenerateRequest(prompt=PROMPTS[2], max_tokens=20, temperature=0.8, top_p=0.9, top_k=50, seed=11),
         local_engine.encode(PROMPTS[2]), "via-sd", {"temperature": 0.8, "top_p": 0.9, "top_k": 50, "seed": 11}),
    ]
    for request, prompt_ids, mode, sampling in cases:
        events = run(collect(router, request))
        want = reference(local_engine, prompt_ids, 20, mode, **sampling)
        assert [t for e in events for t in e["token_ids"]] == want.token_ids, request
        assert events[-1]["usage"]["prompt_tokens"] == len(prompt_ids)


def test_default_max_tokens_and_stop_strings(local_engine, make):
    router, _ = make()
    events = run(collect(router, GenerateRequest(prompt=PROMPTS[0], ignore_eos=True)))
    assert events[-1]["usage"]["completion_tokens"] == local_engine.config.limits.default_max_tokens
    full = reference(local_engine, local_engine.encode(PROMPTS[0]), 32, "via-sd")
    # the first two-letter ASCII string that starts past the first block
    text = full.text
    at = next(i for i in range(6, len(text) - 1)
              if text[i:i + 2].isascii() and text[i:i + 2].isalpha() and text.find(text[i:i + 2]) == i)
    stop = text[at:at + 2]
    events = run(collect(router, GenerateRequest(prompt=PROMPTS[0], max_tokens=32, stop=[stop])))
    assert events[-1]["finish_reason"] == "stop"
    assert "".join(e["text"] for e in events) == text[:at]
    assert sum(len(e["token_ids"]) for e in events) < len(full.token_ids)


def test_concurrent_generations_equal_one_by_one(local_engine, make):
    router, clients = make()
    requests = [GenerateRequest(prompt=p, max_tokens=24) for p in PROMPTS]
    # the same request id twice (a gRPC client may set it): the tiers key caches by it
    requests.append(GenerateRequest(prompt=PROMPTS[1], max_tokens=24, request_id=requests[0].request_id))

    async def run_all():
        return await asyncio.gather(*(collect(router, r) for r in requests))

    outputs = run(run_all())
    for request, events in zip(requests, outputs):
        want = reference(local_engine, local_engine.encode(request.prompt), 24, "via-sd")
        assert [t for e in events for t in e["token_ids"]] == want.token_ids, request.prompt
    drafter = clients["drafter"].server.batcher
    assert drafter.batches < drafter.items  # calls of different generations ran in one batch



def test_blocks_shrink_with_load_and_outputs_stay_equal(local_engine, make):
    # a budget of 6 verify tokens: one generation drafts blocks of up to 5, three decode without drafts
    router, clients = make(config_with(verify_token_budget=6, min_block=2))
    drafter = clients["drafter"].server.batcher
    alone = run(collect(router, GenerateRequest(prompt=PROMPTS[0], max_tokens=24, mode="sd")))
    assert drafter.items >= len(alone) - 1  # alone, every block but maybe the last one is drafted
    requests = [GenerateRequest(prompt=p, max_tokens=24, mode="sd") for p in PROMPTS]

    async def run_all():
        return await asyncio.gather(*(collect(router, r) for r in requests))

    drafts_before = drafter.items
    outputs = run(run_all())
    for request, events in zip(requests, outputs):
        want = reference(local_engine, local_engine.encode(request.prompt), 24, "sd")
        assert [t for e in events for t in e["token_ids"]] == want.token_ids, request.prompt
    # together, most blocks carried no draft (the last generations alone draft again)
    assert drafter.items - drafts_before < sum(len(e) for e in outputs) / 2


# -- request errors -----------------------------------------------------------------------------------

BAD = [
    ("empty prompt", dict(prompt=""), "prompt"),
    ("prompt and messages", dict(prompt="x", messages=[{"role": "user", "content": "x"}]), "prompt"),
    ("no prompt", dict(), "prompt"),
    ("empty messages", dict(messages=[]), "messages"),
    ("empty token ids", dict(prompt_token_ids=[]), "prompt_token_ids"),
    ("token id too large", dict(prompt_token_ids=[10, 259]), "prompt_token_ids"),
    ("negative token id", dict(prompt_token_ids=[10, -1]), "prompt_token_ids"),
    ("prompt fills the context", dict(prompt_token_ids=[65] * 1024), "prompt"),
    ("prompt + max_tokens over the context", dict(prompt_token_ids=[65] * 1000, max_tokens=30), "prompt"),
    ("max_tokens above limit", dict(prompt="x", max_tokens=257), "max_tokens"),
    ("max_tokens 0", dict(prompt="x", max_tokens=0), "max_tokens"),
    ("temperature < 0", dict(prompt="x", temperature=-1.0), "temperature"),
    ("unknown mode", dict(prompt="x", mode="turbo"), "mode"),
    ("block_size 0", dict(prompt="x", block_size=0), "block_size"),
    ("threshold > 1", dict(prompt="x", escalate_threshold=1.5), "escalate_threshold"),
    ("unknown profile", dict(prompt="x", profile="warp"), "profile"),
]


@pytest.mark.parametrize(("fields", "field"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_request_raises_before_any_tier_call(make, fields, field):
    router, clients = make()

    async def first():
        return await anext(router.generate(GenerateRequest(**fields)))

    with pytest.raises(InvalidRequest) as err:
        run(first())
    assert err.value.message.startswith(f"{field}"), err.value.message
    assert "expected" in err.value.message
    assert all(c.calls == 0 for c in clients.values()) and router.active == set()


def test_thresholds_out_of_order_is_invalid_request(make):
    router, _ = make()
    request = GenerateRequest(prompt="x", slim_threshold=0.95)  # the config's direct_threshold is 0.9

    async def first():
        return await anext(router.generate(request))

    with pytest.raises(InvalidRequest) as err:
        run(first())
    assert err.value.message.startswith("slim_threshold: expected")
    assert "slim_threshold=0.95" in err.value.message and "direct_threshold=0.9" in err.value.message


def test_without_a_slim_tier_its_blocks_go_to_the_full_verifier(local_engine, make):
    """serving.slim_tier off: no SlimVerifier; a request's slim band is folded into the full verifier's,
    and the output is what the engine gives for the policy without that band."""
    router, clients = make()
    del clients["slim"]
    router = GenerationRouter(local_engine.config, clients["drafter"], None, clients["full"], text=router.text)
    assert set(router.tiers) == {"drafter", "full"}
    request = GenerateRequest(prompt=PROMPTS[0], max_tokens=24, mode="via-sd", slim_threshold=0.1)
    policy = router.policy(request)
    assert policy.slim_threshold == policy.direct_threshold
    prompt_ids = local_engine.encode(PROMPTS[0])
    want = local_engine.generate(prompt_ids, SamplingParams(max_tokens=24), policy)
    events = run(collect(router, request))
    assert [t for e in events for t in e["token_ids"]] == want.token_ids
    stats = events[-1]["stats"]
    assert stats["tier_blocks"]["slim"] == 0 and stats["tier_blocks"]["full"] > 0
    assert set(run(router.readiness())) == {"drafter", "full"}  # readiness asks only the deployed tiers
    generation_id = request.request_id
    run(settle(clients, generation_id))
    assert_released(clients, generation_id)


@pytest.mark.parametrize("slim_tier, deployed", [("auto", True), ("off", False), ("on", True)])
def test_the_app_deploys_the_slim_tier_only_where_it_is_routed(slim_tier, deployed):
    """build_app's graph: Ingress -> Router(args, Drafter, SlimVerifier or None, FullVerifier)."""
    from via_sd_ray.serving.app import build_app

    args = {**SERVING_ARGS, "serving": {**SERVING_ARGS["serving"], "slim_tier": slim_tier}}
    assert parse_config(args).router.routes_to_slim()  # the test config has a slim band
    ingress = build_app(args)._bound_deployment
    router = ingress.init_args[1]._bound_deployment
    _, *tiers = router.init_args
    names = [t and t._bound_deployment.name for t in tiers]
    assert names == ["Drafter", "SlimVerifier" if deployed else None, "FullVerifier"]


def test_a_request_selects_a_router_preset(local_engine, make):
    args = {**SERVING_ARGS, "router": {**SERVING_ARGS.get("router", {}), "direct_threshold": 0.0,
                                       "slim_threshold": 0.0, "deferred_check": True,
                                       "presets": {"fast": {"deferred_check": False, "block_size": 3}}}}
    router, _ = make(parse_config(args))
    checked = router.policy(GenerateRequest(prompt="x"))
    fast = router.policy(GenerateRequest(prompt="x", profile="fast"))
    assert checked.deferred_check and not fast.deferred_check and fast.block_size == 3
    assert router.policy(GenerateRequest(prompt="x", profile="default")) == checked
    assert not router.policy(GenerateRequest(prompt="x", deferred_check=False)).deferred_check
    ids = local_engine.encode("def f(x):")
    want = reference(local_engine, ids, 16, "ar")
    events = run(collect(router, GenerateRequest(prompt_token_ids=ids, max_tokens=16)))
    assert [t for e in events for t in e.get("token_ids", [])] == want.token_ids  # every block direct, checked
    assert events[-1]["stats"]["tier_blocks"]["direct"] > 0


def test_limits_come_from_config(make, local_engine):
    router, _ = make()
    assert router.sampling(GenerateRequest(prompt="x", max_tokens=256), 5).max_tokens == 256
    # no max_tokens: the configured default, cut to what the context window leaves
    assert router.sampling(GenerateRequest(prompt="x"), 5).max_tokens == 32
    assert router.sampling(GenerateRequest(prompt="x"), 1010).max_tokens == 1024 - 1010


# -- tier failures --------------------------------------------------------------------------------

def test_failed_tier_call_is_retried_and_output_unchanged(local_engine, make):
    router, clients = make()
    want = reference(local_engine, local_engine.encode(PROMPTS[0]), 24, "via-sd").token_ids
    clients["drafter"].failures.append(RuntimeError("replica died"))
    clients["full"].failures.append(ConnectionError("unreachable"))
    clients["slim"].failures.append(RuntimeError("replica died"))
    events = run(collect(router, GenerateRequest(prompt=PROMPTS[0], max_tokens=24)))
    assert [t for e in events for t in e["token_ids"]] == want
    for tier in TIERS:
        assert not clients[tier].failures, tier  # each failure was met, and retried past


def test_tier_call_past_the_timeout_is_retried(local_engine, make):
    router, clients = make(config_with(tier_timeout_s=0.1))
    want = reference(local_engine, local_engine.encode(PROMPTS[0]), 12, "sd").token_ids
    clients["full"].hang_first_s = 30.0
    events = run(collect(router, GenerateRequest(prompt=PROMPTS[0], max_tokens=12, mode="sd")))
    assert [t for e in events for t in e["token_ids"]] == want


@pytest.mark.parametrize("retries", [0, 2])
def test_tier_that_always_fails_ends_with_tier_unavailable(make, retries):
    router, clients = make(config_with(tier_retries=retries))
    clients["drafter"].always = RuntimeError("replica died")
    request = GenerateRequest(prompt=PROMPTS[0], max_tokens=24)

    async def scenario():
        with pytest.raises(TierUnavailable) as err:
            await collect(router, request)
        await settle(clients, request.request_id)
        return err.value

    err = run(scenario())
    assert clients["drafter"].calls == retries + 1
    assert err.message.startswith(f"drafter tier failed {retries + 1} times") and "replica died" in err.message
    assert err.http_status == 503
    assert_released(clients, request.request_id)


@pytest.mark.parametrize("mode, temperature", [("sd", 0.0), ("via-sd", 0.0), ("sd", 1.0)])
def test_a_full_drafter_or_slim_tier_leaves_the_generation_to_the_verifier(local_engine, make, mode, temperature):
    """The drafter refusing a KV slot (all held by running generations) never fails a generation, before or
    after its first token: it goes on without drafts, which is the full model's own decoding (greedy: ar's
    tokens; sampled: its distribution, here the same seeded draws as ar's). Nor does the slim tier's refusal:
    its blocks go to the full verifier."""
    router, clients = make()
    prompt_ids = local_engine.encode(PROMPTS[1])
    want = reference(local_engine, prompt_ids, 16, "ar", temperature=temperature, seed=7).token_ids
    for refused_at in (0, 2):  # the generation's first draft call, or a later one
        clients["drafter"].calls = 0
        clients["drafter"].failures[:] = [None] * refused_at + [Overloaded("drafter tier: all 8 KV slots are held")]
        request = GenerateRequest(prompt=PROMPTS[1], max_tokens=16, mode=mode, temperature=temperature, seed=7)
        events = run(collect(router, request))
        tokens = [t for e in events for t in e["token_ids"]]
        assert events[-1]["finish_reason"] is not None and len(tokens) == len(want)
        if refused_at == 0:
            assert tokens == want and clients["drafter"].calls == 1  # never asked again
        elif (mode, temperature) == ("sd", 0.0):
            assert tokens == want  # lossless greedy: the drafted blocks before the refusal kept ar's tokens too
    assert router.stats()["generations_without_drafts"] == 2 and router.undrafted == set()
    if mode == "via-sd":  # the slim tier refusing: its blocks go to the full verifier
        want = reference(local_engine, prompt_ids, 16, "via-sd", temperature=temperature, seed=7).token_ids
        clients["slim"].failures[:] = [Overloaded("slim tier: all 8 KV slots are held")]
        slim_calls, full_calls = clients["slim"].calls, clients["full"].calls
        request = GenerateRequest(prompt=PROMPTS[1], max_tokens=16, mode=mode, temperature=temperature, seed=7)
        tokens = [t for e in run(collect(router, request)) for t in e["token_ids"]]
        assert len(tokens) == len(want) and clients["slim"].calls == slim_calls + 1  # never asked again
        assert clients["full"].calls > full_calls and router.stats()["generations_without_slim"] == 1
        assert router.unslimmed == set()
    with pytest.raises(Overloaded):  # a verifier's refusal is still the request's 429
        clients["full"].failures[:] = [Overloaded("full tier: all 8 KV slots are held")]
        run(collect(router, GenerateRequest(prompt=PROMPTS[1], max_tokens=4, mode="ar")))


@pytest.mark.parametrize("error", [ValueError("block: bad"), InvalidRequest("block: expected ..., received ...")])
def test_request_errors_from_a_tier_are_not_retried(make, error):
    router, clients = make()
    clients["drafter"].failures.append(error)
    request = GenerateRequest(prompt=PROMPTS[0], max_tokens=24)

    async def scenario():
        with pytest.raises(type(error)) as err:
            await collect(router, request)
        await settle(clients, request.request_id)
        return err.value

    assert run(scenario()) is error
    assert clients["drafter"].calls == 1
    assert_released(clients, request.request_id)


# -- release ------------------------------------------------------------------------------------

def test_every_tier_releases_after_completion(make):
    router, clients = make()
    request = GenerateRequest(prompt=PROMPTS[0], max_tokens=24)

    async def scenario():
        events = await collect(router, request)
        await settle(clients, request.request_id)
        return events

    events = run(scenario())
    assert events[-1]["finish_reason"] is not None
    assert all(c.calls > 0 for c in clients.values())  # every tier held a cache
    assert_released(clients, request.request_id)
    assert router.active == set()


def test_every_tier_releases_when_the_consumer_stops_early(make):
    router, clients = make()
    request = GenerateRequest(prompt=PROMPTS[0], max_tokens=64, mode="sd", ignore_eos=True)
    gid = request.request_id

    async def scenario():
        stream = router.generate(request)
        first = await anext(stream)
        assert of_request(gid, router.active)
        assert of_request(gid, clients["drafter"].server.runner.caches)
        assert of_request(gid, clients["full"].server.runner.caches)
        calls = sum(c.calls for c in clients.values())
        await stream.aclose()
        await settle(clients, gid)
        await asyncio.sleep(0.01)
        assert sum(c.calls for c in clients.values()) == calls  # no tier call after the consumer left
        return first

    first = run(scenario())
    assert first["finish_reason"] is None
    assert_released(clients, gid)
    assert router.active == set()


def test_every_tier_releases_when_the_generation_is_cancelled(make):
    router, clients = make()
    request = GenerateRequest(prompt=PROMPTS[0], max_tokens=64, mode="sd", ignore_eos=True)
    gid = request.request_id

    async def scenario():
        events = []

        async def consume():
            async for event in router.generate(request):
                events.append(event)
                if len(events) == 2:
                    clients["full"].gate = asyncio.Event()  # the next verify hangs in the tier

        task = asyncio.create_task(consume())
        for _ in range(1000):
            if clients["full"].gate is not None and clients["full"].calls > len(events):
                break
            await asyncio.sleep(0.001)
        assert not task.done()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await settle(clients, gid)
        return events

    events = run(scenario())
    assert len(events) == 2
    assert_released(clients, gid)
    assert router.active == set()

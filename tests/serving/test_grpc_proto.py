"""The gRPC surface without a server: the committed stubs are exactly what protogen makes of
proto/via_sd.proto, their messages pickle (Ray ships them between processes), and the ingress maps
requests and router events onto them with proto3 ``optional`` semantics."""

from __future__ import annotations

import asyncio
import pickle

import grpc
import pytest

from tests.serving.fakes import local_tiers, shutdown
from via_sd_ray.errors import InvalidRequest, ModelNotFound, TierUnavailable
from via_sd_ray.serving import ingress, protogen
from via_sd_ray.serving.grpc_gen import via_sd_pb2 as pb
from via_sd_ray.serving.router import GenerateRequest, GenerationRouter

STUBS = ("__init__.py", "via_sd_pb2.py", "via_sd_pb2_grpc.py")


def run(coro, limit_s: float = 60.0):
    """``asyncio.run`` with a bound: a lost wake-up fails the test instead of hanging it."""
    return asyncio.run(asyncio.wait_for(coro, limit_s))


# -- the stubs -----------------------------------------------------------------------------------

def test_committed_stubs_equal_freshly_generated(tmp_path):
    written = protogen.generate(tmp_path)
    assert sorted(p.name for p in written) == ["via_sd_pb2.py", "via_sd_pb2_grpc.py"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(STUBS)
    for name in STUBS:
        assert (protogen.OUT / name).read_bytes() == (tmp_path / name).read_bytes(), (
            f"via_sd_ray/serving/grpc_gen/{name} differs from what proto/via_sd.proto generates: run "
            "`python -m via_sd_ray.serving.protogen` (a grpcio-tools upgrade changes the version lines too)")


def test_stubs_live_in_the_package():
    assert protogen.PROTO.is_file() and protogen.OUT.name == "grpc_gen"
    for message in (pb.GenerateRequest, pb.GenerateChunk, pb.GenerateResponse, pb.Stats, pb.Usage, pb.ChatMessage):
        assert message.__module__ == "via_sd_ray.serving.grpc_gen.via_sd_pb2"
    from via_sd_ray.serving import grpc_service
    from via_sd_ray.serving.app import GRPC_SERVICER
    from via_sd_ray.serving.grpc_gen import via_sd_pb2_grpc

    module, _, function = GRPC_SERVICER.rpartition(".")
    assert module == grpc_service.__name__ and callable(getattr(grpc_service, function))
    assert via_sd_pb2_grpc.via__sd__pb2 is pb  # the package-relative import protogen rewrites


class Recorder:
    """A grpc server stand-in that keeps what a servicer function registers."""

    def __init__(self):
        self.generic, self.registered = [], {}

    def add_generic_rpc_handlers(self, handlers):
        self.generic.extend(handlers)

    def add_registered_method_handlers(self, service, handlers):
        self.registered[service] = handlers


def test_servicer_registers_the_generated_service_with_the_lenient_decoder():
    from via_sd_ray.serving import grpc_service
    from via_sd_ray.serving.grpc_gen import via_sd_pb2_grpc

    ours, generated = Recorder(), Recorder()
    servicer = via_sd_pb2_grpc.ViaSDServicer()
    grpc_service.add_ViaSDServicer_to_server(servicer, ours)
    via_sd_pb2_grpc.add_ViaSDServicer_to_server(servicer, generated)
    assert ours.registered.keys() == generated.registered.keys() == {"via_sd.v1.ViaSD"}
    mine, theirs = ours.registered["via_sd.v1.ViaSD"], generated.registered["via_sd.v1.ViaSD"]
    assert mine.keys() == theirs.keys() == {"Generate", "GenerateStream"}
    for name in mine:
        assert (mine[name].request_streaming, mine[name].response_streaming) == \
            (theirs[name].request_streaming, theirs[name].response_streaming)
        assert mine[name].response_serializer is theirs[name].response_serializer
        assert mine[name].request_deserializer is grpc_service.decode_request
    good = pb.GenerateRequest(prompt="hi", max_tokens=3)
    assert grpc_service.decode_request(good.SerializeToString()) == good


@pytest.mark.parametrize(("raw", "starts"), [
    (b"\x0a\x02\xff\xfe\x28\x04", "prompt: expected UTF-8 text"),  # prompt = b"\xff\xfe", max_tokens = 4
    # messages[1].content is not UTF-8 (messages[0] is fine)
    (pb.GenerateRequest(messages=[pb.ChatMessage(role="user", content="ok")]).SerializeToString()
     + b"\x12\x06\x0a\x01u\x12\x01\xff", "messages.1.content: expected UTF-8 text"),
    (b"\x0a\x10abc", "request: expected a serialized via_sd.v1.GenerateRequest"),  # length past the end
    (b"\x0b", "request: expected a serialized via_sd.v1.GenerateRequest"),  # wire type 3 (a group)
])
def test_undecodable_requests_name_the_field(raw, starts):
    from via_sd_ray.serving.grpc_service import WireError, decode_request

    with pytest.raises(Exception):  # what Serve's proxy would have done with the generated decoder
        pb.GenerateRequest.FromString(raw)
    error = decode_request(raw)
    assert isinstance(error, WireError) and error.message.startswith(starts), error
    assert pickle.loads(pickle.dumps(error)) == error  # it travels to the Ingress replica


def test_messages_pickle():
    request = pb.GenerateRequest(prompt="hi", max_tokens=8, temperature=0.0, seed=3, stop=["\n"],
                                 messages=[], lossless=False, request_id="r1")
    chunk = pb.GenerateChunk(text="a", token_ids=[1, 2], tier="slim", usage=pb.Usage(prompt_tokens=1),
                             stats=pb.Stats(blocks=2, tier_blocks={"slim": 2}, acceptance_per_position=[0.5]))
    for message in (request, chunk):
        back = pickle.loads(pickle.dumps(message))
        assert type(back) is type(message) and back == message
    back = pickle.loads(pickle.dumps(request))
    assert back.HasField("temperature") and back.HasField("lossless") and not back.HasField("top_p")


# -- requests ------------------------------------------------------------------------------------

def plain(request: GenerateRequest, **changes) -> dict:
    fields = {k: getattr(request, k) for k in GenerateRequest.__dataclass_fields__ if k != "request_id"}
    return fields | changes


def test_from_proto_unset_optionals_keep_defaults():
    got = ingress.from_proto(pb.GenerateRequest(prompt="hi"))
    assert plain(got) == plain(GenerateRequest(prompt="hi"))
    assert len(got.request_id) == 32  # a fresh id when the client sends none
    assert ingress.from_proto(pb.GenerateRequest(prompt="hi")).request_id != got.request_id


def test_from_proto_explicit_zeros_and_falses_are_kept():
    request = pb.GenerateRequest(prompt="hi", max_tokens=0, temperature=0.0, top_p=0.0, top_k=0, seed=0,
                                 lossless=False, block_size=0, direct_threshold=0.0, slim_threshold=0.0,
                                 escalate_threshold=0.0)
    got = ingress.from_proto(request)
    assert plain(got) == plain(GenerateRequest(prompt="hi"), max_tokens=0, temperature=0.0, top_p=0.0, top_k=0,
                               seed=0, lossless=False, block_size=0, direct_threshold=0.0, slim_threshold=0.0,
                               escalate_threshold=0.0)
    assert got.seed == 0 and got.lossless is False and got.top_p == 0.0  # not None / 1.0: they were set


def test_from_proto_values():
    request = pb.GenerateRequest(prompt="hi", max_tokens=40, temperature=0.7, top_p=0.9, top_k=20, seed=2**40,
                                 stop=["\n\n", "END"], ignore_eos=True, mode="sd", lossless=True, block_size=6,
                                 direct_threshold=0.97, slim_threshold=0.4, escalate_threshold=0.75,
                                 request_id="req-1", model="via-sd-tiny")
    got = ingress.from_proto(request)
    assert (got.prompt, got.messages, got.prompt_token_ids) == ("hi", None, None)
    assert (got.max_tokens, got.top_k, got.seed, got.stop, got.ignore_eos) == (40, 20, 2**40, ["\n\n", "END"], True)
    assert (got.mode, got.lossless, got.block_size, got.request_id) == ("sd", True, 6, "req-1")
    floats = (got.temperature, got.top_p, got.direct_threshold, got.slim_threshold, got.escalate_threshold)
    assert floats == pytest.approx((0.7, 0.9, 0.97, 0.4, 0.75), abs=1e-6)  # proto floats are 32-bit


def test_from_proto_messages_and_token_ids():
    chat = ingress.from_proto(pb.GenerateRequest(messages=[pb.ChatMessage(role="system", content="Be brief."),
                                                           pb.ChatMessage(role="user", content="hi")]))
    assert chat.messages == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    assert chat.prompt is None and chat.prompt_token_ids is None
    ids = ingress.from_proto(pb.GenerateRequest(prompt_token_ids=[5, 0, 258]))
    assert ids.prompt_token_ids == [5, 0, 258] and ids.prompt is None and ids.messages is None


@pytest.mark.parametrize("fields", [
    {},
    {"prompt": "hi", "messages": [pb.ChatMessage(role="user", content="hi")]},
    {"prompt": "hi", "prompt_token_ids": [1]},
    {"messages": [pb.ChatMessage(role="user", content="hi")], "prompt_token_ids": [1]},
], ids=["none", "prompt+messages", "prompt+ids", "messages+ids"])
def test_from_proto_needs_exactly_one_prompt(fields):
    with pytest.raises(InvalidRequest) as err:
        ingress.from_proto(pb.GenerateRequest(**fields))
    assert err.value.message.startswith("prompt: expected exactly one of prompt, messages or prompt_token_ids")
    assert err.value.grpc_code == "INVALID_ARGUMENT"


# -- responses from router events ----------------------------------------------------------------

@pytest.fixture(scope="module")
def events(local_engine):
    """The events of one via-sd generation through the Router class and in-process tiers."""
    clients = local_tiers(local_engine)
    router = GenerationRouter(local_engine.config, clients["drafter"], clients["slim"], clients["full"])

    async def scenario():
        return [e async for e in router.generate(GenerateRequest(prompt="def fibonacci(n):", max_tokens=24))]

    try:
        out = run(scenario())
    finally:
        shutdown(clients)
    assert len(out) > 2 and out[-1]["finish_reason"] is not None
    return out


def test_chunk_proto_of_a_middle_event(events):
    event = events[0]
    chunk = ingress.chunk_proto(event)
    assert (chunk.text, list(chunk.token_ids), chunk.tier) == (event["text"], event["token_ids"], event["tier"])
    assert chunk.finish_reason == "" and not chunk.HasField("usage") and not chunk.HasField("stats")


def test_chunk_proto_of_the_last_event_carries_usage_and_stats(events):
    last = events[-1]
    chunk = pb.GenerateChunk.FromString(ingress.chunk_proto(last).SerializeToString())  # over the wire
    assert chunk.finish_reason == last["finish_reason"] and list(chunk.token_ids) == last["token_ids"]
    usage = last["usage"]
    assert (chunk.usage.prompt_tokens, chunk.usage.completion_tokens, chunk.usage.total_tokens) == (
        usage["prompt_tokens"], usage["completion_tokens"], usage["total_tokens"])
    assert usage["completion_tokens"] == sum(len(e["token_ids"]) for e in events)
    assert_stats(chunk.stats, last["stats"])


def test_stats_proto(events):
    stats = events[-1]["stats"]
    assert stats["blocks"] == len(events) and stats["proposed"] > 0
    assert_stats(ingress.stats_proto(stats), stats)


def assert_stats(message, stats):
    assert (message.blocks, message.proposed, message.accepted, message.escalations) == (
        stats["blocks"], stats["proposed"], stats["accepted"], stats["escalations"])
    assert message.acceptance_rate == pytest.approx(stats["acceptance_rate"])
    assert message.tokens_per_second == pytest.approx(stats["tokens_per_s"]) and message.tokens_per_second > 0
    assert message.elapsed_s == pytest.approx(stats["elapsed_s"])
    assert dict(message.tier_blocks) == stats["tier_blocks"] and dict(message.tier_tokens) == stats["tier_tokens"]
    assert list(message.acceptance_per_position) == pytest.approx(stats["acceptance_per_position"])
    assert (message.mode, message.lossless) == ("via-sd", False) == (stats["mode"], stats["lossless"])


def test_unary_response_is_built_from_the_events(events):
    last = events[-1]
    response = pb.GenerateResponse(text="".join(e["text"] for e in events),
                                   token_ids=[t for e in events for t in e["token_ids"]],
                                   finish_reason=last["finish_reason"], usage=pb.Usage(**last["usage"]),
                                   stats=ingress.stats_proto(last["stats"]), request_id="r")
    assert response.usage.completion_tokens == len(response.token_ids)


# -- errors --------------------------------------------------------------------------------------

class RayTaskErrorLike(Exception):
    """Ray wraps a replica's exception and keeps it as ``cause``."""

    def __init__(self, cause):
        super().__init__(f"wrapped: {cause}")
        self.cause = cause


class Context:
    def set_code(self, code):
        self.code = code

    def set_details(self, details):
        self.details = details


@pytest.mark.parametrize(("error", "http", "code"), [
    (InvalidRequest("max_tokens: expected a value in [1, 256], received 300"), 400, "INVALID_ARGUMENT"),
    (ModelNotFound("model: expected 'a', received 'b'"), 404, "NOT_FOUND"),
    (TierUnavailable("drafter tier failed 3 times"), 503, "UNAVAILABLE"),
])
def test_errors_keep_their_status_through_ray_wrappers(error, http, code):
    for raised in (error, RayTaskErrorLike(error), RayTaskErrorLike(RayTaskErrorLike(error))):
        assert ingress.status_of(raised) == (http, code, error.message)
    context = Context()
    empty = pb.GenerateResponse()
    assert ingress._grpc_error(context, RayTaskErrorLike(error), empty) is empty
    assert context.code == getattr(grpc.StatusCode, code) and context.details == error.message


def test_unexpected_errors_are_internal():
    assert ingress.status_of(RuntimeError("boom")) == (500, "INTERNAL", "internal error: RuntimeError: boom")
    assert ingress.status_of(RayTaskErrorLike(KeyError("k")))[:2] == (500, "INTERNAL")

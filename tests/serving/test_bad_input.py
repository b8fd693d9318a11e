"""Issue 5's bad inputs, end to end over HTTP and gRPC on the session's local Ray Serve (``conftest.py``).

Each one table row: the request, the status it must get (HTTP 4xx; gRPC INVALID_ARGUMENT or
NOT_FOUND), the field its message must start with, and the allowed range the message must state.
After every bad request the server must still answer a good one. The field-by-field checks of the
OpenAI shapes without a server are in ``test_openai_api.py``; this file is the end-to-end record.
"""

from __future__ import annotations

import json

import grpc
import httpx
import pytest

from tests.serving.conftest import SERVING_ARGS
from via_sd_ray.config import ServingConfig
from via_sd_ray.serving import openai_api as oa
from via_sd_ray.serving.grpc_gen import via_sd_pb2 as pb

MODEL = SERVING_ARGS["served_model_name"]
LIMIT = SERVING_ARGS["limits"]["max_tokens"]  # 256
CONTEXT = 1024  # the tiny models' context window; their tokenizer is one token per ASCII byte
MAX_BYTES = ServingConfig().max_request_bytes
APP = (("application", "via-sd"),)  # gRPC metadata: the session's app, whatever else is deployed

GOOD = {"model": MODEL, "prompt": "def f(x):", "max_tokens": 4, "temperature": 0}


def body(**changes) -> bytes:
    return json.dumps({**GOOD, **changes}).encode()


class Chunked(bytes):
    """A body sent with Transfer-Encoding: chunked, so the server learns its size only by reading it."""


def rows(table):
    return [pytest.param(*row[1:], id=row[0]) for row in table]


HTTP = [
    # (id, body, status, the field the message starts with, the allowed range it states)
    ("empty prompt", body(prompt=""), 400, "prompt", "non-empty"),
    ("prompt over the context", body(prompt="x" * CONTEXT), 400, "prompt", f"fewer than {CONTEXT} tokens"),
    ("prompt + max_tokens over the context", body(prompt="x" * 1000, max_tokens=100), 400, "prompt + max_tokens",
     f"at most {CONTEXT} tokens"),
    # the same ranges and messages as gRPC (GenerateRequest.check)
    ("max_tokens 0", body(max_tokens=0), 400, "max_tokens", f"[1, {LIMIT}]"),
    ("max_tokens negative", body(max_tokens=-5), 400, "max_tokens", f"[1, {LIMIT}]"),
    ("max_tokens over the limit", body(max_tokens=LIMIT + 1), 400, "max_tokens", f"[1, {LIMIT}]"),
    ("temperature < 0", body(temperature=-0.5), 400, "temperature", "[0.0, 2.0]"),
    ("temperature > 2", body(temperature=5.0), 400, "temperature", "[0.0, 2.0]"),
    ("top_p 0", body(top_p=0), 400, "top_p", "(0.0, 1.0]"),
    ("top_p 1.5", body(top_p=1.5), 400, "top_p", "(0.0, 1.0]"),
    ("top_k < -1", body(top_k=-2), 400, "top_k", "[0, inf)"),  # -1 is vLLM's "no top-k cut"
    ("unknown model", body(model="gpt-4o"), 404, "model", repr(MODEL)),
    ("unknown mode", body(via_sd={"mode": "turbo"}), 400, "via_sd.mode", "'ar', 'sd' or 'via-sd'"),
    ("thresholds out of order", body(via_sd={"slim_threshold": 0.9, "direct_threshold": 0.5}), 400,
     "slim_threshold", "<= direct_threshold"),
    ("malformed JSON", b'{"model": "via-sd-tiny", "prompt": ', 400, "body", "valid JSON"),
    ("NaN", b'{"model": "via-sd-tiny", "prompt": "x", "temperature": NaN}', 400, "body", "finite numbers"),
    ("wrong type", body(max_tokens="ten"), 400, "max_tokens", "integer"),
    ("non-UTF-8 bytes", b'{"model": "via-sd-tiny", "prompt": "\xff\xfe"}', 400, "body", "UTF-8"),
    ("oversized body", body(prompt="x" * MAX_BYTES), 413, "body", f"at most {MAX_BYTES} bytes"),
    ("oversized body, chunked", Chunked(body(prompt="x" * MAX_BYTES)), 413, "body", f"at most {MAX_BYTES} bytes"),
]


@pytest.fixture(scope="module")
def http(cluster):
    with httpx.Client(base_url=cluster.http, timeout=60) as client:
        yield client


def good_http(http) -> None:
    ok = http.post("/v1/completions", content=body())
    assert ok.status_code == 200, ok.text
    assert ok.json()["usage"]["completion_tokens"] == 4


@pytest.mark.parametrize(("content", "status", "field", "allowed"), rows(HTTP))
def test_http_bad_input(http, content, status, field, allowed):
    if isinstance(content, Chunked):
        raw = bytes(content)
        content = (raw[i:i + 65536] for i in range(0, len(raw), 65536))
    response = http.post("/v1/completions", content=content, headers={"content-type": "application/json"})
    error = response.json()["error"]
    print(f"HTTP {response.status_code}: {error['message'][:200]}")
    assert response.status_code == status, error
    code = "model_not_found" if field == "model" else oa.ERROR_CODES.get(status)
    assert error["code"] == code and error["param"] == field.split(" ")[0]
    assert error["message"].startswith(f"{field}:"), error["message"]
    assert allowed in error["message"], error["message"]
    good_http(http)


# -- gRPC ------------------------------------------------------------------------------------------

def message(**fields) -> bytes:
    return pb.GenerateRequest(**{"prompt": "def f(x):", "max_tokens": 4, **fields}).SerializeToString()


PROMPT_ONLY = pb.GenerateRequest(prompt="def f(x):").SerializeToString()
GRPC = [
    # (id, serialized request, status code, field, allowed range); wire-level rows are built by hand
    ("empty prompt", message(prompt=""), "INVALID_ARGUMENT", "prompt", "non-empty"),
    ("prompt over the context", message(prompt="x" * CONTEXT), "INVALID_ARGUMENT", "prompt",
     f"fewer than {CONTEXT} tokens"),
    ("prompt + max_tokens over the context", message(prompt="x" * 1000, max_tokens=100), "INVALID_ARGUMENT",
     "prompt + max_tokens", f"at most {CONTEXT} tokens"),
    ("max_tokens 0", message(max_tokens=0), "INVALID_ARGUMENT", "max_tokens", f"[1, {LIMIT}]"),
    ("max_tokens negative", message(max_tokens=-5), "INVALID_ARGUMENT", "max_tokens", f"[1, {LIMIT}]"),
    ("max_tokens over the limit", message(max_tokens=LIMIT + 1), "INVALID_ARGUMENT", "max_tokens", f"[1, {LIMIT}]"),
    ("temperature < 0", message(temperature=-0.5), "INVALID_ARGUMENT", "temperature", "[0.0, 2.0]"),
    ("temperature > 2", message(temperature=5.0), "INVALID_ARGUMENT", "temperature", "[0.0, 2.0]"),
    ("temperature NaN", message(temperature=float("nan")), "INVALID_ARGUMENT", "temperature", "finite"),
    ("top_p 0", message(top_p=0.0), "INVALID_ARGUMENT", "top_p", "(0.0, 1.0]"),
    ("top_p 1.5", message(top_p=1.5), "INVALID_ARGUMENT", "top_p", "(0.0, 1.0]"),
    ("top_k < 0", message(top_k=-1), "INVALID_ARGUMENT", "top_k", "[0, inf)"),
    ("unknown model", message(model="gpt-4o"), "NOT_FOUND", "model", repr(MODEL)),
    ("unknown mode", message(mode="turbo"), "INVALID_ARGUMENT", "mode", "'via-sd'"),
    ("block_size 0", message(block_size=0), "INVALID_ARGUMENT", "block_size", "[1, 64]"),
    ("thresholds out of order", message(slim_threshold=0.9, direct_threshold=0.5), "INVALID_ARGUMENT",
     "slim_threshold", "<= direct_threshold"),
    # field 5 (max_tokens, an int32) sent length-delimited: protobuf keeps it as an unknown field
    ("wrong type", PROMPT_ONLY + b"\x2a\x03ten", "INVALID_ARGUMENT", "max_tokens", "int32"),
    ("unknown field", PROMPT_ONLY + b"\xf8\x06\x01", "INVALID_ARGUMENT", "111", "via_sd.v1.GenerateRequest"),
    ("oversized message", message(prompt="x" * MAX_BYTES), "INVALID_ARGUMENT", "request", f"at most {MAX_BYTES}"),
    # decoded by serving/grpc_service.py, which turns what protobuf cannot read into a named error
    ("malformed protobuf", b"\x0a\x10abc", "INVALID_ARGUMENT", "request", "via_sd.v1.GenerateRequest"),
    ("non-UTF-8 bytes", b"\x0a\x02\xff\xfe\x28\x04", "INVALID_ARGUMENT", "prompt", "UTF-8"),
]


@pytest.fixture(scope="module")
def channel(cluster):
    with grpc.insecure_channel(cluster.grpc) as channel:
        yield channel


def good_grpc(channel) -> None:
    generate = channel.unary_unary("/via_sd.v1.ViaSD/Generate", response_deserializer=pb.GenerateResponse.FromString)
    ok = generate(message(), metadata=APP, timeout=60)
    assert ok.usage.completion_tokens == 4 and len(ok.token_ids) == 4


@pytest.mark.parametrize(("raw", "code", "field", "allowed"), rows(GRPC))
def test_grpc_bad_input(channel, raw, code, field, allowed):
    unary = channel.unary_unary("/via_sd.v1.ViaSD/Generate", response_deserializer=pb.GenerateResponse.FromString)
    stream = channel.unary_stream("/via_sd.v1.ViaSD/GenerateStream",
                                  response_deserializer=pb.GenerateChunk.FromString)
    for name, call in (("Generate", lambda: unary(raw, metadata=APP, timeout=60)),
                       ("GenerateStream", lambda: list(stream(raw, metadata=APP, timeout=60)))):
        with pytest.raises(grpc.RpcError) as err:
            call()
        details = err.value.details() or ""
        print(f"gRPC {name} {err.value.code().name}: {details[:200]}")
        assert err.value.code() == getattr(grpc.StatusCode, code), details
        assert details.startswith(f"{field}:") and allowed in details, details
        good_grpc(channel)

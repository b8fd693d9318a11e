"""What third-party clients send and expect, against the served tiny app: OpenAI's optional and no-op
fields, null as the default, vLLM's extras, the exact error envelope on every route, logprobs, running
usage, no empty-text chunks, and the same validation over gRPC."""

from __future__ import annotations

import json
import math

import grpc
import httpx
import pytest
import torch
from openai import NotFoundError, OpenAI

from via_sd_ray.core.policy import RouterPolicy
from via_sd_ray.core.sampling import SamplingParams
from via_sd_ray.serving.grpc_gen import via_sd_pb2 as pb
from via_sd_ray.serving.grpc_gen import via_sd_pb2_grpc as pb_grpc

MODEL = "via-sd-tiny"
PROMPT = "def fibonacci(n):"
MESSAGES = [{"role": "user", "content": "Write a haiku about caches."}]


@pytest.fixture(scope="module")
def client(cluster):
    return OpenAI(base_url=f"{cluster.http}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def http(cluster):
    with httpx.Client(base_url=cluster.http, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def stub(cluster):
    channel = grpc.insecure_channel(cluster.grpc)
    yield pb_grpc.ViaSDStub(channel)
    channel.close()


def sse(response: httpx.Response) -> list[dict]:
    assert response.status_code == 200, response.text
    lines = [line.removeprefix("data: ") for line in response.text.split("\n\n") if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def assert_envelope(response: httpx.Response, status: int, code: str | None, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    error = body["error"]
    assert error["code"] == code and error["param"] == param, error
    assert isinstance(error["message"], str) and error["message"]
    return error


# -- accepted request shapes -----------------------------------------------------------------------

def test_openai_no_op_fields_through_the_openai_client(client):
    plain = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=8, temperature=0)
    noisy = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=8, temperature=0, store=True, metadata={"team": "x"},
        service_tier="auto", parallel_tool_calls=False, user="u-1", n=1, presence_penalty=0, frequency_penalty=0,
        logit_bias={}, top_p=None, seed=None)
    assert noisy.choices[0].message.content == plain.choices[0].message.content


def test_null_fields_unknown_stream_options_and_vllm_extras(http):
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 6, "temperature": None, "top_p": None, "n": None,
            "presence_penalty": None, "stop": None, "seed": None, "stream": True, "min_tokens": None,
            "stream_options": {"include_usage": True, "continuous_usage_stats": False, "include_obfuscation": True,
                               "a_key_from_the_future": 1},
            "ignore_eos": True}
    chunks = sse(http.post("/v1/completions", json=body))
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 6


def test_negative_seed_reproduces_its_sample(http):
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 10, "temperature": 1.0, "seed": -12345,
            "via_sd": {"return_token_ids": True}}
    first, second = (http.post("/v1/completions", json=body).json() for _ in range(2))
    assert first["choices"][0]["token_ids"] == second["choices"][0]["token_ids"]
    other = http.post("/v1/completions", json={**body, "seed": 12345}).json()
    assert other["choices"][0]["token_ids"] != first["choices"][0]["token_ids"]


def test_min_tokens_over_http_and_grpc(http, stub, local_engine):
    ids = local_engine.encode(PROMPT)
    free = local_engine.generate(ids, SamplingParams(max_tokens=12), RouterPolicy(mode="ar")).token_ids
    stop = free[1]
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 12, "temperature": 0, "stop_token_ids": [stop],
            "via_sd": {"mode": "sd", "return_token_ids": True}}
    early = http.post("/v1/completions", json=body).json()["choices"][0]
    assert early["token_ids"] == free[: free.index(stop) + 1] and early["finish_reason"] == "stop"
    held = http.post("/v1/completions", json={**body, "min_tokens": 6}).json()["choices"][0]
    assert len(held["token_ids"]) >= 6 and stop not in held["token_ids"][:5]
    unary = stub.Generate(pb.GenerateRequest(prompt=PROMPT, max_tokens=12, mode="sd", stop_token_ids=[stop],
                                             min_tokens=6), timeout=60)
    assert list(unary.token_ids) == held["token_ids"]


def test_running_usage_on_every_chunk(http):
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 12, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    chunks = sse(http.post("/v1/chat/completions", json=body))
    counts = [c["usage"]["completion_tokens"] for c in chunks]
    assert counts == sorted(counts) and counts[0] == 0 and counts[-1] == 12
    assert all(c["usage"]["prompt_tokens"] == chunks[-1]["usage"]["prompt_tokens"] > 0 for c in chunks)


def test_no_empty_text_chunks_in_50_streamed_generations(http):
    """The tiny models' byte-level tokens often end a block inside a multi-byte character."""
    empty, tokens, total = 0, 0, 0
    for seed in range(50):
        body = {"model": MODEL, "prompt": "héllo wörld ünïcode ☃ ", "max_tokens": 16, "temperature": 1.0,
                "seed": seed, "ignore_eos": True, "stream": True, "via_sd": {"return_token_ids": True}}
        chunks = sse(http.post("/v1/completions", json=body))
        empty += sum(1 for c in chunks if c["choices"] and not c["choices"][0]["text"]
                     and c["choices"][0]["finish_reason"] is None)
        tokens += sum(len(c["choices"][0].get("token_ids") or []) for c in chunks if c["choices"])
        total += 16
    assert empty == 0
    assert tokens == total  # tokens of folded chunks travel with the next one: none lost


# -- errors on every route ----------------------------------------------------------------------------

def test_error_envelope_on_unknown_routes_methods_and_models(http, client):
    assert_envelope(http.get("/v1/nope"), 404, "not_found")
    error = assert_envelope(http.get("/v1/chat/completions"), 405, "method_not_allowed")
    assert "POST" in error["message"]
    assert_envelope(http.post("/v1/completions", json={"model": "gpt-4", "prompt": "x"}), 404, "model_not_found",
                    "model")
    assert_envelope(http.post("/v1/completions", json={"model": MODEL, "prompt": "x", "n": 2}), 400, None, "n")
    assert_envelope(http.post("/v1/completions", json={"model": MODEL, "prompt": "x", "temperature": 5.0}), 400,
                    None, "temperature")
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(NotFoundError):
        client.models.retrieve("gpt-4")


# -- logprobs -----------------------------------------------------------------------------------------

def own_log_softmax(engine, ids: list[int], output: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        logits = engine.verifier_model(torch.tensor([ids + output])).logits[0].double()
    return torch.log_softmax(logits, dim=-1)[len(ids) - 1: len(ids) + len(output) - 1]


@pytest.mark.parametrize("mode", ["ar", "sd"])
def test_completion_logprobs_are_the_verifiers_own(http, local_engine, mode):
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 10, "temperature": 0, "logprobs": 3,
            "via_sd": {"mode": mode, "return_token_ids": True}}
    choice = http.post("/v1/completions", json=body).json()["choices"][0]
    lp, tokens = choice["logprobs"], choice["token_ids"]
    ref = own_log_softmax(local_engine, local_engine.encode(PROMPT), tokens)
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(tokens) == len(lp["text_offset"])
    for i, token in enumerate(tokens):
        assert lp["token_logprobs"][i] == pytest.approx(float(ref[i, token]), abs=1e-4)
        top = lp["top_logprobs"][i]
        assert len(top) <= 4 and lp["tokens"][i] in top
        assert sum(math.exp(v) for v in top.values()) <= 1 + 1e-6
        assert max(top.values()) == pytest.approx(float(ref[i].max()), abs=1e-4)
    assert set(lp["via_sd_tiers"]) <= {"full"}
    streamed = sse(http.post("/v1/completions", json={**body, "stream": True}))
    assert [v for c in streamed for v in c["choices"][0]["logprobs"]["token_logprobs"]] == \
        pytest.approx(lp["token_logprobs"])


def test_chat_logprobs_through_the_openai_client(client):
    out = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=8, temperature=0,
                                         logprobs=True, top_logprobs=2)
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 2 and entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)  # greedy: the most likely token
        assert entry.model_extra["via_sd_tier"] in ("direct", "slim", "full")
    stream = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=8, temperature=0,
                                            logprobs=True, stream=True)
    streamed = [e.logprob for c in stream if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert streamed == pytest.approx([e.logprob for e in content])


# -- gRPC: the same validation, request ids everywhere, logprobs ------------------------------------

def test_grpc_validates_as_http_does(stub):
    for fields, field in (({"temperature": 5.0}, "temperature"), ({"top_p": 0.0}, "top_p"),
                          ({"min_tokens": -1}, "min_tokens"), ({"logprobs": 30}, "logprobs"),
                          ({"block_size": 100}, "block_size"), ({"stop": ["a", "b", "c", "d", "e"]}, "stop")):
        with pytest.raises(grpc.RpcError) as err:
            stub.Generate(pb.GenerateRequest(prompt=PROMPT, max_tokens=4, **fields), timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.details().startswith(f"{field}:"), err.value.details()
    ok = stub.Generate(pb.GenerateRequest(prompt=PROMPT, max_tokens=4, seed=-3, temperature=0.7), timeout=30)
    assert ok.usage.completion_tokens == 4


def test_grpc_request_id_and_logprobs_on_every_chunk(stub):
    request = pb.GenerateRequest(prompt=PROMPT, max_tokens=10, mode="sd", logprobs=2, request_id="rid-42")
    chunks = list(stub.GenerateStream(request, timeout=60))
    assert all(c.request_id == "rid-42" for c in chunks)
    assert all(len(c.logprobs) == len(c.token_ids) == len(c.token_tiers) for c in chunks)
    assert all(len(lp.top) == 2 and lp.tier == "full" for c in chunks for lp in c.logprobs)
    unary = stub.Generate(pb.GenerateRequest(prompt=PROMPT, max_tokens=10, mode="sd", logprobs=2), timeout=60)
    assert len(unary.request_id) == 32  # the id the server gave it
    assert [lp.logprob for lp in unary.logprobs] == pytest.approx([lp.logprob for c in chunks for lp in c.logprobs])
    assert all(not c.text == "" or c.finish_reason for c in chunks)

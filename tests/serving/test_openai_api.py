"""The OpenAI request shapes and response builders, without a server: valid bodies map onto the
right ``GenerateRequest``, every bad body is refused with a message that names the field, what
was expected and what was received."""

from __future__ import annotations

from dataclasses import asdict

import pytest

from via_sd_ray.errors import InvalidRequest
from via_sd_ray.serving import openai_api as oa
from via_sd_ray.serving.router import GenerateRequest

TEXT = {"model": "via-sd-tiny", "prompt": "def f(x):"}
CHAT = {"model": "via-sd-tiny", "messages": [{"role": "user", "content": "hi"}]}


def generate(model, body) -> dict:
    """The GenerateRequest a body asks for, as a dict without the (random) request id."""
    request = oa.parse(model, body).to_generate()
    assert isinstance(request, GenerateRequest)
    fields = asdict(request)
    assert len(fields.pop("request_id")) == 32
    return fields


def defaults(**given) -> dict:
    fields = asdict(GenerateRequest(**given))
    fields.pop("request_id")
    return fields


# -- valid requests ------------------------------------------------------------------------------

def test_text_prompt_keeps_openai_defaults():
    # OpenAI's completion defaults: 16 tokens, temperature 1 (not the engine's greedy default)
    assert generate(oa.CompletionRequest, TEXT) == defaults(prompt="def f(x):", max_tokens=16, temperature=1.0)


def test_prompt_as_token_ids_and_as_one_string_list():
    assert generate(oa.CompletionRequest, {**TEXT, "prompt": [5, 17, 250]}) == defaults(
        prompt_token_ids=[5, 17, 250], max_tokens=16, temperature=1.0)
    assert generate(oa.CompletionRequest, {**TEXT, "prompt": ["only one"]}) == defaults(
        prompt="only one", max_tokens=16, temperature=1.0)


def test_sampling_fields_pass_through():
    body = {**TEXT, "max_tokens": 40, "temperature": 0, "top_p": 0.9, "top_k": 5, "seed": 7, "stop": "\n\n",
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}, "user": "u1"}
    req = oa.parse(oa.CompletionRequest, body)
    assert req.stream and req.stream_options.include_usage
    assert generate(oa.CompletionRequest, body) == defaults(
        prompt="def f(x):", max_tokens=40, temperature=0.0, top_p=0.9, top_k=5, seed=7, stop=["\n\n"],
        ignore_eos=True)


def test_stop_forms():
    assert generate(oa.CompletionRequest, {**TEXT, "stop": "END"})["stop"] == ["END"]
    assert generate(oa.CompletionRequest, {**TEXT, "stop": ["a", "b", "c", "d"]})["stop"] == ["a", "b", "c", "d"]
    assert generate(oa.CompletionRequest, {**TEXT, "stop": None})["stop"] == []
    assert generate(oa.CompletionRequest, TEXT)["stop"] == []


def test_via_sd_options_map_to_request_fields():
    options = {"mode": "sd", "lossless": True, "block_size": 6, "direct_threshold": 0.97, "slim_threshold": 0.4,
               "escalate_threshold": 0.7, "profile": "fast", "deferred_check": False, "return_token_ids": True}
    keys = ("mode", "lossless", "block_size", "direct_threshold", "slim_threshold", "escalate_threshold", "profile",
            "deferred_check")
    body = {**TEXT, "via_sd": options}
    assert oa.parse(oa.CompletionRequest, body).via_sd.return_token_ids is True
    got = generate(oa.CompletionRequest, body)
    assert {k: got[k] for k in keys} == {k: v for k, v in options.items() if k != "return_token_ids"}
    unset = generate(oa.CompletionRequest, TEXT)
    assert all(unset[k] is None for k in keys)


def test_chat_messages_text_parts_and_developer_role():
    body = {**CHAT, "messages": [
        {"role": "developer", "content": "Be brief."},
        {"role": "system", "content": [{"type": "text", "text": "No "}, {"type": "text", "text": "markdown."}]},
        {"role": "user", "content": "hi", "name": "ann"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": [{"type": "text", "text": "again"}]},
    ]}
    assert generate(oa.ChatCompletionRequest, body) == defaults(messages=[
        {"role": "system", "content": "Be brief."},
        {"role": "system", "content": "No markdown."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "again"},
    ], temperature=1.0)


def test_chat_max_completion_tokens_wins_over_max_tokens():
    assert generate(oa.ChatCompletionRequest, CHAT)["max_tokens"] is None  # the server's default applies
    assert generate(oa.ChatCompletionRequest, {**CHAT, "max_tokens": 30})["max_tokens"] == 30
    assert generate(oa.ChatCompletionRequest, {**CHAT, "max_completion_tokens": 12})["max_tokens"] == 12
    assert generate(oa.ChatCompletionRequest, {**CHAT, "max_tokens": 30, "max_completion_tokens": 12})[
        "max_tokens"] == 12


def test_accepted_no_op_fields():
    body = {**CHAT, "n": 1, "logprobs": False, "presence_penalty": 0, "frequency_penalty": 0.0,
            "response_format": {"type": "text"}}
    assert generate(oa.ChatCompletionRequest, body)["messages"] == [{"role": "user", "content": "hi"}]


NO_OPS = {"store": True, "metadata": {"k": "v"}, "service_tier": "auto", "parallel_tool_calls": True,
          "user": "u1", "prompt_cache_key": "k", "safety_identifier": "s", "tools": [], "tool_choice": "none",
          "modalities": ["text"], "logit_bias": {}, "repetition_penalty": 1, "min_p": 0,
          "skip_special_tokens": True, "spaces_between_special_tokens": True,
          "include_stop_str_in_output": False,
          "stream_options": {"include_usage": True, "continuous_usage_stats": False, "include_obfuscation": False,
                             "a_future_key": 1}}


def test_no_op_fields_change_nothing():
    plain = generate(oa.ChatCompletionRequest, CHAT)
    assert generate(oa.ChatCompletionRequest, {**CHAT, **NO_OPS}) == plain
    text = {k: v for k, v in NO_OPS.items() if k not in ("tools", "tool_choice", "parallel_tool_calls", "modalities")}
    assert generate(oa.CompletionRequest, {**TEXT, **text}) == generate(oa.CompletionRequest, TEXT)


OPTIONAL = ["max_tokens", "temperature", "top_p", "top_k", "n", "stream", "stream_options", "stop", "seed",
            "presence_penalty", "frequency_penalty", "logit_bias", "user", "ignore_eos", "min_tokens", "via_sd",
            "store", "metadata", "service_tier"]


@pytest.mark.parametrize("name", OPTIONAL + ["max_completion_tokens", "logprobs", "top_logprobs", "tools",
                                             "tool_choice", "response_format", "parallel_tool_calls"])
def test_null_means_the_default(name):
    assert generate(oa.ChatCompletionRequest, {**CHAT, name: None}) == generate(oa.ChatCompletionRequest, CHAT)


@pytest.mark.parametrize("name", OPTIONAL + ["echo", "logprobs", "suffix", "best_of"])
def test_null_means_the_default_for_completions(name):
    assert generate(oa.CompletionRequest, {**TEXT, name: None}) == generate(oa.CompletionRequest, TEXT)


def test_null_for_a_required_field_is_still_refused():
    with pytest.raises(InvalidRequest, match="model"):
        oa.parse(oa.CompletionRequest, {**TEXT, "model": None})


def test_vllm_extras_and_logprobs_map_to_the_request():
    fields = generate(oa.CompletionRequest, {**TEXT, "min_tokens": 3, "seed": -7, "logprobs": 2, "top_k": -1,
                                             "stop_token_ids": [5]})
    assert (fields["min_tokens"], fields["seed"], fields["logprobs"], fields["top_k"], fields["stop_token_ids"]) == \
        (3, -7, 2, 0, [5])
    chat = generate(oa.ChatCompletionRequest, {**CHAT, "logprobs": True, "top_logprobs": 4})
    assert chat["logprobs"] == 4
    assert generate(oa.ChatCompletionRequest, {**CHAT, "logprobs": True})["logprobs"] == 0
    assert generate(oa.ChatCompletionRequest, CHAT)["logprobs"] is None


EVENT_LP = {"token_ids": [7, 8], "text": "ab", "tier": "full", "token_tiers": ["direct", "full"],
            "finish_reason": None, "prompt_tokens": 3,
            "logprobs": [{"token_id": 7, "token": "a", "logprob": -0.5,
                          "top": [{"token_id": 7, "token": "a", "logprob": -0.5},
                                  {"token_id": 9, "token": "c", "logprob": -1.5}]},
                         {"token_id": 8, "token": "b", "logprob": -0.1, "top": []}]}


def test_logprobs_shapes_chat_and_completions():
    chat = oa.Logprobs(chat=True).of(EVENT_LP)
    first = chat["content"][0]
    assert first == {"token": "a", "logprob": -0.5, "bytes": [97], "via_sd_tier": "direct",
                     "top_logprobs": [{"token": "a", "logprob": -0.5, "bytes": [97]},
                                      {"token": "c", "logprob": -1.5, "bytes": [99]}]}
    assert chat["content"][1]["via_sd_tier"] == "full" and chat["refusal"] is None
    text = oa.Logprobs(chat=False)
    one, two = text.of(EVENT_LP), text.of(EVENT_LP)
    assert one["tokens"] == ["a", "b"] and one["token_logprobs"] == [-0.5, -0.1]
    assert one["top_logprobs"][0] == {"a": -0.5, "c": -1.5} and one["top_logprobs"][1] == {"b": -0.1}
    assert one["text_offset"] == [0, 1] and two["text_offset"] == [2, 3]  # offsets run on across chunks
    merged = oa.Logprobs.merge([one, None, two])
    assert merged["tokens"] == ["a", "b", "a", "b"] and merged["text_offset"] == [0, 1, 2, 3]
    assert oa.Logprobs(chat=True).of({**EVENT_LP, "logprobs": None}) is None


def test_stream_chunk_with_running_usage():
    chunk = oa.stream_chunk("c", "m", MID, chat=True, running=oa.running_usage(4, 3))
    assert chunk["usage"] == {"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7}


# -- bad requests --------------------------------------------------------------------------------

BAD = [
    # (id, model, body, field, what the message says was expected, what it says was received)
    ("n=2", oa.CompletionRequest, {**TEXT, "n": 2}, "n", "1", "2"),
    ("logprobs > 20", oa.CompletionRequest, {**TEXT, "logprobs": 21}, "logprobs", "[0, 20]", "21"),
    ("chat logprobs str", oa.ChatCompletionRequest, {**CHAT, "logprobs": "yes"}, "logprobs", "boolean", "'yes'"),
    ("top_logprobs alone", oa.ChatCompletionRequest, {**CHAT, "top_logprobs": 2}, "top_logprobs",
     "logprobs: true", "top_logprobs 2"),
    ("top_logprobs > 20", oa.ChatCompletionRequest, {**CHAT, "logprobs": True, "top_logprobs": 25}, "logprobs",
     "[0, 20]", "25"),
    ("min_tokens negative", oa.CompletionRequest, {**TEXT, "min_tokens": -1}, "min_tokens", "[0, 16]", "-1"),
    ("min_tokens > max_tokens", oa.CompletionRequest, {**TEXT, "min_tokens": 20, "max_tokens": 8}, "min_tokens",
     "[0, 8]", "20"),
    ("logit_bias", oa.CompletionRequest, {**TEXT, "logit_bias": {"5": 1.0}}, "logit_bias", "no logit biases", "1"),
    ("stop_token_ids negative", oa.CompletionRequest, {**TEXT, "stop_token_ids": [3, -1]}, "stop_token_ids.1",
     "[0, inf)", "-1"),
    ("repetition_penalty", oa.CompletionRequest, {**TEXT, "repetition_penalty": 1.2}, "repetition_penalty", "1",
     "1.2"),
    ("unknown field", oa.CompletionRequest, {**TEXT, "frobnicate": 1}, "frobnicate", "unknown field", "1"),
    ("unknown via_sd field", oa.CompletionRequest, {**TEXT, "via_sd": {"turbo": True}}, "via_sd.turbo",
     "unknown field", "True"),
    ("max_tokens str", oa.CompletionRequest, {**TEXT, "max_tokens": "ten"}, "max_tokens", "integer", "'ten'"),
    ("max_tokens fraction", oa.CompletionRequest, {**TEXT, "max_tokens": 2.5}, "max_tokens", "integer", "2.5"),
    ("temperature str", oa.CompletionRequest, {**TEXT, "temperature": "hot"}, "temperature", "number", "'hot'"),
    ("temperature < 0", oa.CompletionRequest, {**TEXT, "temperature": -0.1}, "temperature", "[0.0, 2.0]", "-0.1"),
    ("temperature > 2", oa.CompletionRequest, {**TEXT, "temperature": 2.5}, "temperature", "[0.0, 2.0]", "2.5"),
    ("top_p 0", oa.CompletionRequest, {**TEXT, "top_p": 0}, "top_p", "(0.0, 1.0]", "0"),
    ("top_p > 1", oa.CompletionRequest, {**TEXT, "top_p": 1.5}, "top_p", "(0.0, 1.0]", "1.5"),
    ("top_k < -1", oa.CompletionRequest, {**TEXT, "top_k": -2}, "top_k", "[0, inf)", "-2"),
    ("max_tokens 0", oa.CompletionRequest, {**TEXT, "max_tokens": 0}, "max_tokens", "[1, 256]", "0"),
    ("max_tokens negative", oa.ChatCompletionRequest, {**CHAT, "max_tokens": -3}, "max_tokens", "[1, 256]", "-3"),
    ("max_completion_tokens 0", oa.ChatCompletionRequest, {**CHAT, "max_completion_tokens": 0},
     "max_tokens", "[1, 256]", "0"),
    ("seed > 64 bits", oa.CompletionRequest, {**TEXT, "seed": 2**64}, "seed", "18446744073709551615",
     "18446744073709551616"),
    ("penalty", oa.CompletionRequest, {**TEXT, "presence_penalty": 0.5}, "presence_penalty", "0", "0.5"),
    ("5 stop strings", oa.CompletionRequest, {**TEXT, "stop": ["a", "b", "c", "d", "e"]}, "stop",
     "up to 4 non-empty stop strings", "'e'"),
    ("empty stop string", oa.CompletionRequest, {**TEXT, "stop": ""}, "stop", "non-empty", "''"),
    ("empty stop in list", oa.ChatCompletionRequest, {**CHAT, "stop": ["x", ""]}, "stop", "non-empty", "''"),
    ("empty messages", oa.ChatCompletionRequest, {**CHAT, "messages": []}, "messages", "at least 1 item", "[]"),
    ("unknown role", oa.ChatCompletionRequest, {**CHAT, "messages": [{"role": "tool", "content": "x"}]},
     "messages.0.role", "'user'", "'tool'"),
    ("non-text part", oa.ChatCompletionRequest,
     {**CHAT, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "u"}}]}]},
     "messages.content", "text parts", "'image_url'"),
    ("batched prompts", oa.CompletionRequest, {**TEXT, "prompt": ["one", "two"]}, "prompt", "one string",
     "2 prompts"),
    ("mixed prompt list", oa.CompletionRequest, {**TEXT, "prompt": [1, "a"]}, "prompt", "valid", "'a'"),
    ("no model", oa.CompletionRequest, {"prompt": "x"}, "model", "a value", "none"),
    ("body a list", oa.CompletionRequest, [TEXT], "body", "JSON object", "list"),
    ("body a string", oa.ChatCompletionRequest, "hello", "body", "JSON object", "str"),
    ("tools", oa.ChatCompletionRequest, {**CHAT, "tools": [{"type": "function", "function": {"name": "f"}}]},
     "tools", "no tools", "1"),
    ("response_format json", oa.ChatCompletionRequest, {**CHAT, "response_format": {"type": "json_object"}},
     "response_format", "{'type': 'text'}", "'json_object'"),
    ("via_sd mode", oa.CompletionRequest, {**TEXT, "via_sd": {"mode": "fast"}}, "via_sd.mode", "'via-sd'",
     "'fast'"),
    ("via_sd block_size", oa.CompletionRequest, {**TEXT, "via_sd": {"block_size": 65}}, "block_size",
     "[1, 64]", "65"),
    ("via_sd threshold", oa.CompletionRequest, {**TEXT, "via_sd": {"slim_threshold": 1.5}}, "slim_threshold",
     "[0.0, 1.0]", "1.5"),
]


@pytest.mark.parametrize(("model", "body", "field", "expected", "received"), [b[1:] for b in BAD],
                         ids=[b[0] for b in BAD])
def test_bad_request_names_field_expected_and_received(model, body, field, expected, received):
    with pytest.raises(InvalidRequest) as err:
        oa.parse(model, body).to_generate().check(256)  # the ranges: GenerateRequest.check, shared with gRPC
    message = err.value.message
    assert message.startswith(f"{field}:") or message.startswith(f"{field}."), message
    assert "expected" in message or "unknown field" in message, message
    assert expected in message and "received" in message and received in message.split("received", 1)[1], message
    assert err.value.http_status == 400


# -- responses -----------------------------------------------------------------------------------

STATS = {"blocks": 3, "proposed": 8, "accepted": 5, "mode": "via-sd", "lossless": False}
LAST = {"token_ids": [7, 8], "text": "lo", "tier": "slim", "finish_reason": "length",
        "usage": {"prompt_tokens": 4, "completion_tokens": 9, "total_tokens": 13}, "stats": STATS}
MID = {"token_ids": [1, 2, 3], "text": "hel", "tier": "direct", "finish_reason": None}


def test_completion_response_chat_and_text():
    chat = oa.completion_response("chatcmpl-1", "via-sd-tiny", "hello", None, LAST, chat=True)
    assert chat["id"] == "chatcmpl-1" and chat["object"] == "chat.completion" and chat["model"] == "via-sd-tiny"
    assert isinstance(chat["created"], int)
    assert chat["choices"] == [{"index": 0, "finish_reason": "length", "logprobs": None,
                                "message": {"role": "assistant", "content": "hello", "refusal": None}}]
    assert chat["usage"] == {"prompt_tokens": 4, "completion_tokens": 9, "total_tokens": 13, "via_sd": STATS}
    text = oa.completion_response("cmpl-1", "via-sd-tiny", "hello", [1, 2, 3, 7, 8], LAST, chat=False)
    assert text["object"] == "text_completion"
    assert text["choices"] == [{"index": 0, "finish_reason": "length", "logprobs": None, "text": "hello",
                                "token_ids": [1, 2, 3, 7, 8], "via_sd_tiers": []}]
    assert text["usage"]["via_sd"] == STATS
    assert LAST["usage"] == {"prompt_tokens": 4, "completion_tokens": 9, "total_tokens": 13}  # not mutated


def test_stream_chunks():
    role = oa.stream_chunk("chatcmpl-1", "m", None, chat=True, role=True)
    assert role["object"] == "chat.completion.chunk"
    assert role["choices"] == [{"index": 0, "finish_reason": None, "logprobs": None,
                                "delta": {"role": "assistant", "content": ""}}]
    chat = oa.stream_chunk("chatcmpl-1", "m", MID, chat=True)
    assert chat["choices"][0]["delta"] == {"content": "hel"} and "token_ids" not in chat["choices"][0]
    last = oa.stream_chunk("chatcmpl-1", "m", LAST, chat=True, return_token_ids=True)
    assert last["choices"][0] == {"index": 0, "finish_reason": "length", "logprobs": None,
                                  "delta": {"content": "lo"}, "token_ids": [7, 8], "via_sd_tiers": []}
    assert "usage" not in last
    text = oa.stream_chunk("cmpl-1", "m", MID, chat=False)
    assert text["object"] == "text_completion"
    assert text["choices"] == [{"index": 0, "finish_reason": None, "logprobs": None, "text": "hel"}]
    with_ids = oa.stream_chunk("cmpl-1", "m", MID, chat=False, return_token_ids=True)
    assert with_ids["choices"][0]["token_ids"] == [1, 2, 3]


def test_usage_chunk():
    for chat, kind in ((True, "chat.completion.chunk"), (False, "text_completion")):
        chunk = oa.usage_chunk("id-1", "m", LAST, chat)
        assert chunk["object"] == kind and chunk["choices"] == [] and chunk["id"] == "id-1"
        assert chunk["usage"] == {**LAST["usage"], "via_sd": STATS}


@pytest.mark.parametrize(("status", "kind"), [(400, "invalid_request_error"), (401, "authentication_error"),
                                              (404, "not_found_error"), (413, "invalid_request_error"),
                                              (429, "rate_limit_error"), (500, "server_error"),
                                              (503, "server_error")])
def test_error_body_type_per_status(status, kind):
    body = oa.error_body("something went wrong", status)
    assert body == {"error": {"message": "something went wrong", "type": kind, "param": None,
                              "code": oa.ERROR_CODES.get(status)}}
    assert body["error"]["code"] is None or isinstance(body["error"]["code"], str)  # OpenAI: string or null
    assert oa.error_body("model: expected 'a', received 'b'", 404)["error"]["code"] == "model_not_found"


def test_error_body_param_from_message():
    assert oa.error_body("max_tokens: expected a value in [1, 256], received 300", 400)["error"]["param"] == \
        "max_tokens"
    assert oa.error_body("messages.0.role: expected 'user', received 'tool'", 400)["error"]["param"] == \
        "messages.0.role"
    assert oa.error_body("model: expected 'a', received 'b'", 404)["error"]["param"] == "model"
    assert oa.error_body("no field here", 400)["error"]["param"] is None
    assert oa.error_body("max_tokens: too big", 400, param="given")["error"]["param"] == "given"
    # a server-side failure names no request field, though its message has a colon
    assert oa.error_body("internal error: RuntimeError: boom", 500)["error"]["param"] is None
    assert oa.error_body("drafter tier failed 3 times; retry the request (RuntimeError: x)", 503)["error"][
        "param"] is None


def test_new_id_is_unique_and_prefixed():
    a, b = oa.new_id("chatcmpl"), oa.new_id("chatcmpl")
    assert a.startswith("chatcmpl-") and a != b

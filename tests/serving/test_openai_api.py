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


# -- bad requests --------------------------------------------------------------------------------

BAD = [
    # (id, model, body, field, what the message says was expected, what it says was received)
    ("n=2", oa.CompletionRequest, {**TEXT, "n": 2}, "n", "1", "2"),
    ("logprobs", oa.CompletionRequest, {**TEXT, "logprobs": 3}, "logprobs", "None", "3"),
    ("chat logprobs", oa.ChatCompletionRequest, {**CHAT, "logprobs": True}, "logprobs", "False", "True"),
    ("top_logprobs", oa.ChatCompletionRequest, {**CHAT, "top_logprobs": 2}, "top_logprobs", "None", "2"),
    ("unknown field", oa.CompletionRequest, {**TEXT, "frobnicate": 1}, "frobnicate", "unknown field", "1"),
    ("unknown via_sd field", oa.CompletionRequest, {**TEXT, "via_sd": {"turbo": True}}, "via_sd.turbo",
     "unknown field", "True"),
    ("max_tokens str", oa.CompletionRequest, {**TEXT, "max_tokens": "ten"}, "max_tokens", "integer", "'ten'"),
    ("max_tokens fraction", oa.CompletionRequest, {**TEXT, "max_tokens": 2.5}, "max_tokens", "integer", "2.5"),
    ("temperature str", oa.CompletionRequest, {**TEXT, "temperature": "hot"}, "temperature", "number", "'hot'"),
    ("temperature < 0", oa.CompletionRequest, {**TEXT, "temperature": -0.1}, "temperature", "greater than or "
     "equal to 0", "-0.1"),
    ("temperature > 2", oa.CompletionRequest, {**TEXT, "temperature": 2.5}, "temperature", "less than or equal "
     "to 2", "2.5"),
    ("top_p 0", oa.CompletionRequest, {**TEXT, "top_p": 0}, "top_p", "greater than 0", "0"),
    ("top_p > 1", oa.CompletionRequest, {**TEXT, "top_p": 1.5}, "top_p", "less than or equal to 1", "1.5"),
    ("top_k < 0", oa.CompletionRequest, {**TEXT, "top_k": -1}, "top_k", "greater than or equal to 0", "-1"),
    ("max_tokens 0", oa.CompletionRequest, {**TEXT, "max_tokens": 0}, "max_tokens", "greater than or equal to 1",
     "0"),
    ("max_tokens negative", oa.ChatCompletionRequest, {**CHAT, "max_tokens": -3}, "max_tokens",
     "greater than or equal to 1", "-3"),
    ("max_completion_tokens 0", oa.ChatCompletionRequest, {**CHAT, "max_completion_tokens": 0},
     "max_completion_tokens", "greater than or equal to 1", "0"),
    ("seed negative", oa.CompletionRequest, {**TEXT, "seed": -1}, "seed", "greater than or equal to 0", "-1"),
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
     "tools", "None", "'function'"),
    ("response_format json", oa.ChatCompletionRequest, {**CHAT, "response_format": {"type": "json_object"}},
     "response_format", "{'type': 'text'}", "'json_object'"),
    ("via_sd mode", oa.CompletionRequest, {**TEXT, "via_sd": {"mode": "fast"}}, "via_sd.mode", "'via-sd'",
     "'fast'"),
    ("via_sd block_size", oa.CompletionRequest, {**TEXT, "via_sd": {"block_size": 65}}, "via_sd.block_size",
     "less than or equal to 64", "65"),
    ("via_sd threshold", oa.CompletionRequest, {**TEXT, "via_sd": {"slim_threshold": 1.5}}, "via_sd.slim_threshold",
     "less than or equal to 1", "1.5"),
]


@pytest.mark.parametrize(("model", "body", "field", "expected", "received"), [b[1:] for b in BAD],
                         ids=[b[0] for b in BAD])
def test_bad_request_names_field_expected_and_received(model, body, field, expected, received):
    with pytest.raises(InvalidRequest) as err:
        oa.parse(model, body).to_generate()  # a few checks run only when the request is built
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
                                "message": {"role": "assistant", "content": "hello"}}]
    assert chat["usage"] == {"prompt_tokens": 4, "completion_tokens": 9, "total_tokens": 13, "via_sd": STATS}
    text = oa.completion_response("cmpl-1", "via-sd-tiny", "hello", [1, 2, 3, 7, 8], LAST, chat=False)
    assert text["object"] == "text_completion"
    assert text["choices"] == [{"index": 0, "finish_reason": "length", "logprobs": None, "text": "hello",
                                "token_ids": [1, 2, 3, 7, 8]}]
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
                                  "delta": {"content": "lo"}, "token_ids": [7, 8]}
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
    assert body == {"error": {"message": "something went wrong", "type": kind, "param": None, "code": status}}


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

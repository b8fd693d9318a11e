"""The OpenAI-compatible request and response shapes (``/v1/completions``, ``/v1/chat/completions``).

Requests are validated here, field by field, with errors that name the field, what was
expected and what was received (the ranges are ``GenerateRequest.check``'s, shared with gRPC).
Fields that change nothing we generate (OpenAI's ``store``, ``metadata``, ``service_tier``, ...,
unknown ``stream_options`` keys, vLLM's extras at their defaults) are accepted and ignored;
``null`` means a field's default; what the server cannot honour (``n > 1``, penalties, tools,
logit biases) is refused with a 400 naming the field, never silently ignored. VIA-SD options travel in the
``via_sd`` extension object (``extra_body={"via_sd": {...}}`` with the ``openai`` client),
and ``usage.via_sd`` carries the per-tier statistics of the request.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from via_sd_ray.config import format_validation_error
from via_sd_ray.errors import InvalidRequest
from via_sd_ray.serving.router import GenerateRequest


class _Lenient(BaseModel):
    """Strict about types (no silent "10" -> 10 or true -> 1) and unknown fields; ``null`` for an optional
    field means its default, as OpenAI's schema allows."""

    model_config = ConfigDict(extra="forbid", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data):
        if isinstance(data, dict):
            required = {name for name, f in cls.model_fields.items() if f.is_required()}
            return {k: v for k, v in data.items() if v is not None or k in required}
        return data


class ViaSDOptions(_Lenient):
    mode: Literal["ar", "sd", "via-sd"] | None = None
    lossless: bool | None = None
    block_size: int | None = None
    direct_threshold: float | None = None
    slim_threshold: float | None = None
    escalate_threshold: float | None = None
    profile: str | None = None  # a router preset of the server's profile, e.g. "fast"
    deferred_check: bool | None = None
    return_token_ids: bool = False


class StreamOptions(_Lenient):
    model_config = ConfigDict(extra="ignore", strict=True)  # keys we do not know change nothing we send

    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's: cumulative usage on every chunk
    include_obfuscation: bool = True  # OpenAI's: we send no obfuscation padding either way


class _Common(_Lenient):
    model: str
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # vLLM's extension; -1 also means "no top-k cut" there
    n: Literal[1] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: Literal[0, 0.0] = 0.0
    frequency_penalty: Literal[0, 0.0] = 0.0
    logit_bias: dict[str, float] | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    stop_token_ids: list[int] = Field(default_factory=list)
    via_sd: ViaSDOptions = Field(default_factory=ViaSDOptions)
    # accepted and ignored: they change nothing we generate (OpenAI's bookkeeping fields; vLLM's at defaults)
    user: str | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    repetition_penalty: Literal[1, 1.0] = 1.0
    min_p: Literal[0, 0.0] = 0.0
    skip_special_tokens: Literal[True] = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: Literal[False] = False

    @field_validator("stop")
    @classmethod
    def _stops(cls, value):
        return [value] if isinstance(value, str) else list(value or [])

    @field_validator("logit_bias")
    @classmethod
    def _no_bias(cls, value):
        if value:
            raise ValueError(f"expected no logit biases (not supported), received {len(value)}")
        return value

    @field_validator("top_k")
    @classmethod
    def _top_k(cls, value):
        return 0 if value == -1 else value

    def generate_request(self, logprobs: int | None, **prompt) -> GenerateRequest:
        v = self.via_sd
        return GenerateRequest(
            **prompt, max_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
            seed=self.seed, stop=self.stop or [], ignore_eos=self.ignore_eos, mode=v.mode, lossless=v.lossless,
            block_size=v.block_size, direct_threshold=v.direct_threshold, slim_threshold=v.slim_threshold,
            escalate_threshold=v.escalate_threshold, profile=v.profile, deferred_check=v.deferred_check,
            min_tokens=self.min_tokens, logprobs=logprobs, stop_token_ids=list(self.stop_token_ids),
        )


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int]
    max_tokens: int | None = 16  # the OpenAI default for completions
    echo: Literal[False] = False
    logprobs: int | None = None  # top alternatives per token (the chosen token's is always given)
    suffix: Literal[""] | None = None
    best_of: Literal[1] | None = None

    def to_generate(self) -> GenerateRequest:
        prompt = self.prompt
        if isinstance(prompt, list) and prompt and all(isinstance(p, int) for p in prompt):
            return self.generate_request(self.logprobs, prompt_token_ids=list(prompt))
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise InvalidRequest(f"prompt: expected one string (batched prompts are not supported), "
                                     f"received {len(prompt)} prompts")
            prompt = prompt[0]
        return self.generate_request(self.logprobs, prompt=prompt)


class ChatMessage(_Lenient):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[dict[str, Any]]
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise InvalidRequest(f"messages.content: expected text parts, received {part.get('type')!r}")
            parts.append(part["text"])
        return "".join(parts)


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Literal["none"] | None = None
    parallel_tool_calls: bool | None = None  # with no tools it changes nothing
    response_format: dict[str, Any] | None = None
    modalities: list[Literal["text"]] | None = None

    @field_validator("tools")
    @classmethod
    def _no_tools(cls, value):
        if value:
            raise ValueError(f"expected no tools (tool calling is not supported), received {len(value)}")
        return value

    @field_validator("response_format")
    @classmethod
    def _text_only(cls, value):
        if value not in (None, {"type": "text"}):
            raise ValueError(f"expected {{'type': 'text'}} (structured output is not supported), received {value!r}")
        return value

    def to_generate(self) -> GenerateRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidRequest(f"top_logprobs: expected logprobs: true with it, received top_logprobs "
                                 f"{self.top_logprobs} and logprobs false")
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in self.messages]
        request = self.generate_request((self.top_logprobs or 0) if self.logprobs else None, messages=messages)
        if self.max_completion_tokens is not None:
            request.max_tokens = self.max_completion_tokens
        return request


def parse(model: type[BaseModel], body: Any):
    """Validate a decoded JSON body into ``model``; raise ``InvalidRequest`` naming the fields."""
    if not isinstance(body, dict):
        raise InvalidRequest(f"body: expected a JSON object, received {type(body).__name__}")
    try:
        return model.model_validate(body)
    except ValidationError as err:
        raise InvalidRequest(format_validation_error(err)) from None


# -- responses ---------------------------------------------------------------------------------

def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(last_event: dict, include_stats: bool = True) -> dict:
    out = dict(last_event["usage"])
    if include_stats:
        out["via_sd"] = last_event["stats"]
    return out


def running_usage(prompt_tokens: int, completion_tokens: int) -> dict:
    """The cumulative usage a chunk carries with ``stream_options.continuous_usage_stats``."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class Logprobs:
    """Accumulates the per-token logprob entries of the router's events into OpenAI's two shapes:
    chat (``{"content": [{token, logprob, bytes, top_logprobs}]}``) and completions (``tokens``,
    ``token_logprobs``, ``top_logprobs``, ``text_offset``). Each token entry also names the tier
    that decided it (``via_sd_tier``): in lossy via-sd a directly committed token's logprob is the
    drafter's."""

    def __init__(self, chat: bool):
        self.chat, self.offset = chat, 0

    def of(self, event: dict) -> dict | None:
        entries = event.get("logprobs")
        if entries is None:
            return None
        tiers = event.get("token_tiers") or [event.get("tier")] * len(entries)
        if self.chat:
            return {"content": [dict(_chat_entry(e), top_logprobs=[_chat_entry(t) for t in e["top"]],
                                     via_sd_tier=tier) for e, tier in zip(entries, tiers)], "refusal": None}
        offsets = []
        for e in entries:
            offsets.append(self.offset)
            self.offset += len(e["token"])
        return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
                "top_logprobs": [{**{t["token"]: t["logprob"] for t in e["top"]}, e["token"]: e["logprob"]}
                                 for e in entries],
                "text_offset": offsets, "via_sd_tiers": tiers}

    @staticmethod
    def merge(parts: list[dict | None]) -> dict | None:
        """One response's logprobs from its chunks' (non-streaming responses)."""
        parts = [p for p in parts if p is not None]
        if not parts:
            return None
        merged = {k: ([] if isinstance(v, list) else v) for k, v in parts[0].items()}
        for part in parts:
            for key, value in part.items():
                if isinstance(value, list):
                    merged[key] += value
        return merged


def _chat_entry(e: dict) -> dict:
    return {"token": e["token"], "logprob": e["logprob"], "bytes": list(e["token"].encode("utf-8"))}


def completion_response(request_id: str, model: str, text: str, token_ids: list[int] | None, last_event: dict,
                        chat: bool, logprobs: dict | None = None, token_tiers: list[str] | None = None) -> dict:
    choice: dict[str, Any] = {"index": 0, "finish_reason": last_event["finish_reason"], "logprobs": logprobs}
    if chat:
        choice["message"] = {"role": "assistant", "content": text, "refusal": None}
    else:
        choice["text"] = text
    if token_ids is not None:
        choice["token_ids"] = token_ids
        choice["via_sd_tiers"] = token_tiers or []
    return {"id": request_id, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": [choice], "usage": usage(last_event)}


def stream_chunk(request_id: str, model: str, event: dict | None, chat: bool, *, role: bool = False,
                 return_token_ids: bool = False, logprobs: dict | None = None, running: dict | None = None) -> dict:
    """One SSE chunk: the text (and optionally token ids, logprobs, cumulative usage) a block committed."""
    choice: dict[str, Any] = {"index": 0, "finish_reason": event["finish_reason"] if event else None,
                              "logprobs": logprobs}
    text = event["text"] if event else ""
    if chat:
        choice["delta"] = {"role": "assistant", "content": ""} if role else {"content": text}
    else:
        choice["text"] = text
    if return_token_ids and event:
        choice["token_ids"] = event["token_ids"]
        choice["via_sd_tiers"] = event.get("token_tiers") or []
    chunk = {"id": request_id, "object": "chat.completion.chunk" if chat else "text_completion",
             "created": int(time.time()), "model": model, "choices": [choice]}
    if running is not None:
        chunk["usage"] = running
    return chunk


def usage_chunk(request_id: str, model: str, last_event: dict, chat: bool) -> dict:
    return {"id": request_id, "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()), "model": model, "choices": [], "usage": usage(last_event)}


ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error",
               429: "rate_limit_error"}
# OpenAI's ``code`` is a string or null: a stable machine-readable reason where there is one
ERROR_CODES = {401: "invalid_api_key", 404: "not_found", 405: "method_not_allowed", 413: "request_too_large",
               429: "rate_limit_exceeded", 503: "service_unavailable", 500: "internal_error"}


def error_body(message: str, status: int, param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's error envelope: ``{"error": {"message", "type", "param", "code"}}``, ``code`` a string or null."""
    kind = ERROR_TYPES.get(status, "server_error")
    if param is None and status in (400, 401, 404, 413, 422) and ":" in message:  # others name no request field
        param = message.split(":", 1)[0].split(" ")[0]
    if code is None:
        code = "model_not_found" if status == 404 and param == "model" else ERROR_CODES.get(status)
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}

"""The OpenAI-compatible request and response shapes (``/v1/completions``, ``/v1/chat/completions``).

Requests are validated here, field by field, with errors that name the field, what was
expected and what was received. Fields the server cannot honour (``n > 1``, logprobs,
penalties, tools) are refused rather than silently ignored. VIA-SD options travel in the
``via_sd`` extension object (``extra_body={"via_sd": {...}}`` with the ``openai`` client),
and ``usage.via_sd`` carries the per-tier statistics of the request.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from via_sd_ray.config import format_validation_error
from via_sd_ray.errors import InvalidRequest
from via_sd_ray.serving.router import GenerateRequest


class ViaSDOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    mode: Literal["ar", "sd", "via-sd"] | None = None
    lossless: bool | None = None
    block_size: int | None = Field(None, ge=1, le=64)
    direct_threshold: float | None = Field(None, ge=0, le=1)
    slim_threshold: float | None = Field(None, ge=0, le=1)
    escalate_threshold: float | None = Field(None, ge=0, le=1)
    profile: str | None = None  # a router preset of the server's profile, e.g. "fast"
    deferred_check: bool | None = None
    return_token_ids: bool = False


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)  # no silent "10" -> 10 or true -> 1

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)
    n: Literal[1] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    presence_penalty: Literal[0, 0.0] = 0.0
    frequency_penalty: Literal[0, 0.0] = 0.0
    logit_bias: None = None
    user: str | None = None
    ignore_eos: bool = False
    via_sd: ViaSDOptions = Field(default_factory=ViaSDOptions)

    @field_validator("stop")
    @classmethod
    def _stops(cls, value):
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > 4 or not all(stops):
            raise ValueError(f"expected up to 4 non-empty stop strings, received {value!r}")
        return stops

    def generate_request(self, **prompt) -> GenerateRequest:
        v = self.via_sd
        return GenerateRequest(
            **prompt, max_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
            seed=self.seed, stop=self.stop or [], ignore_eos=self.ignore_eos, mode=v.mode, lossless=v.lossless,
            block_size=v.block_size, direct_threshold=v.direct_threshold, slim_threshold=v.slim_threshold,
            escalate_threshold=v.escalate_threshold, profile=v.profile, deferred_check=v.deferred_check,
        )


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int]
    max_tokens: int | None = Field(16, ge=1)  # the OpenAI default for completions
    echo: Literal[False] = False
    logprobs: None = None
    suffix: None = None
    best_of: Literal[1] | None = None

    def to_generate(self) -> GenerateRequest:
        prompt = self.prompt
        if isinstance(prompt, list) and prompt and all(isinstance(p, int) for p in prompt):
            return self.generate_request(prompt_token_ids=list(prompt))
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise InvalidRequest(f"prompt: expected one string (batched prompts are not supported), "
                                     f"received {len(prompt)} prompts")
            prompt = prompt[0]
        return self.generate_request(prompt=prompt)


class ChatMessage(BaseModel):
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
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: Literal[False] | None = None
    top_logprobs: None = None
    tools: None = None
    tool_choice: None = None
    response_format: dict[str, Any] | None = None

    @field_validator("response_format")
    @classmethod
    def _text_only(cls, value):
        if value not in (None, {"type": "text"}):
            raise ValueError(f"expected {{'type': 'text'}} (structured output is not supported), received {value!r}")
        return value

    def to_generate(self) -> GenerateRequest:
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in self.messages]
        request = self.generate_request(messages=messages)
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


def completion_response(request_id: str, model: str, text: str, token_ids: list[int] | None, last_event: dict,
                        chat: bool) -> dict:
    choice: dict[str, Any] = {"index": 0, "finish_reason": last_event["finish_reason"], "logprobs": None}
    if chat:
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    if token_ids is not None:
        choice["token_ids"] = token_ids
    return {"id": request_id, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": [choice], "usage": usage(last_event)}


def stream_chunk(request_id: str, model: str, event: dict | None, chat: bool, *, role: bool = False,
                 return_token_ids: bool = False) -> dict:
    """One SSE chunk: the text (and optionally token ids) a block committed."""
    choice: dict[str, Any] = {"index": 0, "finish_reason": event["finish_reason"] if event else None,
                              "logprobs": None}
    text = event["text"] if event else ""
    if chat:
        choice["delta"] = {"role": "assistant", "content": ""} if role else {"content": text}
    else:
        choice["text"] = text
    if return_token_ids and event:
        choice["token_ids"] = event["token_ids"]
    return {"id": request_id, "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()), "model": model, "choices": [choice]}


def usage_chunk(request_id: str, model: str, last_event: dict, chat: bool) -> dict:
    return {"id": request_id, "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()), "model": model, "choices": [], "usage": usage(last_event)}


def error_body(message: str, status: int, param: str | None = None) -> dict:
    kind = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
            413: "invalid_request_error", 429: "rate_limit_error"}.get(status, "server_error")
    if param is None and status in (400, 401, 404, 413, 422) and ":" in message:  # others name no request field
        param = message.split(":", 1)[0].split(" ")[0]
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}

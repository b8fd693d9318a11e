"""The ``Ingress`` deployment: OpenAI-compatible HTTP and the ``via_sd.v1.ViaSD`` gRPC service.

Both front ends turn a request into a ``GenerateRequest`` and stream the ``Router``'s
events back. Every request is checked in the same order: bearer token (when one is
configured, ``serving/auth.py``), size (``serving.max_request_bytes``), shape and model,
then the field ranges. Errors keep one mapping everywhere: a ``ViaSDError`` carries its HTTP
status and gRPC code; a ``Router`` refusing work over its ``max_queued_requests`` gives 429 with
``Retry-After`` / ``RESOURCE_EXHAUSTED``; a stream that fails after it started ends with an
error frame (SSE) or a gRPC status, never a silent stop.
"""


import asyncio
import json
import math
from typing import Any

import grpc
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.unknown_fields import UnknownFieldSet
from grpc_health.v1 import health_pb2
from ray import serve
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

from via_sd_ray.config import parse_config
from via_sd_ray.errors import InvalidRequest, ModelNotFound, ViaSDError
from via_sd_ray.serving import health as health_checks  # (the Ingress has a method named health)
from via_sd_ray.serving import openai_api as oa
from via_sd_ray.serving.auth import BearerAuth
from via_sd_ray.serving.grpc_gen import via_sd_pb2 as pb
from via_sd_ray.serving.grpc_service import HEALTH_SERVICES, WireError, health_status
from via_sd_ray.serving.priority import apply_niceness
from via_sd_ray.serving.router import GenerateRequest
from via_sd_ray.serving.tiers import DEPLOYMENT_OF_TIER

app = FastAPI(title="via-sd-ray", docs_url=None, redoc_url=None)
RETRY_AFTER_S = 1  # Retry-After of a 429 / 503 that names no delay of its own


class RequestTooLarge(InvalidRequest):
    """A body or message over ``serving.max_request_bytes``."""

    http_status = 413


def unwrap(err: BaseException) -> BaseException:
    """The user exception inside Ray's wrappers (RayTaskError keeps it as ``cause``)."""
    seen = 0
    while seen < 5 and not isinstance(err, ViaSDError) and getattr(err, "cause", None) is not None:
        err, seen = err.cause, seen + 1
    return err


def status_of(err: BaseException) -> tuple[int, str, str]:
    err = unwrap(err)
    if isinstance(err, ViaSDError):
        return err.http_status, err.grpc_code, err.message
    if isinstance(err, BackPressureError):  # a deployment behind the Ingress is at its max_queued_requests
        return (err.status_code, "RESOURCE_EXHAUSTED",
                f"the server is at capacity, retry after {retry_after_s(err)} s: {err.message}")
    if isinstance(err, DeploymentUnavailableError):
        return 503, "UNAVAILABLE", f"the server is unavailable, retry after {retry_after_s(err)} s: {err.message}"
    if _replica_died(err):  # the Router replica running this generation died: a new request will work
        return 503, "UNAVAILABLE", ("the generation was interrupted (its router replica died); retry the request "
                                    f"({type(err).__name__})")
    return 500, "INTERNAL", f"internal error: {type(err).__name__}: {err}"


def _replica_died(err: BaseException) -> bool:
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

    return isinstance(err, (ActorDiedError, ActorUnavailableError, RayActorError))


def retry_after_s(err: BaseException) -> int:
    """Whole seconds a client should wait before retrying (the Retry-After header)."""
    delay = getattr(unwrap(err), "retry_after_s", None)
    return RETRY_AFTER_S if delay is None else max(0, math.ceil(delay))


def check_wire_fields(message, prefix: str = "") -> None:
    """Refuse fields the schema does not know, and known fields sent with the wrong wire type (which
    protobuf keeps as unknown fields and would otherwise leave at their defaults: max_tokens sent as
    a string would silently become "unset")."""
    for unknown in UnknownFieldSet(message):
        field = message.DESCRIPTOR.fields_by_number.get(unknown.field_number)
        if field is None:
            raise InvalidRequest(f"{prefix}{unknown.field_number}: unknown field number for "
                                 f"{message.DESCRIPTOR.full_name} (proto/via_sd.proto)")
        raise InvalidRequest(f"{prefix}{field.name}: expected {_proto_type(field)}, received a value of "
                             f"another type (wire type {unknown.wire_type})")
    for i, nested in enumerate(getattr(message, "messages", ())):
        check_wire_fields(nested, f"messages.{i}.")


_PROTO_TYPES = {v: k.removeprefix("TYPE_").lower() for k, v in vars(FieldDescriptor).items() if k.startswith("TYPE_")}


def _proto_type(field) -> str:
    return _PROTO_TYPES.get(field.type, "another type")


def from_proto(request: "pb.GenerateRequest") -> GenerateRequest:
    """The GenerateRequest a gRPC request asks for (unset optional fields keep the defaults)."""
    has = request.HasField
    given = {"prompt": bool(request.prompt), "messages": bool(request.messages),
             "prompt_token_ids": bool(request.prompt_token_ids)}
    if sum(given.values()) != 1:
        named = [name for name, there in given.items() if there]
        raise InvalidRequest("prompt: expected exactly one of prompt, messages or prompt_token_ids (non-empty), "
                             f"received {', '.join(named) if named else 'none'}")
    for name in ("temperature", "top_p"):  # proto floats can be NaN or inf, which no range check catches
        if has(name) and not math.isfinite(getattr(request, name)):
            raise InvalidRequest(f"{name}: expected a finite number, received {getattr(request, name)}")
    return GenerateRequest(
        prompt=request.prompt or None,
        messages=[{"role": m.role, "content": m.content} for m in request.messages] or None,
        prompt_token_ids=list(request.prompt_token_ids) or None,
        max_tokens=request.max_tokens if has("max_tokens") else None,
        temperature=request.temperature if has("temperature") else 0.0,
        top_p=request.top_p if has("top_p") else 1.0,
        top_k=request.top_k if has("top_k") else 0,
        seed=request.seed if has("seed") else None,
        stop=list(request.stop),
        ignore_eos=request.ignore_eos,
        mode=request.mode or None,
        lossless=request.lossless if has("lossless") else None,
        block_size=request.block_size if has("block_size") else None,
        direct_threshold=request.direct_threshold if has("direct_threshold") else None,
        slim_threshold=request.slim_threshold if has("slim_threshold") else None,
        escalate_threshold=request.escalate_threshold if has("escalate_threshold") else None,
        profile=request.profile or None,
        deferred_check=request.deferred_check if has("deferred_check") else None,
        min_tokens=request.min_tokens,
        logprobs=request.logprobs if has("logprobs") else None,
        stop_token_ids=list(request.stop_token_ids),
        **({"request_id": request.request_id} if request.request_id else {}),
    )


def stats_proto(stats: dict) -> "pb.Stats":
    return pb.Stats(
        blocks=stats["blocks"], proposed=stats["proposed"], accepted=stats["accepted"],
        escalations=stats["escalations"], acceptance_rate=stats["acceptance_rate"],
        tokens_per_second=stats["tokens_per_s"], elapsed_s=stats["elapsed_s"], tier_blocks=stats["tier_blocks"],
        tier_tokens=stats["tier_tokens"], acceptance_per_position=stats["acceptance_per_position"],
        mode=stats["mode"], lossless=stats["lossless"],
    )


def logprobs_proto(event: dict) -> list:
    tiers = event.get("token_tiers") or []
    return [pb.TokenLogprob(token_id=e["token_id"], token=e["token"], logprob=e["logprob"],
                            tier=tiers[i] if i < len(tiers) else event["tier"],
                            top=[pb.TopLogprob(token_id=t["token_id"], token=t["token"], logprob=t["logprob"])
                                 for t in e["top"]])
            for i, e in enumerate(event.get("logprobs") or [])]


def chunk_proto(event: dict, request_id: str = "") -> "pb.GenerateChunk":
    chunk = pb.GenerateChunk(text=event["text"], token_ids=event["token_ids"], tier=event["tier"],
                             finish_reason=event["finish_reason"] or "", request_id=request_id,
                             token_tiers=event.get("token_tiers") or [], logprobs=logprobs_proto(event))
    if event.get("usage"):
        chunk.usage.CopyFrom(pb.Usage(**event["usage"]))
        chunk.stats.CopyFrom(stats_proto(event["stats"]))
    return chunk


def _grpc_error(context, err: BaseException, empty):
    _, code, message = status_of(err)
    if context is not None:
        context.set_code(getattr(grpc.StatusCode, code))
        context.set_details(message)
    return empty


async def _read_body(http: Request, limit: int) -> bytes:
    """The body, read only up to ``limit`` bytes (a client that sends more is cut off there)."""
    size = http.headers.get("content-length")
    if size is not None and size.isdigit() and int(size) > limit:
        raise RequestTooLarge(f"body: expected at most {limit} bytes (serving.max_request_bytes), received {size}")
    chunks, total = [], 0
    async for chunk in http.stream():
        total += len(chunk)
        if total > limit:
            raise RequestTooLarge(f"body: expected at most {limit} bytes (serving.max_request_bytes), received "
                                  "more")
        chunks.append(chunk)
    return b"".join(chunks)


def _json(raw: bytes) -> Any:
    try:
        return json.loads(raw.decode("utf-8"), parse_constant=_no_constant)
    except UnicodeDecodeError as err:
        raise InvalidRequest(f"body: expected UTF-8 text, received invalid byte at position {err.start}") from None
    except json.JSONDecodeError as err:
        raise InvalidRequest(f"body: expected valid JSON, received a parse error at line {err.lineno} column "
                             f"{err.colno}: {err.msg}") from None


def _no_constant(name: str):
    raise InvalidRequest(f"body: expected valid JSON (finite numbers), received {name}")


def _error_response(err: BaseException) -> JSONResponse:
    status, _, message = status_of(err)
    headers = {}
    if status in (429, 503):
        headers["Retry-After"] = str(retry_after_s(err))
    if status == 401:
        headers["WWW-Authenticate"] = getattr(unwrap(err), "challenge", "Bearer")
    return JSONResponse(oa.error_body(message, status), status_code=status, headers=headers or None)


async def coalesce(events):
    """The router's events with those whose text is empty (a block that ended inside a multi-byte
    character or a possible stop string) folded into the next one, so no chunk carries empty text;
    the last event is always passed on."""
    pending, done = None, False
    try:
        async for event in events:
            if pending is not None:
                event = {**event, "token_ids": pending["token_ids"] + event["token_ids"],
                         "token_tiers": pending.get("token_tiers", []) + event.get("token_tiers", []),
                         "text": pending["text"] + event["text"]}
                if "logprobs" in pending:
                    event["logprobs"] = pending["logprobs"] + event.get("logprobs", [])
                pending = None
            if not event["text"] and event["finish_reason"] is None:
                pending = event
                continue
            yield event
        done = True
    finally:
        if not done and hasattr(events, "cancel"):  # the client went away: stop the generation behind it
            events.cancel()
    if pending is not None:  # (a stream always ends with its final event, which is passed on)
        yield pending


@app.exception_handler(404)
async def _not_found(request: Request, exc) -> JSONResponse:
    return JSONResponse(oa.error_body(f"unknown route {request.method} {request.url.path} (expected one of "
                                      f"{ROUTES})", 404), status_code=404)


@app.exception_handler(405)
async def _not_allowed(request: Request, exc) -> JSONResponse:
    return JSONResponse(oa.error_body(f"method {request.method} is not allowed for {request.url.path} (expected "
                                      f"{_allowed(request.url.path)})", 405), status_code=405,
                        headers={"Allow": _allowed(request.url.path)})


ROUTES = ["GET /health", "GET /livez", "GET /v1/models", "GET /v1/models/{id}", "POST /v1/completions",
          "POST /v1/chat/completions"]


def _allowed(path: str) -> str:
    return "POST" if path.rstrip("/").endswith("completions") else "GET"


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n"


# Defined last: serve.ingress pickles the routes at import time, with the module globals they use.
@serve.ingress(app)  # at import time, so every process (driver and replica) sees the same routes
class Ingress:
    def __init__(self, args: dict[str, Any], router, auth: BearerAuth | None = None):
        self.config = parse_config(args)
        apply_niceness(self.config.serving.niceness)
        self.model_name = self.config.served_model_name
        self.max_request_bytes = self.config.serving.max_request_bytes
        self.router = router
        # the replica's environment decides (VIA_SD_API_TOKEN / VIA_SD_API_TOKEN_FILE); a bad secret fails start-up
        self.auth = auth if auth is not None else BearerAuth.from_env()

    # -- shared --------------------------------------------------------------------------------

    def _check_model(self, model: str) -> None:
        if model and model != self.model_name:
            raise ModelNotFound(f"model: expected {self.model_name!r}, received {model!r}")

    def _check_limits(self, request: GenerateRequest) -> None:
        """The field ranges, the same for both front ends, with the configured max_tokens bound."""
        request.check(self.config.limits.max_tokens)

    def _stream(self, request: GenerateRequest):
        return self.router.options(stream=True).generate.remote(request)

    async def _first(self, request: GenerateRequest):
        """Start a generation and wait for its first event with text, so request errors surface before any
        output; returns it and the rest, with empty-text events folded into the next (``coalesce``)."""
        events = coalesce(self._stream(request))
        first = await events.__anext__()
        return first, events

    # -- health (serving/health.py): /health, /livez and grpc.health.v1.Health, open without a token --

    async def _not_ready(self) -> str | None:
        """None when every tier has loaded its model and warmed up (the router's answer, within a time
        limit), else why not."""
        if getattr(self, "_readiness", None) is None:
            self._readiness = health_checks.Readiness(self._router_readiness, health_checks.ROUTER_TIMEOUT_S,
                                                      name="Router")
        return await self._readiness.check()

    async def _router_readiness(self) -> str | None:
        reasons = await health_checks.ask(self.router.readiness.remote())
        return "; ".join(f"{DEPLOYMENT_OF_TIER[tier]}: {why}" for tier, why in reasons.items() if why) or None

    @app.get("/health")
    async def health(self):
        """Readiness: 200 once every tier is ready, until then 503 naming the tiers it waits for."""
        reason = await self._not_ready()
        if reason is not None:
            return JSONResponse(oa.error_body(f"not ready: {reason}", 503), status_code=503,
                                headers={"Retry-After": str(RETRY_AFTER_S)})
        return {"status": "ok", "model": self.model_name}

    @app.get("/livez")
    async def livez(self) -> dict:
        """Liveness: the ingress process answers; nothing behind it is asked."""
        return {"status": "ok"}

    async def Check(self, request: "health_pb2.HealthCheckRequest", grpc_context=None
                    ) -> "health_pb2.HealthCheckResponse":
        """grpc.health.v1.Health/Check: SERVING once every tier is ready, else NOT_SERVING; service ""
        (the server) or via_sd.v1.ViaSD, any other gets NOT_FOUND."""
        if request.service not in HEALTH_SERVICES:
            if grpc_context is not None:
                grpc_context.set_code(grpc.StatusCode.NOT_FOUND)
                grpc_context.set_details(f"service: expected one of {list(HEALTH_SERVICES)}, received "
                                         f"{request.service!r}")
            return health_pb2.HealthCheckResponse()
        return health_pb2.HealthCheckResponse(status=health_status(request.service, await self._not_ready()))

    async def Watch(self, request: "health_pb2.HealthCheckRequest", grpc_context=None):
        """grpc.health.v1.Health/Watch: the status now, then each change (looked at every WATCH_POLL_S);
        an unknown service is SERVICE_UNKNOWN. The stream ends after WATCH_LIMIT_S (clients reconnect)."""
        loop = asyncio.get_running_loop()
        deadline, last = loop.time() + health_checks.WATCH_LIMIT_S, None
        while True:
            if request.service in HEALTH_SERVICES:
                status = health_status(request.service, await self._not_ready())
            else:
                status = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
            if status != last:
                yield health_pb2.HealthCheckResponse(status=status)
                last = status
            if loop.time() >= deadline:
                return
            await asyncio.sleep(health_checks.WATCH_POLL_S)

    # -- HTTP ----------------------------------------------------------------------------------

    def _model_card(self) -> dict:
        return {"id": self.model_name, "object": "model", "owned_by": "via-sd-ray", "created": 0}

    @app.get("/v1/models")
    async def models(self, request: Request):
        try:
            self.auth.check(request.headers.get("authorization"))
        except Exception as err:
            return _error_response(err)
        return {"object": "list", "data": [self._model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(self, model_id: str, request: Request):
        try:
            self.auth.check(request.headers.get("authorization"))
            if model_id != self.model_name:
                raise ModelNotFound(f"model: expected {self.model_name!r}, received {model_id!r}")
        except Exception as err:
            return _error_response(err)
        return self._model_card()

    @app.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._openai(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        return await self._openai(request, chat=True)

    async def _openai(self, http: Request, chat: bool):
        try:
            self.auth.check(http.headers.get("authorization"))
            body = _json(await _read_body(http, self.max_request_bytes))
            req = oa.parse(oa.ChatCompletionRequest if chat else oa.CompletionRequest, body)
            self._check_model(req.model)
            generate = req.to_generate()
            self._check_limits(generate)
            first, events = await self._first(generate)
        except Exception as err:
            return _error_response(err)
        request_id = oa.new_id("chatcmpl" if chat else "cmpl")
        return_ids = req.via_sd.return_token_ids
        logprobs = oa.Logprobs(chat)
        if not req.stream:
            text, ids, last, parts = first["text"], list(first["token_ids"]), first, [logprobs.of(first)]
            tiers = list(first["token_tiers"])
            try:
                async for event in events:
                    text += event["text"]
                    ids += event["token_ids"]
                    tiers += event["token_tiers"]
                    parts.append(logprobs.of(event))
                    last = event
            except Exception as err:
                return _error_response(err)
            return oa.completion_response(request_id, self.model_name, text, ids if return_ids else None, last, chat,
                                          oa.Logprobs.merge(parts), tiers)
        options = req.stream_options or oa.StreamOptions()
        return StreamingResponse(self._sse(request_id, first, events, chat, return_ids, options, logprobs),
                                 media_type="text/event-stream")

    async def _sse(self, request_id, first, events, chat, return_ids, options: "oa.StreamOptions", logprobs):
        if chat:
            yield _sse(oa.stream_chunk(request_id, self.model_name, None, chat, role=True,
                                       running=oa.running_usage(first["prompt_tokens"], 0)
                                       if options.continuous_usage_stats else None))
        last, completion = first, 0

        def chunk(event):
            nonlocal completion
            completion += len(event["token_ids"])
            running = oa.running_usage(event["prompt_tokens"], completion) if options.continuous_usage_stats else None
            return _sse(oa.stream_chunk(request_id, self.model_name, event, chat, return_token_ids=return_ids,
                                        logprobs=logprobs.of(event), running=running))

        try:
            yield chunk(first)
            async for event in events:
                last = event
                yield chunk(event)
        except Exception as err:  # a stream that fails says so
            status, _, message = status_of(err)
            yield _sse(oa.error_body(message, status))
            yield "data: [DONE]\n\n"
            return
        if options.include_usage and last.get("usage"):
            yield _sse(oa.usage_chunk(request_id, self.model_name, last, chat))
        yield "data: [DONE]\n\n"

    # -- gRPC (method names are the RPC names of proto/via_sd.proto) ----------------------------

    def _from_grpc(self, request: "pb.GenerateRequest", grpc_context) -> GenerateRequest:
        self.auth.check_metadata(grpc_context.invocation_metadata() if grpc_context is not None else None)
        if isinstance(request, WireError):  # serving/grpc_service.py could not decode the message
            raise InvalidRequest(request.message)
        size = request.ByteSize()
        if size > self.max_request_bytes:
            raise RequestTooLarge(f"request: expected at most {self.max_request_bytes} bytes "
                                  f"(serving.max_request_bytes), received {size}")
        check_wire_fields(request)
        self._check_model(request.model)
        generate = from_proto(request)
        self._check_limits(generate)
        return generate

    async def Generate(self, request: "pb.GenerateRequest", grpc_context=None) -> "pb.GenerateResponse":
        try:
            generate = self._from_grpc(request, grpc_context)
            first, events = await self._first(generate)
            text, ids, last, logprobs = first["text"], list(first["token_ids"]), first, logprobs_proto(first)
            async for event in events:
                text += event["text"]
                ids += event["token_ids"]
                logprobs += logprobs_proto(event)
                last = event
        except Exception as err:
            return _grpc_error(grpc_context, err, pb.GenerateResponse())
        return pb.GenerateResponse(text=text, token_ids=ids, finish_reason=last["finish_reason"],
                                   usage=pb.Usage(**last["usage"]), stats=stats_proto(last["stats"]),
                                   request_id=generate.request_id, logprobs=logprobs)

    async def GenerateStream(self, request: "pb.GenerateRequest", grpc_context=None):
        try:
            generate = self._from_grpc(request, grpc_context)
            first, events = await self._first(generate)
        except Exception as err:
            _grpc_error(grpc_context, err, None)
            raise
        try:
            yield chunk_proto(first, generate.request_id)
            async for event in events:
                yield chunk_proto(event, generate.request_id)
        except Exception as err:
            _grpc_error(grpc_context, err, None)
            raise

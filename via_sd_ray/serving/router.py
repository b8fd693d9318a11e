"""The ``Router`` deployment: the routing actor that runs each generation's block loop.

For every request it tokenizes the prompt, builds a ``core.engine.Generation`` and
answers its tier calls through ``TierClient``s (Ray handles to the tier deployments in
production, in-process servers in unit tests): draft, score, route to the cheapest tier
that meets the block's confidence, verify, commit, stream. It retries a tier call whose
replica died (the replacement rebuilds the KV cache from the token ids in the call) and
releases the generation's caches in every tier when it ends, fails or is cancelled.
"""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import os
import time
import uuid
from array import array
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from via_sd_ray.config import EngineConfig, parse_config
from via_sd_ray.core.engine import Commit, Draft, DraftCall, Generation, VerifyCall
from via_sd_ray.core.policy import Mode, Tier, load_block_cap
from via_sd_ray.core.sampling import MAX_LOGPROBS, SamplingParams
from via_sd_ray.errors import ConfigError, InvalidRequest, Overloaded, TierUnavailable, ViaSDError, check_range
from via_sd_ray.models.detok import IncrementalText
from via_sd_ray.models.tiers import DEFAULT_SLOT_TOKENS
from via_sd_ray.serving.priority import apply_niceness


@dataclass
class GenerateRequest:
    """One generation as the ingress hands it over (HTTP and gRPC map onto this)."""

    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    prompt_token_ids: list[int] | None = None
    max_tokens: int | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    mode: str | None = None
    lossless: bool | None = None
    block_size: int | None = None
    direct_threshold: float | None = None
    slim_threshold: float | None = None
    escalate_threshold: float | None = None
    profile: str | None = None  # a router preset (router.presets); None: the default point
    deferred_check: bool | None = None
    min_tokens: int = 0
    logprobs: int | None = None  # report logprobs with this many top alternatives per token; None: none
    stop_token_ids: list[int] = field(default_factory=list)
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)

    def check(self, max_tokens_limit: int) -> None:
        """The field ranges, the same for HTTP and gRPC (types are each front end's own schema)."""
        if self.max_tokens is not None:
            check_range("max_tokens", self.max_tokens, 1, max_tokens_limit, kind=int)
        check_range("temperature", self.temperature, 0.0, 2.0)
        check_range("top_p", self.top_p, 0.0, 1.0, low_open=True)
        check_range("top_k", self.top_k, 0, kind=int)
        if self.seed is not None:
            check_range("seed", self.seed, -(2**63), 2**64 - 1, kind=int)
        check_range("min_tokens", self.min_tokens, 0, self.max_tokens or max_tokens_limit, kind=int)
        if self.logprobs is not None:
            check_range("logprobs", self.logprobs, 0, MAX_LOGPROBS, kind=int)
        if len(self.stop) > 4 or not all(isinstance(s, str) and s for s in self.stop):
            raise InvalidRequest(f"stop: expected up to 4 non-empty stop strings, received {self.stop!r}")
        for i, token in enumerate(self.stop_token_ids):
            check_range(f"stop_token_ids.{i}", token, 0, kind=int)
        if self.block_size is not None:
            check_range("block_size", self.block_size, 1, 64, kind=int)
        for name in ("direct_threshold", "slim_threshold", "escalate_threshold"):
            if getattr(self, name) is not None:
                check_range(name, getattr(self, name), 0.0, 1.0)


class TierClient:
    """Calls one tier deployment through a Ray Serve handle, with session affinity on the generation's
    routing key (``route``: its prompt prefix hash or its id, see ``GenerationRouter.route_key``)."""

    def __init__(self, handle, tier: str, affinity: bool = True, route=None):
        self.handle, self.tier, self.affinity = handle, tier, affinity
        self.route = route or (lambda generation_id: generation_id)

    def _for(self, generation_id: str):
        return self.handle.options(session_id=self.route(generation_id)) if self.affinity else self.handle

    async def draft(self, call: DraftCall):
        return await self._for(call.generation_id).draft.remote(call)

    async def verify(self, call: VerifyCall):
        return await self._for(call.generation_id).verify.remote(call)

    async def release(self, generation_id: str) -> None:
        await self._for(generation_id).release.remote(generation_id)

    async def ready(self) -> bool:
        """Whether a replica of the tier has loaded its model and warmed up (any replica: no affinity)."""
        from via_sd_ray.serving.health import ask

        return await ask(self.handle.ready.remote())


class GenerationRouter:
    def __init__(self, args: dict[str, Any] | EngineConfig, drafter, slim, full, text=None, metrics=None):
        from via_sd_ray.models.tiers import text_info

        self.config = args if isinstance(args, EngineConfig) else parse_config(args)
        apply_niceness(self.config.serving.niceness)
        affinity = self.config.serving.affinity
        self.routes: dict[str, str] = {}  # generation id -> its routing key, while it runs
        # slim None: no SlimVerifier deployment (serving.slim_tier); its blocks go to the full verifier
        self.tiers = {name: (h if not _is_handle(h) else TierClient(h, name, affinity, self._route))
                      for name, h in (("drafter", drafter), ("slim", slim), ("full", full)) if h is not None}
        self.text = text if text is not None else text_info(self.config)
        # the longest sequence served: the context window, or a tier's KV slot if that is shorter
        slot = self.config.serving.kv_slot_tokens or DEFAULT_SLOT_TOKENS
        self.max_context = min(self.text.max_context, slot)
        self.context_name = ("the context window" if self.max_context == self.text.max_context
                             else "the KV slot, serving.kv_slot_tokens")
        self.metrics = metrics if metrics is not None else _default_metrics()
        self.active: set[str] = set()
        # generations a tier other than the full verifier refused a KV slot (all held by running generations):
        # never failed for it once started. Without the drafter they go on without drafts (the full model's own
        # decoding: the same tokens greedy, the same distribution sampled); the slim tier's blocks go to the full
        # verifier (a stricter check). The full verifier's own refusal stays the request's 429.
        self.undrafted: set[str] = set()
        self.unslimmed: set[str] = set()
        self.refused = {"drafter": 0, "slim": 0}

    # -- request -> generation -------------------------------------------------------------

    def encode(self, request: GenerateRequest) -> list[int]:
        given = [x is not None for x in (request.prompt, request.messages, request.prompt_token_ids)]
        if sum(given) != 1:
            raise InvalidRequest("prompt: expected exactly one of prompt, messages or prompt_token_ids, received "
                                 f"{sum(given)}")
        tok = self.text.tokenizer
        if request.messages is not None:
            if not request.messages:
                raise InvalidRequest("messages: expected at least one message, received an empty list")
            if not getattr(tok, "chat_template", None):
                raise InvalidRequest("messages: this model has no chat template; send a prompt")
            ids = tok.apply_chat_template(request.messages, add_generation_prompt=True)
            ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        elif request.prompt is not None:
            if not request.prompt:
                raise InvalidRequest("prompt: expected a non-empty string, received ''")
            ids = tok(request.prompt, add_special_tokens=False)["input_ids"]
        else:
            vocab = len(tok)
            ids = list(request.prompt_token_ids)
            if not ids or not all(type(t) is int and 0 <= t < vocab for t in ids):
                raise InvalidRequest(f"prompt_token_ids: expected a non-empty list of token ids in [0, {vocab})")
        if not ids:
            raise InvalidRequest("prompt: expected at least one token, received a prompt that encodes to none")
        if len(ids) >= self.max_context:
            raise InvalidRequest(f"prompt: expected fewer than {self.max_context} tokens ({self.context_name}), "
                                 f"received {len(ids)}")
        return ids

    def sampling(self, request: GenerateRequest, prompt_tokens: int) -> SamplingParams:
        limits = self.config.limits
        max_tokens = request.max_tokens
        if max_tokens is None:
            max_tokens = max(1, min(limits.default_max_tokens, self.max_context - prompt_tokens))
        elif isinstance(max_tokens, int) and not isinstance(max_tokens, bool) and max_tokens > limits.max_tokens:
            raise InvalidRequest(f"max_tokens: expected a value in [1, {limits.max_tokens}], received {max_tokens}")
        vocab = len(self.text.tokenizer)
        if any(t >= vocab for t in request.stop_token_ids):
            raise InvalidRequest(f"stop_token_ids: expected token ids in [0, {vocab}), received "
                                 f"{request.stop_token_ids}")
        return SamplingParams(max_tokens=max_tokens, temperature=request.temperature, top_p=request.top_p,
                              top_k=request.top_k, seed=request.seed, stop=tuple(request.stop or ()),
                              stop_token_ids=tuple(request.stop_token_ids), ignore_eos=request.ignore_eos,
                              min_tokens=min(request.min_tokens, max_tokens), logprobs=request.logprobs)

    def policy(self, request: GenerateRequest):
        overrides = {k: getattr(request, k) for k in ("mode", "lossless", "block_size", "direct_threshold",
                                                       "slim_threshold", "escalate_threshold", "deferred_check")}
        try:
            if overrides["mode"] is not None:
                Mode(overrides["mode"])
            policy = self.config.router.policy(request.profile, **overrides)
        except (ConfigError, ValueError) as err:
            message = getattr(err, "message", None) or (
                f"mode: expected one of {[m.value for m in Mode]}, received {overrides['mode']!r}")
            raise InvalidRequest(message.removeprefix("router.")) from None
        if "slim" not in self.tiers:  # no slim band: what it would decide, the full verifier does
            policy = replace(policy, slim_threshold=policy.direct_threshold)
        return policy

    # -- the block loop ----------------------------------------------------------------------

    async def generate(self, request: GenerateRequest) -> AsyncIterator[dict[str, Any]]:
        """Stream the generation as events: ``{"token_ids", "text", "tier", "finish_reason"}``; the
        last one also carries ``usage`` and ``stats``."""
        prompt_ids = self.encode(request)
        params = self.sampling(request, len(prompt_ids))
        policy = self.policy(request)
        # unique even when a client reuses a request id: tiers key caches (and releases) by it
        generation_id = f"{request.request_id}-{uuid.uuid4().hex[:8]}"
        serving = self.config.serving
        generation = Generation(prompt_ids, params, policy, self.text.eos_token_ids, self.max_context,
                                self.text.decode, generation_id=generation_id,
                                block_cap=lambda: load_block_cap(len(self.active), serving.verify_token_budget,
                                                                 serving.min_block))
        detok = IncrementalText(self.text.decode, params.stop)
        start = time.perf_counter()
        self.active.add(generation.generation_id)
        self.routes[generation_id] = self.route_key(generation_id, prompt_ids)
        try:
            steps, reply = generation.steps(), None
            while True:
                try:
                    item = steps.send(reply)
                except StopIteration:
                    break
                if isinstance(item, Commit):
                    reply = None
                    if self.metrics:
                        self.metrics.record_block(generation.stats.records[-1])
                    yield self._event(generation, detok, item, start, len(prompt_ids))
                else:
                    reply = await self._call(item)
            if self.metrics:
                self.metrics.finish(policy.mode.value, generation.finish_reason, len(generation.output_ids),
                                    time.perf_counter() - start)
        finally:
            self.active.discard(generation.generation_id)
            self.undrafted.discard(generation.generation_id)
            self.unslimmed.discard(generation.generation_id)
            self._release(generation.generation_id)

    def route_key(self, generation_id: str, prompt_ids: list[int]) -> str:
        """The session key a generation's tier calls are routed by: a hash of its first
        ``serving.prefix_affinity_tokens`` prompt tokens, so generations sharing them land on the replica
        holding their cached prefix (consistent hashing; a full replica passes them on), else its id."""
        n = self.config.serving.prefix_affinity_tokens
        if n is None or len(prompt_ids) < n:
            return generation_id
        return "prefix-" + hashlib.blake2b(array("q", prompt_ids[:n]).tobytes(), digest_size=12).hexdigest()

    def _route(self, generation_id: str) -> str:
        return self.routes.get(generation_id, generation_id)

    def _event(self, generation: Generation, detok: IncrementalText, commit: Commit, start: float,
               prompt_tokens: int) -> dict[str, Any]:
        done = commit.finish_reason is not None
        event = {
            "token_ids": commit.tokens,
            "text": detok.push(generation.output_ids, final=done, end=generation.stop_text_end if done else None),
            "tier": commit.tier.value,
            "token_tiers": [t.value for t in commit.token_tiers],
            "finish_reason": commit.finish_reason,
            "prompt_tokens": prompt_tokens,
        }
        if commit.logprobs is not None:
            event["logprobs"] = [self._logprob(token, lp) for token, lp in zip(commit.tokens, commit.logprobs)]
        if done:
            elapsed = time.perf_counter() - start
            completion = len(generation.output_ids)
            event["usage"] = {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                              "total_tokens": prompt_tokens + completion}
            stats = generation.stats.to_dict()
            stats.update(elapsed_s=elapsed, tokens_per_s=completion / elapsed if elapsed > 0 else 0.0,
                         mode=generation.policy.mode.value, lossless=generation.policy.lossless)
            event["stats"] = stats
        return event

    def _logprob(self, token: int, lp) -> dict[str, Any]:
        """A token's logprob entry: its text piece, log-probability and top alternatives."""
        piece = self.text.tokenizer.decode
        return {"token_id": token, "token": piece([token]), "logprob": lp.logprob,
                "top": [{"token_id": t, "token": piece([t]), "logprob": v} for t, v in lp.top]}

    async def _call(self, call: DraftCall | VerifyCall):
        tier = "drafter" if isinstance(call, DraftCall) else call.tier.value
        if tier == "drafter" and call.generation_id in self.undrafted:
            return Draft([], [])  # an empty block: the full verifier decodes one token
        if tier == "slim" and call.generation_id in self.unslimmed:
            call, tier = replace(call, tier=Tier.FULL), "full"
        client = self.tiers[tier]
        retries, timeout = self.config.serving.tier_retries, self.config.serving.tier_timeout_s
        for attempt in range(retries + 1):
            start = time.perf_counter()
            try:
                method = client.draft if tier == "drafter" else client.verify
                result = await asyncio.wait_for(method(call), timeout)
            except Overloaded:
                if tier == "full":
                    raise
                self.refused[tier] += 1
                if tier == "drafter":  # go on without drafts (vLLM likewise stops drafting under load)
                    self.undrafted.add(call.generation_id)
                    return Draft([], [])
                self.unslimmed.add(call.generation_id)
                return await self._call(replace(call, tier=Tier.FULL))
            except (ViaSDError, ValueError):
                raise  # the request itself is wrong: retrying cannot help
            except asyncio.CancelledError:
                raise
            except Exception as err:  # a replica died, was unreachable or timed out
                if self.metrics:
                    self.metrics.retries.inc(tags={"tier": tier})
                if attempt == retries:
                    raise TierUnavailable(f"{tier} tier failed {retries + 1} times; retry the request "
                                          f"({type(err).__name__}: {err})") from None
                await asyncio.sleep(min(0.2 * 2**attempt, 2.0))
                continue
            if self.metrics:
                self.metrics.observe_tier(tier, time.perf_counter() - start)
            return result

    def _release(self, generation_id: str) -> None:
        """Tell every tier to drop the generation's caches, without waiting (also on cancellation).

        The release calls run in a fresh context: created in the request's own, Serve would treat
        them as its child requests and cancel them with it when the client disconnects."""
        async def release_all() -> None:
            try:
                await asyncio.gather(*(_quietly(client.release(generation_id)) for client in self.tiers.values()))
            finally:
                self.routes.pop(generation_id, None)  # the releases were routed by it

        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no running loop (interpreter shutting down)
            self.routes.pop(generation_id, None)
            return
        loop.create_task(release_all(), context=contextvars.Context())

    async def check_health(self) -> None:
        return None

    async def readiness(self) -> dict[str, str | None]:
        """Per tier, None when a replica of it has loaded its model and answered its warm-up call, else
        why not: each tier is asked with a time limit, a yes is kept a few seconds (serving/health.py)."""
        from via_sd_ray.serving.health import TIER_TIMEOUT_S, Readiness

        if getattr(self, "_tier_readiness", None) is None:
            async def probe(tier: str) -> str | None:
                return None if await self.tiers[tier].ready() else "its model runner is broken"

            self._tier_readiness = {tier: Readiness(lambda tier=tier: probe(tier), TIER_TIMEOUT_S)
                                    for tier in self.tiers}
        reasons = await asyncio.gather(*(r.check() for r in self._tier_readiness.values()))
        return dict(zip(self._tier_readiness, reasons))

    async def ready(self) -> bool:
        """Whether every tier is ready (``readiness`` says which are not, and why)."""
        return not any((await self.readiness()).values())

    def stats(self) -> dict[str, Any]:
        from via_sd_ray.serving.tiers import _node_id

        return {"active_generations": len(self.active), "generations_without_drafts": self.refused["drafter"],
                "generations_without_slim": self.refused["slim"], "pid": os.getpid(), "node_id": _node_id()}


async def _quietly(awaitable) -> None:
    try:
        await awaitable
    except Exception:  # a dead replica has no cache to release
        pass


def _is_handle(obj) -> bool:
    return type(obj).__name__ == "DeploymentHandle"


def _default_metrics():
    try:
        import ray

        if not ray.is_initialized():
            return None
    except ImportError:
        return None
    from via_sd_ray.serving.metrics import RouterMetrics

    return RouterMetrics()


def request_from_dict(data: dict[str, Any]) -> GenerateRequest:
    known = {f for f in GenerateRequest.__dataclass_fields__}
    return GenerateRequest(**{k: v for k, v in data.items() if k in known})


__all__ = ["GenerateRequest", "GenerationRouter", "TierClient", "asdict", "request_from_dict"]

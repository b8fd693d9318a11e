"""The in-process engine: drafter, slim verifier and full verifier in one process, no Ray.

The slim verifier shares the full verifier's modules (same weights, no extra memory) and
keeps its own KV caches. ``LocalEngine`` answers the core block loop's tier calls
directly and times each tier, which is what the CLI and the benchmarks use.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from via_sd_ray.config import EngineConfig
from via_sd_ray.core.engine import Commit, DraftCall, Generation, VerifyCall, drive
from via_sd_ray.core.policy import RouterPolicy, Tier, load_block_cap
from via_sd_ray.core.sampling import SamplingParams
from via_sd_ray.core.stats import GenerationStats
from via_sd_ray.errors import InvalidRequest
from via_sd_ray.models.decoder import DecoderStack
from via_sd_ray.models.detok import IncrementalText
from via_sd_ray.models.loading import eos_token_ids, load_tokenizer, resolve
from via_sd_ray.models.runner import TierRunner
from via_sd_ray.models.sharded import ShardLauncher
from via_sd_ray.models.tiers import build_drafter, tier_runner, verifier_stacks


@dataclass
class TierTimes:
    """Wall time and calls per tier over a generation."""

    seconds: dict[str, float] = field(default_factory=lambda: {"drafter": 0.0, "slim": 0.0, "full": 0.0})
    calls: dict[str, int] = field(default_factory=lambda: {"drafter": 0, "slim": 0, "full": 0})

    def add(self, tier: str, seconds: float) -> None:
        self.seconds[tier] += seconds
        self.calls[tier] += 1


@dataclass
class GenerationResult:
    token_ids: list[int]
    text: str
    finish_reason: str
    prompt_tokens: int
    stats: GenerationStats
    times: TierTimes
    elapsed: float
    first_token_s: float | None = None  # from the start to the first committed token

    @property
    def tokens_per_second(self) -> float:
        return len(self.token_ids) / self.elapsed if self.elapsed > 0 else 0.0

    def stats_dict(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": len(self.token_ids),
            "elapsed_s": self.elapsed,
            "tokens_per_s": self.tokens_per_second,
            "finish_reason": self.finish_reason,
            **self.stats.to_dict(),
            "tier_seconds": dict(self.times.seconds),
            "tier_calls": dict(self.times.calls),
        }


@dataclass
class StreamEvent:
    token_ids: list[int]  # committed by this block
    text: str  # new text (may be empty while a character or a possible stop string is incomplete)
    tier: Tier
    finish_reason: str | None
    token_tiers: list[Tier] = field(default_factory=list)  # the tier that decided each token
    logprobs: list | None = None  # core.sampling.TokenLogprob per token (params.logprobs set)


class LocalEngine:
    def __init__(self, config: EngineConfig, threads: int | None = None, launcher: ShardLauncher | None = None):
        """``launcher`` starts the verifier's other tensor-parallel ranks (tensor_parallel_size > 1)."""
        if threads or config.threads:
            torch.set_num_threads(threads or config.threads)
        verifier_cfg = config.models.verifier
        verifier_src = resolve(verifier_cfg.source, verifier_cfg.revision)
        stacks = verifier_stacks(config, {"full": None, "slim": config.slim.layers}, None, launcher)
        self._setup(config, load_tokenizer(verifier_src), stacks["full"], stacks["slim"],
                    build_drafter(config, stacks["full"].vocab_size))

    @classmethod
    def from_models(cls, config: EngineConfig, verifier, drafter, tokenizer) -> LocalEngine:
        """An engine over models already built (``via-sd gpu-check``'s random weights of real shapes):
        ``config`` gives the slim layers, router and KV pools; its model sources are not read."""
        engine = cls.__new__(cls)
        full = DecoderStack(verifier)
        engine._setup(config, tokenizer, full, DecoderStack(verifier, config.slim.layers),
                      tier_runner(DecoderStack(drafter), config, "drafter"))
        return engine

    def _setup(self, config: EngineConfig, tokenizer, full, slim, drafter) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.verifier_model = full.hf_model  # on its engine (rank 0's shard under tensor parallelism)
        self.full = tier_runner(full, config, "full")
        self.slim = tier_runner(slim, config, "slim")
        self.drafter = drafter
        if isinstance(self.drafter, TierRunner):
            self.drafter_model = self.drafter.stack.hf_model
        self.eos_token_ids = eos_token_ids(self.verifier_model, self.tokenizer)
        self.max_context = min([self.full.max_context] + ([self.drafter.max_context]
                                                          if isinstance(self.drafter, TierRunner) else []))
        self.policy = config.router.policy()

    # -- prompts -------------------------------------------------------------------------

    def encode(self, prompt: str | list[dict], chat: bool = False) -> list[int]:
        """Token ids of a plain prompt, or of chat messages through the tokenizer's chat template."""
        if chat or isinstance(prompt, list):
            messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
            if not getattr(self.tokenizer, "chat_template", None):
                raise InvalidRequest("messages: this model's tokenizer has no chat template; send a plain prompt")
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
            return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
        return self.tokenizer(prompt, add_special_tokens=False)["input_ids"]

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    # -- generation ----------------------------------------------------------------------

    def new_generation(self, prompt_ids: list[int], params: SamplingParams,
                       policy: RouterPolicy | None = None) -> Generation:
        if params.max_tokens > self.config.limits.max_tokens:
            raise InvalidRequest(
                f"max_tokens: expected at most {self.config.limits.max_tokens}, received {params.max_tokens}")
        return Generation(list(prompt_ids), params, policy or self.policy, self.eos_token_ids,
                          self.max_context, self.decode)

    def stream(self, generation: Generation, times: TierTimes | None = None) -> Iterator[StreamEvent]:
        """Run ``generation``, yielding each block's commit with its new text; ``times`` collects tier times."""
        detok = IncrementalText(self.decode, generation.params.stop)
        times = times if times is not None else TierTimes()
        try:
            for commit in drive(generation.steps(), lambda call: self._dispatch(call, times)):
                done = commit.finish_reason is not None
                text = detok.push(generation.output_ids, final=done, end=generation.stop_text_end if done else None)
                yield StreamEvent(commit.tokens, text, commit.tier, commit.finish_reason, commit.token_tiers,
                                  commit.logprobs)
        finally:
            self.release(generation.generation_id)

    def generate(self, prompt_ids: list[int], params: SamplingParams,
                 policy: RouterPolicy | None = None) -> GenerationResult:
        generation = self.new_generation(prompt_ids, params, policy)
        times = TierTimes()
        start = time.perf_counter()
        pieces = [event.text for event in self.stream(generation, times)]
        return GenerationResult(
            token_ids=list(generation.output_ids),
            text="".join(pieces),
            finish_reason=generation.finish_reason,
            prompt_tokens=len(prompt_ids),
            stats=generation.stats,
            times=times,
            elapsed=time.perf_counter() - start,
        )

    def generate_batch(self, prompts: list[list[int]], params: SamplingParams,
                       policy: RouterPolicy | None = None) -> list[GenerationResult]:
        """Run several generations together, as a serving replica batches them: each round collects every
        unfinished generation's next tier call and runs the calls of one tier in one batched pass
        (a long prompt's prefill in chunks, the others' steps beside it). Results in prompt order;
        each one's ``elapsed`` runs from the common start to its last token. Blocks shrink with the number
        of generations still running as the served router shrinks them (``serving.verify_token_budget``)."""
        generations = [self.new_generation(p, params, policy) for p in prompts]
        steps = [g.steps() for g in generations]
        times = [TierTimes() for _ in prompts]
        elapsed: list[float] = [0.0] * len(prompts)  # set as each generation ends
        serving = self.config.serving

        def block_cap() -> int | None:  # the served router's: the budget spread over the generations running
            return load_block_cap(elapsed.count(0.0), serving.verify_token_budget, serving.min_block)

        for generation in generations:
            generation.block_cap = block_cap
        first: list[float | None] = [None] * len(prompts)
        calls: dict[int, DraftCall | VerifyCall] = {}
        start = time.perf_counter()

        def advance(i: int, reply) -> None:
            while True:
                try:
                    item = steps[i].send(reply)
                except StopIteration:
                    elapsed[i] = time.perf_counter() - start
                    return
                if isinstance(item, Commit):
                    if first[i] is None and item.tokens:
                        first[i] = time.perf_counter() - start
                    reply = None
                    continue
                calls[i] = item
                return

        try:
            for i in range(len(prompts)):
                advance(i, None)
            while calls:
                by_tier: dict[str, list[int]] = {}
                for i, call in calls.items():
                    by_tier.setdefault("drafter" if isinstance(call, DraftCall) else call.tier.value, []).append(i)
                for tier, rows in by_tier.items():
                    began = time.perf_counter()
                    batch = [calls.pop(i) for i in rows]
                    runner = {"drafter": self.drafter, "slim": self.slim, "full": self.full}[tier]
                    replies = runner.draft_batch(batch) if tier == "drafter" else runner.verify_batch(batch)
                    took = (time.perf_counter() - began) / len(rows)
                    for i, reply in zip(rows, replies):
                        times[i].add(tier, took)
                        advance(i, reply)
        finally:
            for g in generations:
                self.release(g.generation_id)
        return [GenerationResult(token_ids=list(g.output_ids), text=self.decode(g.output_ids),
                                 finish_reason=g.finish_reason, prompt_tokens=len(p), stats=g.stats, times=t,
                                 elapsed=e, first_token_s=f)
                for g, p, t, e, f in zip(generations, prompts, times, elapsed, first)]

    def release(self, generation_id: str) -> None:
        for tier in (self.drafter, self.slim, self.full):
            tier.release(generation_id)

    def _dispatch(self, call: DraftCall | VerifyCall, times: TierTimes):
        start = time.perf_counter()
        if isinstance(call, DraftCall):
            reply, name = self.drafter.draft(call), "drafter"
        else:
            name = call.tier.value
            reply = (self.slim if call.tier is Tier.SLIM else self.full).verify(call)
        times.add(name, time.perf_counter() - start)
        return reply


__all__ = ["Commit", "GenerationResult", "LocalEngine", "StreamEvent"]

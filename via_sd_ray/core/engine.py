"""One generation's block loop as a sans-IO state machine.

``Generation.steps()`` is a generator. It yields tier calls (``DraftCall``,
``VerifyCall``) and receives their replies (``Draft``, ``Verdict``), and it yields
``Commit`` events for the tokens it commits. Who answers the calls is not its
business: ``drive`` answers them in-process, the serving router answers them with
Ray handles to tier deployments. Every call carries the whole committed sequence, so
a tier replica that has no KV cache for the generation can rebuild it from token ids.

Per block:

1. the drafter proposes up to K tokens and its probability of each;
2. the policy routes the block by its confidence to ``direct``, ``slim`` or ``full``;
3. ``slim`` verifies and recovers like a verifier; from the first position where its own
   top probability is below the escalation threshold, its candidate goes to ``full``;
4. the committed tokens are cut at EOS, stop strings and ``max_tokens``.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Callable, Generator
from dataclasses import dataclass, field

import torch

from via_sd_ray.core.policy import Mode, RouterPolicy, Tier, block_confidence
from via_sd_ray.core.sampling import Proposal, SamplingParams, TokenLogprob, derive_seed
from via_sd_ray.core.stats import BlockRecord, GenerationStats
from via_sd_ray.core.verify import Verdict
from via_sd_ray.errors import InvalidRequest


@dataclass
class DraftCall:
    """Ask the drafter for up to ``k`` tokens after ``committed``."""

    generation_id: str
    committed: list[int]
    k: int
    params: SamplingParams
    seed: int  # seeds this call's draws; derived from the generation seed and the block index
    stop_threshold: float = 0.0  # stop the block early after a token whose probability is below this
    suppress_ids: tuple[int, ...] = ()  # impossible in the first suppress_rows tokens (min_tokens)
    suppress_rows: int = 0


@dataclass
class Draft:
    tokens: list[int]  # the block
    token_probs: list[float]  # drafter probability of each block token
    probs: torch.Tensor | Proposal | None = None  # the drafter's distributions the block was drawn from
    # (sampling only): a sparse Proposal [len(tokens), top-k], or dense [len(tokens), V]
    logprobs: list[TokenLogprob] | None = None  # the drafter's, of each block token (params.logprobs set)


@dataclass
class VerifyCall:
    """Ask verifier ``tier`` to verify ``block`` after ``committed``."""

    tier: Tier
    generation_id: str
    committed: list[int]
    block: list[int]
    params: SamplingParams
    seed: int
    draft_probs: torch.Tensor | Proposal | None = None  # of the block's tokens; None: greedy, or one-hot
    return_probs: bool = False
    suppress_ids: tuple[int, ...] = ()  # impossible in the first suppress_rows positions (min_tokens)
    suppress_rows: int = 0


@dataclass
class Commit:
    """Tokens appended to the generation by one block."""

    tokens: list[int]
    tier: Tier  # the tier that closed the block (it decided the last token)
    finish_reason: str | None = None  # "stop" or "length" on the last commit
    # the tier that decided each token, and its logprobs from that tier (params.logprobs set)
    token_tiers: list[Tier] = field(default_factory=list, compare=False)
    logprobs: list[TokenLogprob | None] | None = field(default=None, compare=False)


@dataclass
class Generation:
    """The state of one generation; ``steps()`` runs its block loop."""

    prompt_ids: list[int]
    params: SamplingParams
    policy: RouterPolicy
    eos_token_ids: tuple[int, ...] = ()
    max_context: int | None = None
    decode: Callable[[list[int]], str] | None = None  # needed only for stop strings
    generation_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    output_ids: list[int] = field(default_factory=list)
    stats: GenerationStats = field(default_factory=GenerationStats)
    finish_reason: str | None = None
    stop_text_end: int | None = None  # where the output text ends when a stop string matched
    block_cap: Callable[[], int | None] | None = None  # load-adaptive limit on draft tokens, read every block

    def __post_init__(self):
        if not self.prompt_ids:
            raise InvalidRequest("prompt: expected at least one token, received an empty prompt")
        if self.max_context is not None and len(self.prompt_ids) + self.params.max_tokens > self.max_context:
            raise InvalidRequest(
                f"prompt + max_tokens: expected at most {self.max_context} tokens (the context window), "
                f"received {len(self.prompt_ids)} prompt tokens + max_tokens {self.params.max_tokens}"
            )
        if self.params.stop and self.decode is None:
            raise InvalidRequest("stop: stop strings need a tokenizer to decode with")
        self.seed = self.params.seed if self.params.seed is not None else random.getrandbits(63)
        self._stops = set(self.params.stop_token_ids) | (set() if self.params.ignore_eos else set(self.eos_token_ids))

    @property
    def committed(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def steps(self) -> Generator[DraftCall | VerifyCall | Commit, Draft | Verdict | None, GenerationStats]:
        policy, params = self.policy, self.params
        block_index, direct_run = 0, 0
        held = _Held()  # tokens decided without the full verifier, waiting for its check (deferred_check)
        while self.finish_reason is None:
            remaining = params.max_tokens - len(self.output_ids) - len(held.tokens)
            k = min(policy.block_size, remaining - 1) if policy.uses_drafter else 0
            cap = self.block_cap() if self.block_cap else None
            if cap is not None:
                k = min(k, cap - len(held.tokens))  # the verify pass carries the held tokens too
            draft = Draft([], [])
            if k > 0:
                before = self.committed + held.tokens
                draft = yield DraftCall(self.generation_id, before, k, params, self._seed("draft", block_index),
                                        policy.draft_stop_threshold, *self._suppress(before))
            confidence = block_confidence(draft.token_probs, policy.score)
            tier = self._route(draft, confidence, direct_run)
            direct_run = direct_run + 1 if tier is Tier.DIRECT else 0
            record = BlockRecord(tier=tier, proposed=len(draft.tokens), confidence=confidence)
            block_index += 1
            if tier is Tier.DIRECT:
                if policy.deferred_check:
                    held.add(list(draft.tokens), draft, record)
                    continue
                new = _Decided(list(draft.tokens), [Tier.DIRECT] * len(draft.tokens), draft.logprobs)
            elif tier is Tier.SLIM:
                new = yield from self._slim(draft, block_index - 1, record, held)
                if new is None:  # held until the full verifier's next call
                    continue
            else:
                block = held.tokens + draft.tokens
                verdict = yield self._verify_call(Tier.FULL, self.committed, block, held.probs(draft),
                                                  block_index - 1)
                new = _Decided.of(verdict, block, Tier.FULL)
            committed = self._commit(new.tokens)
            self._record(held.records + [record], held.drafts + [draft.tokens], held.spans, committed)
            held = _Held()
            n = len(committed)
            yield Commit(committed, tier, self.finish_reason, new.tiers[:n],
                         new.logprobs[:n] if params.logprobs is not None else None)
        return self.stats

    def _route(self, draft: Draft, confidence: float, direct_run: int) -> Tier:
        if not draft.tokens:
            return Tier.FULL
        policy = self.policy
        if policy.lossless and not self.params.greedy and policy.mode is Mode.VIA_SD:
            # Rejection sampling is exact for proposals drawn from the drafter's distribution. Choosing the
            # verification path by the sampled block's own confidence conditions the proposals on that choice
            # and biases the output, so every sampled block takes one path: drafter -> slim -> full.
            return Tier.SLIM
        tier = policy.route(confidence, direct_run)
        if policy.deferred_check and tier is not Tier.FULL:
            if tier is Tier.DIRECT and self._stops.intersection(draft.tokens):
                return Tier.FULL  # a block that may end the generation is checked now, not drafted past
            if tier is Tier.SLIM and not self.params.greedy:
                # a sampled slim verdict is no sample of the drafter's q, so rejection sampling against q
                # could not check it later: sampled blocks of medium confidence go to the full verifier
                return Tier.FULL
        return tier

    def _record(self, records: list[BlockRecord], drafts: list[list[int]], spans: list[int],
                committed: list[int]) -> None:
        """Stats of the blocks one commit decided: each held block, then the block that closed them."""
        offset = 0
        for i, (record, draft) in enumerate(zip(records, drafts)):
            span = len(committed) if i == len(records) - 1 else spans[i]
            part = committed[offset: offset + span]
            record.accepted = _common_prefix(draft, part)  # draft tokens committed at their position
            record.committed = len(part)
            self.stats.record(record)
            offset += span

    def _slim(self, draft: Draft, block_index: int, record: BlockRecord, held: _Held):
        """The tokens the slim verifier (and, where it escalates, the full verifier) commit for ``draft``;
        None when they join ``held`` (deferred_check: greedy only, see ``_route``)."""
        verdict = yield self._verify_call(Tier.SLIM, self.committed + held.tokens, draft.tokens, draft.probs,
                                          block_index, return_probs=not self.params.greedy)
        candidate = verdict.tokens(draft.tokens)  # accepted prefix + slim's recovered or bonus token
        cut = self.policy.escalate_at(verdict.confidence)
        if cut is None and self.policy.deferred_check:
            held.add(candidate, draft, record)
            return None
        if cut is None:
            return _Decided.of(verdict, draft.tokens, Tier.SLIM)
        record.escalated = True
        if self.policy.deferred_check:  # greedy: the full verifier checks the held tokens and the candidate
            block = held.tokens + candidate
            full = yield self._verify_call(Tier.FULL, self.committed, block, None, block_index)
            return _Decided.of(full, block, Tier.FULL)
        head, tail = candidate[:cut], candidate[cut:]
        # The slim verifier's outputs are samples of its own distribution, so that is the proposal.
        tail_probs = verdict.probs[cut:] if verdict.probs is not None else None
        full = yield self._verify_call(Tier.FULL, self.committed + head, tail, tail_probs, block_index)
        slim = _Decided.of(verdict, draft.tokens, Tier.SLIM)
        return _Decided(head, slim.tiers[:cut], slim.logprobs[:cut]) + _Decided.of(full, tail, Tier.FULL)

    def _verify_call(self, tier, committed, block, draft_probs, block_index, return_probs=False) -> VerifyCall:
        return VerifyCall(tier, self.generation_id, committed, list(block), self.params,
                          self._seed("verify", tier.value, block_index),
                          None if self.params.greedy else draft_probs, return_probs, *self._suppress(committed))

    def _suppress(self, committed: list[int]) -> tuple[tuple[int, ...], int]:
        """The stop tokens a call after ``committed`` must not produce, and for how many positions
        (those before ``min_tokens`` output tokens)."""
        rows = self.params.min_tokens - (len(committed) - len(self.prompt_ids))
        return (tuple(sorted(self._stops)), rows) if rows > 0 and self._stops else ((), 0)

    def _seed(self, *salt) -> int:
        return derive_seed(self.seed, *salt)

    def _commit(self, tokens: list[int]) -> list[int]:
        """Append ``tokens``, cut after EOS / a stop token / a stop string, or at ``max_tokens``."""
        taken: list[int] = []
        for token in tokens:
            self.output_ids.append(token)
            taken.append(token)
            if len(self.output_ids) < self.params.min_tokens:
                continue  # (min_tokens <= max_tokens)
            if token in self._stops or self._stop_string_done():
                self.finish_reason = "stop"
            elif len(self.output_ids) >= self.params.max_tokens:
                self.finish_reason = "length"
            if self.finish_reason:
                break
        return taken

    def _stop_string_done(self) -> bool:
        """True when the text now contains a stop string; sets where the text ends."""
        if not self.params.stop:
            return False
        window = max(len(s.encode()) for s in self.params.stop) + 8  # tokens: each carries >= 1 byte of text
        tail = self.decode(self.output_ids[-window:])
        if not any(s in tail for s in self.params.stop):
            return False
        text = self.decode(self.output_ids)
        self.stop_text_end = min((i for s in self.params.stop if (i := text.find(s)) >= 0), default=len(text))
        return True


@dataclass
class _Decided:
    """Tokens a block decided, with the tier that decided each and its logprobs (None where unknown)."""

    tokens: list[int]
    tiers: list[Tier]
    logprobs: list[TokenLogprob | None] | None = None

    def __post_init__(self):
        if self.logprobs is None:
            self.logprobs = [None] * len(self.tokens)

    @classmethod
    def of(cls, verdict: Verdict, block: list[int], tier: Tier) -> _Decided:
        tokens = verdict.tokens(block)
        return cls(tokens, [tier] * len(tokens), verdict.logprobs)

    def __add__(self, other: _Decided) -> _Decided:
        return _Decided(self.tokens + other.tokens, self.tiers + other.tiers, self.logprobs + other.logprobs)


@dataclass
class _Held:
    """Tokens decided without the full verifier (direct blocks; greedy slim verdicts), not yet committed:
    the full verifier checks them with the next block it gets."""

    tokens: list[int] = field(default_factory=list)
    spans: list[int] = field(default_factory=list)  # tokens each held block contributed
    drafts: list[list[int]] = field(default_factory=list)  # each held block's draft
    records: list[BlockRecord] = field(default_factory=list)
    rows: list = field(default_factory=list)  # drafter distributions per block (sampling): Proposal or [k, V]

    def add(self, tokens: list[int], draft: Draft, record: BlockRecord) -> None:
        self.tokens += tokens
        self.spans.append(len(tokens))
        self.drafts.append(list(draft.tokens))
        self.records.append(record)
        if draft.probs is not None:
            self.rows.append(draft.probs)

    def probs(self, draft: Draft) -> torch.Tensor | None:
        """The proposals' distributions, held blocks first: [len(tokens) + len(draft.tokens), V]."""
        if not self.rows:
            return draft.probs
        rows = self.rows + ([draft.probs] if draft.probs is not None else [])
        return Proposal.cat(rows) if isinstance(rows[0], Proposal) else torch.cat(rows)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < len(a) and n < len(b) and a[n] == b[n]:
        n += 1
    return n


def drive(steps: Generator, dispatch: Callable[[DraftCall | VerifyCall], Draft | Verdict]):
    """Run a generation's steps, answering tier calls with ``dispatch``; yields ``Commit`` events."""
    reply = None
    while True:
        try:
            item = steps.send(reply)
        except StopIteration as stop:
            return stop.value
        if isinstance(item, Commit):
            reply = None
            yield item
        else:
            reply = dispatch(item)


__all__ = ["Commit", "Draft", "DraftCall", "Generation", "Mode", "Verdict", "VerifyCall", "drive"]

"""Replaying the block router on teacher-forced traces, to choose thresholds offline.

A ``Trace`` holds, for each position of a reference completion (the full verifier's own
greedy output): the full verifier's token, the drafter's greedy token and its
probability, and the slim verifier's greedy token and its top probability, all computed
teacher-forced on the reference prefix. ``simulate`` runs the greedy VIA-SD policy over
it and counts committed tokens, tokens that differ from the full verifier's, and cost in
units of one autoregressive full-verifier step.

Teacher forcing makes two approximations: after a committed error the real generation
would continue from a different prefix, and a drafter's token after its own mistake is
conditioned on that mistake. Both only touch blocks that already contain an error.

So the replay also estimates free-running fidelity: the first committed error is where a
free generation would leave the full model's, and ``prefix_fraction`` (first error / length,
averaged over traces) estimates the measured identical-prefix fraction. Tokens held for a
deferred check (``RouterPolicy.deferred_check``) are verified by the full verifier with the
next block, so they commit no error; their cost is the drafts rolled back.
"""

from __future__ import annotations

from dataclasses import dataclass

from via_sd_ray.core.policy import RouterPolicy, Tier, block_confidence


@dataclass
class Trace:
    target: list[int]  # full verifier's greedy token at each position
    draft: list[int]  # drafter's greedy token
    draft_prob: list[float]  # drafter's probability of its token
    slim: list[int] | None = None  # slim verifier's greedy token
    slim_prob: list[float] | None = None  # slim verifier's top probability


@dataclass
class Costs:
    """Cost of each call in units of one autoregressive step of the full verifier."""

    draft_token: float
    full_call: float
    slim_call: float = 0.0
    catch_up_token: float = 0.0  # extra cost per committed token a verifier runs in catch-up


@dataclass
class SimResult:
    committed: int = 0
    errors: int = 0  # committed tokens that differ from the full verifier's
    cost: float = 0.0
    blocks: int = 0
    tier_blocks: dict | None = None
    escalations: int = 0
    prefix_fractions: list[float] | None = None  # per trace: first committed error / length (1.0: none)

    @property
    def fidelity(self) -> float:
        return 1.0 - self.errors / self.committed if self.committed else 1.0

    @property
    def prefix_fraction(self) -> float:
        """Estimated free-running identical-prefix fraction (mean over traces)."""
        fr = self.prefix_fractions or []
        return sum(fr) / len(fr) if fr else 1.0

    @property
    def identical_share(self) -> float:
        """Estimated share of generations identical to the full model's."""
        fr = self.prefix_fractions or []
        return sum(f == 1.0 for f in fr) / len(fr) if fr else 1.0

    @property
    def speedup(self) -> float:
        """Predicted speedup over autoregressive decoding with the full verifier."""
        return self.committed / self.cost if self.cost else 0.0

    def add(self, other: SimResult) -> None:
        self.committed += other.committed
        self.errors += other.errors
        self.cost += other.cost
        self.blocks += other.blocks
        self.escalations += other.escalations
        self.prefix_fractions = (self.prefix_fractions or []) + (other.prefix_fractions or [])
        for tier, n in (other.tier_blocks or {}).items():
            self.tier_blocks[tier] = self.tier_blocks.get(tier, 0) + n


def simulate(traces: list[Trace], policy: RouterPolicy, costs: Costs) -> SimResult:
    total = SimResult(tier_blocks={t.value: 0 for t in Tier})
    for trace in traces:
        total.add(_simulate_one(trace, policy, costs))
    return total


def _simulate_one(tr: Trace, policy: RouterPolicy, costs: Costs) -> SimResult:
    res = SimResult(tier_blocks={t.value: 0 for t in Tier})
    n, t = len(tr.target), 0
    uses_drafter = policy.uses_drafter
    seen = {Tier.SLIM: 0, Tier.FULL: 0}  # committed tokens each verifier has in its KV cache
    held: list[int] = []  # tokens held for the full verifier's check (deferred_check), from position t
    direct_run, first_error = 0, None

    def call(tier: Tier, at: int) -> float:
        behind, seen[tier] = max(0, at - seen[tier]), at
        return (costs.full_call if tier is Tier.FULL else costs.slim_call) + behind * costs.catch_up_token

    def commit(tokens: list[int]) -> int:
        nonlocal first_error
        tokens = tokens[: n - t]
        for i, token in enumerate(tokens):
            if token != tr.target[t + i]:
                res.errors += 1
                if first_error is None:
                    first_error = t + i
        res.committed += len(tokens)
        return len(tokens)

    while t < n:
        at = t + len(held)  # where this block starts
        k, probs = 0, []
        if uses_drafter:
            while k < policy.block_size and at + k < n - 1:
                probs.append(tr.draft_prob[at + k])
                k += 1
                if probs[-1] < policy.draft_stop_threshold:
                    break
        res.cost += k * costs.draft_token
        draft = tr.draft[at: at + k]
        tier = policy.route(block_confidence(probs, policy.score), direct_run) if k else Tier.FULL
        direct_run = direct_run + 1 if tier is Tier.DIRECT else 0
        res.blocks += 1
        res.tier_blocks[tier.value] += 1
        if tier is Tier.DIRECT and policy.deferred_check:
            held += draft
            continue
        if tier is Tier.DIRECT:
            t += commit(draft)
            continue
        if tier is Tier.SLIM:
            res.cost += call(Tier.SLIM, at)
            accepted = _matched(tr.draft, tr.slim, at, k)
            candidate = draft[:accepted] + [tr.slim[at + accepted]]
            cut = policy.escalate_at([tr.slim_prob[at + i] for i in range(accepted + 1)])
            if cut is None and policy.deferred_check:
                held += candidate
                continue
            if cut is None:
                t += commit(candidate)
                continue
            res.escalations += 1
            if not policy.deferred_check:
                t += commit(candidate[:cut])
                block = candidate[cut:]
            else:
                block = held + candidate
        else:
            block = held + draft
        res.cost += call(Tier.FULL, t)
        matched = 0
        while matched < len(block) and t + matched < n and block[matched] == tr.target[t + matched]:
            matched += 1
        t += commit(tr.target[t: t + matched + 1])  # the accepted prefix and the full verifier's own token
        held = []
    res.prefix_fractions = [1.0 if first_error is None else first_error / n] if n else []
    return res


def _matched(proposal: list[int], reference: list[int], start: int, k: int) -> int:
    i = 0
    while i < k and proposal[start + i] == reference[start + i]:
        i += 1
    return i

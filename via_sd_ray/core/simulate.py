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

    @property
    def fidelity(self) -> float:
        return 1.0 - self.errors / self.committed if self.committed else 1.0

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

    def call(tier: Tier, at: int) -> float:
        behind, seen[tier] = max(0, at - seen[tier]), at
        return (costs.full_call if tier is Tier.FULL else costs.slim_call) + behind * costs.catch_up_token

    while t < n:
        k, probs = 0, []
        if uses_drafter:
            while k < policy.block_size and t + k < n - 1:
                probs.append(tr.draft_prob[t + k])
                k += 1
                if probs[-1] < policy.draft_stop_threshold:
                    break
        res.cost += k * costs.draft_token
        tier = policy.route(block_confidence(probs, policy.score)) if k else Tier.FULL
        res.blocks += 1
        res.tier_blocks[tier.value] += 1
        if tier is Tier.DIRECT:
            res.errors += sum(tr.draft[t + i] != tr.target[t + i] for i in range(k))
            step = k
        elif tier is Tier.FULL:
            res.cost += call(Tier.FULL, t)
            step = _matched(tr.draft, tr.target, t, k) + 1
        else:
            res.cost += call(Tier.SLIM, t)
            accepted = _matched(tr.draft, tr.slim, t, k)
            candidate = [tr.draft[t + i] for i in range(accepted)] + [tr.slim[t + accepted]]
            cut = policy.escalate_at([tr.slim_prob[t + i] for i in range(accepted + 1)])
            head = len(candidate) if cut is None else cut
            res.errors += sum(candidate[i] != tr.target[t + i] for i in range(head))
            step = head
            if cut is not None:
                res.escalations += 1
                res.cost += call(Tier.FULL, t + cut)
                tail = candidate[cut:]
                matched = 0
                while matched < len(tail) and tail[matched] == tr.target[t + cut + matched]:
                    matched += 1
                step += matched + 1
        step = min(step, n - t)
        res.committed += step
        t += step
    return res


def _matched(proposal: list[int], reference: list[int], start: int, k: int) -> int:
    i = 0
    while i < k and proposal[start + i] == reference[start + i]:
        i += 1
    return i

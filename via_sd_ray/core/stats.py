"""Per-block records and their aggregate over a generation (and over many)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class BlockRecord:
    """What happened to one block."""

    tier: object  # core.policy.Tier
    proposed: int  # draft tokens in the block
    confidence: float  # the block's confidence
    accepted: int = 0  # draft tokens committed at their own position
    committed: int = 0  # tokens the block committed (accepted + recovered / bonus, cut at stops)
    escalated: bool = False  # the slim verifier handed (part of) the block to the full verifier


@dataclass
class GenerationStats:
    """Counters over the blocks of one or more generations."""

    blocks: int = 0
    proposed: int = 0
    accepted: int = 0
    committed: int = 0
    escalations: int = 0
    tier_blocks: dict[str, int] = field(default_factory=lambda: {"direct": 0, "slim": 0, "full": 0})
    tier_tokens: dict[str, int] = field(default_factory=lambda: {"direct": 0, "slim": 0, "full": 0})
    position_proposed: list[int] = field(default_factory=list)  # [pos] blocks with a draft token at pos
    position_accepted: list[int] = field(default_factory=list)  # [pos] ... whose token at pos was accepted
    records: list[BlockRecord] = field(default_factory=list)
    keep_records: bool = True

    def record(self, block: BlockRecord) -> None:
        tier = getattr(block.tier, "value", block.tier)
        self.blocks += 1
        self.proposed += block.proposed
        self.accepted += block.accepted
        self.committed += block.committed
        self.escalations += int(block.escalated)
        self.tier_blocks[tier] += 1
        self.tier_tokens[tier] += block.committed
        while len(self.position_proposed) < block.proposed:
            self.position_proposed.append(0)
            self.position_accepted.append(0)
        for pos in range(block.proposed):
            self.position_proposed[pos] += 1
            self.position_accepted[pos] += int(pos < block.accepted)
        if self.keep_records:
            self.records.append(block)

    def merge(self, other: GenerationStats) -> None:
        for block in other.records:
            self.record(block)

    @property
    def acceptance_rate(self) -> float:
        """Draft tokens committed at their own position / draft tokens proposed."""
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def mean_accepted(self) -> float:
        """Draft tokens accepted per block that had a draft."""
        drafted = sum(1 for r in self.records if r.proposed) if self.keep_records else self.blocks
        return self.accepted / drafted if drafted else 0.0

    @property
    def tokens_per_block(self) -> float:
        return self.committed / self.blocks if self.blocks else 0.0

    def tier_fractions(self) -> dict[str, float]:
        return {t: (n / self.blocks if self.blocks else 0.0) for t, n in self.tier_blocks.items()}

    def to_dict(self) -> dict:
        return {
            "blocks": self.blocks,
            "proposed": self.proposed,
            "accepted": self.accepted,
            "committed": self.committed,
            "escalations": self.escalations,
            "acceptance_rate": self.acceptance_rate,
            "mean_accepted": self.mean_accepted,
            "tokens_per_block": self.tokens_per_block,
            "tier_blocks": dict(self.tier_blocks),
            "tier_tokens": dict(self.tier_tokens),
            "tier_fractions": self.tier_fractions(),
            "acceptance_per_position": [
                a / p if p else 0.0 for a, p in zip(self.position_accepted, self.position_proposed)
            ],
        }


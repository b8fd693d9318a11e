"""The VIA-SD routing policy: which tier decides a drafted block.

A block's confidence is a score of the drafter's probabilities of its own tokens
(``block_confidence``). The router compares it with two thresholds:

    confidence >= direct_threshold  -> direct: committed without any verifier
    confidence >= slim_threshold    -> slim verifier (which escalates where it is unsure)
    otherwise                       -> full verifier

The slim verifier escalates from the first position where its own top probability is
below ``escalate_threshold``. In the lossless setting every block ends at the full
verifier: high-confidence blocks go straight to it, and the slim tier only improves
medium blocks before the full verifier checks them.

With ``deferred_check``, a direct block (or, greedy, a slim verdict that does not
escalate) is not committed at once: it is held, the drafter drafts on after it, and the
full verifier checks the held tokens together with the next block that goes to it (it
would run them anyway, as catch-up). The first disagreement rolls the held tokens back.
Greedy output then equals the full model's, and sampled output follows its distribution
(each held token meets rejection sampling against the full model like any draft; sampled
medium blocks go to the full verifier); the cost is a block or so of streaming delay and
the drafts rolled back. ``max_direct_run`` limits consecutive direct blocks (and so the tokens held).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

from via_sd_ray.errors import ConfigError


class Mode(str, Enum):
    AR = "ar"  # full verifier alone
    SD = "sd"  # drafter + full verifier
    VIA_SD = "via-sd"  # drafter + slim verifier + full verifier


class Tier(str, Enum):
    DIRECT = "direct"
    SLIM = "slim"
    FULL = "full"


SCORES = ("min", "prod", "mean", "geomean")


def block_confidence(token_probs: list[float], score: str = "min") -> float:
    """Confidence of a block from the drafter's probability of each of its tokens."""
    if not token_probs:
        return 0.0
    if score == "min":
        return min(token_probs)
    if score == "prod":
        return math.prod(token_probs)
    if score == "mean":
        return sum(token_probs) / len(token_probs)
    if score == "geomean":
        return math.prod(token_probs) ** (1.0 / len(token_probs))
    raise ConfigError(f"router.score: expected one of {SCORES}, received {score!r}")


def load_block_cap(active: int, verify_token_budget: int | None, min_block: int = 2) -> int | None:
    """The most draft tokens a block may carry while ``active`` generations share the verifier.

    A batched verify pass costs about the same up to some number of tokens, then grows with
    them (compute bound). Spreading a budget of ``verify_token_budget`` tokens per pass over
    the active generations (each verifies its block plus one) keeps the batch inside it; a
    block shorter than ``min_block`` does not pay for its drafting, so the generation then
    decodes token by token (0: no draft). ``None``: no cap (no budget set).
    """
    if not verify_token_budget:
        return None
    cap = verify_token_budget // max(active, 1) - 1
    return cap if cap >= min_block else 0


@dataclass(frozen=True)
class RouterPolicy:
    """Thresholds and block shape of the block router. Immutable: adaptive state lives elsewhere."""

    mode: Mode = Mode.VIA_SD
    block_size: int = 4
    direct_threshold: float = 0.95
    slim_threshold: float = 0.5
    escalate_threshold: float = 0.8
    lossless: bool = False
    score: str = "min"
    draft_stop_threshold: float = 0.0
    deferred_check: bool = False
    max_direct_run: int = 0  # most consecutive direct blocks before one goes to a verifier; 0: no limit

    def __post_init__(self):
        try:
            object.__setattr__(self, "mode", Mode(self.mode))
        except ValueError:
            raise ConfigError(
                f"router.mode: expected one of {tuple(m.value for m in Mode)}, received {self.mode!r}") from None
        if not 1 <= self.block_size <= 64:
            raise ConfigError(f"router.block_size: expected an int in [1, 64], received {self.block_size!r}")
        for name in ("direct_threshold", "slim_threshold", "escalate_threshold", "draft_stop_threshold"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"router.{name}: expected a number in [0, 1], received {value!r}")
        if self.slim_threshold > self.direct_threshold:
            raise ConfigError(
                "router.slim_threshold: expected a value <= direct_threshold (thresholds in order), received "
                f"slim_threshold={self.slim_threshold}, direct_threshold={self.direct_threshold}"
            )
        if self.score not in SCORES:
            raise ConfigError(f"router.score: expected one of {SCORES}, received {self.score!r}")
        if not 0 <= self.max_direct_run <= 1024:
            raise ConfigError(f"router.max_direct_run: expected an int in [0, 1024], received {self.max_direct_run!r}")

    @property
    def uses_drafter(self) -> bool:
        return self.mode is not Mode.AR

    def route(self, confidence: float, direct_run: int = 0) -> Tier:
        """The tier that decides a block of the given confidence, after ``direct_run`` direct blocks in a row."""
        if self.mode is not Mode.VIA_SD:
            return Tier.FULL
        if confidence >= self.direct_threshold:
            if self.lossless or (self.max_direct_run and direct_run >= self.max_direct_run):
                return Tier.FULL
            return Tier.DIRECT
        if confidence >= self.slim_threshold:
            return Tier.SLIM
        return Tier.FULL

    def escalate_at(self, slim_confidence: list[float]) -> int | None:
        """First candidate position the slim verifier is unsure of (always 0 when lossless), or None."""
        if self.lossless:
            return 0
        for pos, conf in enumerate(slim_confidence):
            if conf < self.escalate_threshold:
                return pos
        return None

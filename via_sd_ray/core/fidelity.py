"""Free-running fidelity: how close a mode's own generations stay to the full model's.

Each prompt is generated twice, free: once by the full model alone (``ar``, the reference)
and once by the mode under test. One wrong committed token changes the rest of an answer, so
what counts is where the two first part:

- ``first_divergence``: the index of the first token where the two differ (``None``: identical);
- ``prefix_fraction``: first divergence / length (1.0 for identical generations);
- over many prompts, ``FreeRunning`` reports the share of identical generations, the mean
  prefix fraction and the mean position of the first divergence among those that diverge.

Teacher-forced agreement (the mode's tokens scored by the full model on the mode's own prefix)
stays a secondary figure: it forgives every token after a divergence that the full model
would have continued the same way, and so hides drift.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field


def first_divergence(reference: Sequence[int], output: Sequence[int]) -> int | None:
    """Index of the first position where ``output`` differs from ``reference`` (a missing or extra token
    counts as a difference), or ``None`` when they are identical."""
    n = min(len(reference), len(output))
    for i in range(n):
        if reference[i] != output[i]:
            return i
    return None if len(reference) == len(output) else n


def prefix_fraction(reference: Sequence[int], output: Sequence[int]) -> float:
    """First divergence / length of the longer of the two; 1.0 when identical (also when both are empty)."""
    at = first_divergence(reference, output)
    return 1.0 if at is None else at / max(len(reference), len(output))


@dataclass
class FreeRunning:
    """Free-running fidelity of one mode against the reference over many prompts."""

    divergences: list[int | None] = field(default_factory=list)  # per prompt: first divergence, None: identical
    fractions: list[float] = field(default_factory=list)  # per prompt: identical-prefix fraction

    @classmethod
    def of(cls, references: Sequence[Sequence[int]], outputs: Sequence[Sequence[int]]) -> FreeRunning:
        if len(references) != len(outputs):
            raise ValueError(f"expected one output per reference, received {len(outputs)} for {len(references)}")
        result = cls()
        for ref, out in zip(references, outputs):
            result.divergences.append(first_divergence(ref, out))
            result.fractions.append(prefix_fraction(ref, out))
        return result

    @property
    def identical_share(self) -> float | None:
        """Share of generations token-identical to the reference."""
        return sum(d is None for d in self.divergences) / len(self.divergences) if self.divergences else None

    @property
    def prefix_fraction(self) -> float | None:
        """Mean identical-prefix fraction."""
        return sum(self.fractions) / len(self.fractions) if self.fractions else None

    @property
    def mean_first_divergence(self) -> float | None:
        """Mean position (token index) of the first divergence among the generations that diverge."""
        diverged = [d for d in self.divergences if d is not None]
        return sum(diverged) / len(diverged) if diverged else None

    def to_dict(self) -> dict:
        return {
            "identical_share": self.identical_share,
            "prefix_fraction": self.prefix_fraction,
            "mean_first_divergence": self.mean_first_divergence,
            "diverged": sum(d is not None for d in self.divergences),
            "generations": len(self.divergences),
            "first_divergence": list(self.divergences),
        }

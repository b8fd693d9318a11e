"""Comparing sampled counts with an exact distribution, for the statistical tests."""

from __future__ import annotations

import math

import torch


def empirical(samples: list[int], cells: int) -> torch.Tensor:
    """Frequencies [cells] of ``samples`` (ints in [0, cells))."""
    counts = torch.bincount(torch.tensor(samples, dtype=torch.long), minlength=cells)
    return counts.double() / len(samples)


def tv_distance(p: torch.Tensor, q: torch.Tensor) -> float:
    """Total variation distance between two distributions over the same cells."""
    return 0.5 * float((p.double() - q.double()).abs().sum())


def tv_bound(cells: int, n: int) -> float:
    """A bound the empirical TV of ``n`` exact samples stays under: three times
    E[TV] <= sqrt(cells / n) / 2 (Cauchy-Schwarz over the cells)."""
    return 1.5 * math.sqrt(cells / n)

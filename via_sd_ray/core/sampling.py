"""Sampling parameters and the logits -> probabilities warp shared by every tier.

Drafter and verifiers warp with the same parameters, so rejection sampling compares
like with like (vLLM and transformers do the same).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from via_sd_ray.errors import InvalidRequest, check_range


@dataclass(frozen=True)
class SamplingParams:
    """How one generation picks tokens and when it stops."""

    max_tokens: int = 128
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 means no top-k cut
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self):
        check_range("max_tokens", self.max_tokens, 1, kind=int)
        check_range("temperature", self.temperature, 0.0)
        check_range("top_p", self.top_p, 0.0, 1.0, low_open=True)
        check_range("top_k", self.top_k, 0, kind=int)
        if self.seed is not None:
            check_range("seed", self.seed, 0, 2**63 - 1, kind=int)
        if isinstance(self.stop, str) or not all(isinstance(s, str) and s for s in self.stop):
            raise InvalidRequest(f"stop: expected a list of non-empty strings, received {self.stop!r}")
        if not all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids):
            raise InvalidRequest(f"stop_token_ids: expected non-negative ints, received {self.stop_token_ids!r}")
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def warp(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, top-k and top-p applied to ``logits`` [N, V]; returns float32 probabilities [N, V].

    Greedy parameters give the plain softmax (used as a confidence, never sampled from).
    """
    logits = logits.float()
    if params.greedy:
        return torch.softmax(logits, dim=-1)
    logits = logits / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]  # [N, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        sorted_probs = torch.softmax(sorted_logits, dim=-1)
        before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # mass strictly above each token
        sorted_logits = sorted_logits.masked_fill(before >= params.top_p, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return torch.softmax(logits, dim=-1)


def derive_seed(seed: int, *salt: object) -> int:
    """A seed derived from ``seed`` and ``salt``: the same inputs give the same draws in any
    process, so a seeded generation does not depend on which replica serves a call."""
    digest = hashlib.blake2b(repr((seed, *salt)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def sample(probs: torch.Tensor, gen: torch.Generator) -> int:
    """One draw from ``probs`` [V]."""
    return int(torch.multinomial(probs, 1, generator=gen))

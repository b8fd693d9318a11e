"""Sampling parameters and the logits -> probabilities warp shared by every tier.

Drafter and verifiers warp with the same parameters, so rejection sampling compares
like with like (vLLM and transformers do the same).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from via_sd_ray.errors import InvalidRequest, check_range

MAX_LOGPROBS = 20  # top alternatives per token, as OpenAI's top_logprobs


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
    min_tokens: int = 0  # no EOS, stop token or stop string before this many output tokens
    logprobs: int | None = None  # report each token's log-probability and this many top alternatives

    def __post_init__(self):
        check_range("max_tokens", self.max_tokens, 1, kind=int)
        check_range("min_tokens", self.min_tokens, 0, self.max_tokens, kind=int)
        if self.logprobs is not None:
            check_range("logprobs", self.logprobs, 0, MAX_LOGPROBS, kind=int)
        check_range("temperature", self.temperature, 0.0)
        check_range("top_p", self.top_p, 0.0, 1.0, low_open=True)
        check_range("top_k", self.top_k, 0, kind=int)
        if self.seed is not None:  # any 64-bit int, as OpenAI and vLLM take
            check_range("seed", self.seed, -(2**63), 2**64 - 1, kind=int)
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


def suppress(logits: torch.Tensor, token_ids: tuple[int, ...], rows: int) -> torch.Tensor:
    """``logits`` [N, V] with ``token_ids`` made impossible in the first ``rows`` rows (min_tokens)."""
    if rows <= 0 or not token_ids:
        return logits
    logits = logits.clone()
    logits[:rows, list(token_ids)] = float("-inf")
    return logits


@dataclass(frozen=True)
class TokenLogprob:
    """A token's log-probability under the model that decided it, and the ``top`` most likely
    alternatives at its position (token id, log-probability), most likely first."""

    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def token_logprobs(logits: torch.Tensor, tokens: list[int], top: int) -> list[TokenLogprob]:
    """Log-softmax of the raw ``logits`` [N, V] at ``tokens`` (one per row), with ``top`` alternatives."""
    if not tokens:
        return []
    logp = torch.log_softmax(logits[: len(tokens)].float(), dim=-1)  # [N, V]
    chosen = logp[torch.arange(len(tokens)), torch.tensor(tokens, dtype=torch.long)].tolist()
    if top == 0:
        return [TokenLogprob(lp) for lp in chosen]
    values, ids = torch.topk(logp, top, dim=-1)  # [N, top]
    return [TokenLogprob(lp, tuple(zip(i, v))) for lp, i, v in zip(chosen, ids.tolist(), values.tolist())]


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

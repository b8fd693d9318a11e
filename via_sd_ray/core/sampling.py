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


def as_float32(x: torch.Tensor) -> torch.Tensor:
    """``x`` as float32 (itself where it is: a tier call's hot path skips the no-op conversion's dispatch)."""
    return x if x.dtype == torch.float32 else x.float()


def to_device(x: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``x`` on ``device`` (itself where it is, without a dispatch)."""
    return x if x.device == torch.device(device) else x.to(device)


def warp(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, top-k and top-p applied to ``logits`` [N, V]; returns float32 probabilities [N, V].

    Greedy parameters give the plain softmax (used as a confidence, never sampled from).
    """
    logits = as_float32(logits)
    if params.greedy:
        return torch.softmax(logits, dim=-1)
    if params.temperature != 1.0:
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
    rows = torch.arange(len(tokens), device=logp.device)
    chosen = logp[rows, torch.tensor(tokens, dtype=torch.long, device=logp.device)].tolist()
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


def uniforms(gen: torch.Generator, n: int, device: torch.device | str) -> torch.Tensor:
    """``n`` uniform draws in [0, 1) [n] from the seeded host generator, on ``device``: the same draws on
    every device, so a seeded generation gives the same tokens whichever replica runs a call."""
    return to_device(torch.rand(n, generator=gen, device="cpu", dtype=torch.float64), device)


def exponentials(gen: torch.Generator, shape: tuple[int, ...], device: torch.device | str) -> torch.Tensor:
    """Exp(1) draws of ``shape`` from the seeded host generator, as float32 on ``device`` (the same draws on every
    device). Drawn in float64 and kept above 0, so no race divides by 0."""
    draws = torch.empty(shape, dtype=torch.float64, device="cpu").exponential_(generator=gen).clamp_min_(1e-30)
    return draws.to(device=device, dtype=torch.float32)


def race(probs: torch.Tensor, exp: torch.Tensor) -> torch.Tensor:
    """One index [N, 1] per row of ``probs`` [N, W] (weights >= 0), the row's ``argmax(probs / exp)`` for Exp(1)
    draws ``exp`` [N, W] or [W]: index i wins with probability probs_i / sum(probs) (an exponential race, as the
    Gumbel-max trick). Two kernels on the device, no cumulative sum or search."""
    return (probs / exp).argmax(dim=-1, keepdim=True)


def draw(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One token per row of ``probs`` [N, V] (unnormalised weights, >= 0) by inverse CDF at ``u`` [N]:
    the index [N] whose cumulative weight first exceeds ``u`` times the row's total. Runs where ``probs``
    lies, without a host round trip."""
    cdf = torch.cumsum(probs.double(), dim=-1)  # [N, V]
    target = u.to(torch.float64)[:, None] * cdf[:, -1:]  # [N, 1]
    return torch.searchsorted(cdf, target, right=True).view(-1).clamp_max_(probs.shape[-1] - 1)


@dataclass
class Proposal:
    """A sparse proposal distribution per position: token ``ids`` [N, k] and their ``probs`` [N, k]
    (summing to 1 per row); every other token has probability 0. A drafter samples its block from
    these rows, so rejection sampling against them is exact, and they travel as 2·N·k numbers
    instead of N·V."""

    ids: torch.Tensor  # [N, k] long
    probs: torch.Tensor  # [N, k] float32

    def __len__(self) -> int:
        return self.ids.shape[0]

    def __getitem__(self, rows: slice) -> Proposal:
        return Proposal(self.ids[rows], self.probs[rows])

    def to(self, device: torch.device | str) -> Proposal:
        if self.ids.device == torch.device(device):
            return self
        return Proposal(self.ids.to(device), self.probs.to(device))

    def dense(self, vocab: int) -> torch.Tensor:
        """The rows as full distributions [N, V] (on the proposal's device)."""
        out = torch.zeros((len(self), vocab), dtype=torch.float32, device=self.ids.device)
        return out.scatter_(-1, self.ids, as_float32(self.probs))

    @staticmethod
    def cat(parts: list[Proposal]) -> Proposal:
        width = max(p.ids.shape[1] for p in parts)
        if all(p.ids.shape[1] == width for p in parts):  # a drafter's rows: all of one width
            return Proposal(torch.cat([p.ids for p in parts]), torch.cat([p.probs for p in parts]))
        ids = [torch.nn.functional.pad(p.ids, (0, width - p.ids.shape[1])) for p in parts]
        probs = [torch.nn.functional.pad(p.probs, (0, width - p.probs.shape[1])) for p in parts]
        return Proposal(torch.cat(ids), torch.cat(probs))


def top_k_proposal(probs: torch.Tensor, k: int) -> Proposal:
    """The renormalised ``k`` most likely tokens of each row of ``probs`` [N, V] (k <= 0: all of them)."""
    k = probs.shape[-1] if k <= 0 else min(k, probs.shape[-1])
    values, ids = torch.topk(probs, k, dim=-1)  # [N, k], most likely first
    return Proposal(ids, values / values.sum(-1, keepdim=True))


def sampled_proposal(logits: torch.Tensor, params: SamplingParams, k: int) -> Proposal:
    """``top_k_proposal(warp(logits, params), k)`` for sampling ``params`` and raw ``logits`` [N, V]. With a
    temperature alone (or a top-k cut no narrower than ``k``), that is the softmax of the ``k`` largest
    logits over the temperature: the same numbers up to rounding, without the whole row's softmax (a
    drafter's per-token work: 3 kernels instead of 7)."""
    vocab = logits.shape[-1]
    if k <= 0 or params.top_p < 1.0 or (params.top_k and params.top_k < min(k, vocab)):
        return top_k_proposal(warp(logits, params), k)
    values, ids = torch.topk(logits, min(k, vocab), dim=-1)  # [N, k], most likely first
    values = as_float32(values)
    return Proposal(ids, torch.softmax(values if params.temperature == 1.0 else values / params.temperature, dim=-1))


def as_dense(q: torch.Tensor | Proposal | None, vocab: int, device) -> torch.Tensor | None:
    """A proposal (dense [K, V], sparse ``Proposal`` or None) as dense rows [K, V] on ``device``."""
    if q is None:
        return None
    if isinstance(q, Proposal):
        return q.to(device).dense(vocab)
    q = q.to(device=device, dtype=torch.float32)
    # a drafter whose head is narrower than the verifier's (padded) vocabulary never proposes the rest
    return torch.nn.functional.pad(q, (0, vocab - q.shape[-1])) if q.shape[-1] < vocab else q

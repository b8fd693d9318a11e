"""Verification of a block by a verifier tier: greedy matching or rejection sampling.

Given a block d[0..K) and the verifier's logits at the K+1 positions that predict
d[0], ..., d[K-1] and the token after the block:

- greedy: d[i] is accepted while it equals the verifier's argmax; the first mismatch is
  replaced by the argmax (the recovered token); a fully accepted block earns the argmax
  of the last position (the bonus token).
- sampled (Leviathan et al. 2023, Chen et al. 2023): d[i] ~ q[i] is accepted with
  probability min(1, p[i](d[i]) / q[i](d[i])); the first rejection is recovered from the
  normalised residual max(0, p[i] - q[i]); a fully accepted block samples the bonus from
  p[K]. Each committed token is then distributed exactly as p. A drafter without
  probabilities (prompt lookup) proposes with a one-hot q.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from via_sd_ray.core.sampling import SamplingParams, TokenLogprob, sample, suppress, token_logprobs, warp


@dataclass
class Verdict:
    """What a verifier decided about one block."""

    accepted: int  # length of the accepted prefix of the block
    next_token: int  # recovered token (accepted < K) or bonus token (accepted == K)
    confidence: list[float]  # verifier's top probability at positions 0..accepted
    probs: torch.Tensor | None = None  # [accepted + 1, V] verifier probabilities there, when asked for
    logprobs: list[TokenLogprob] | None = None  # of the committed tokens (params.logprobs set)

    def tokens(self, block: list[int]) -> list[int]:
        """The tokens this verdict commits: the accepted prefix and the recovered or bonus token."""
        return list(block[: self.accepted]) + [self.next_token]


def verify(
    block: list[int],
    logits: torch.Tensor,  # [K + 1, V]
    params: SamplingParams,
    draft_probs: torch.Tensor | None = None,  # [K, V]; None: one-hot on the block
    gen: torch.Generator | None = None,
    return_probs: bool = False,
    suppress_ids: tuple[int, ...] = (),
    suppress_rows: int = 0,
) -> Verdict:
    """``suppress_ids`` are impossible in the first ``suppress_rows`` positions (min_tokens); logprobs
    are of the raw logits, as OpenAI's and vLLM's."""
    k = len(block)
    assert logits.shape[0] == k + 1, (logits.shape, k)
    raw, logits = logits, suppress(logits, suppress_ids, suppress_rows)
    probs = warp(logits, params)  # [K + 1, V]
    if params.greedy:
        accepted, next_token = _greedy(block, logits)
    else:
        assert gen is not None, "sampled verification needs a generator"
        accepted, next_token = _rejection_sample(block, probs, draft_probs, gen)
    kept = probs[: accepted + 1]  # [accepted + 1, V]
    return Verdict(
        accepted=accepted,
        next_token=next_token,
        confidence=kept.max(dim=-1).values.tolist(),
        probs=kept if return_probs else None,
        logprobs=None if params.logprobs is None else token_logprobs(
            raw, list(block[:accepted]) + [next_token], params.logprobs),
    )


def _greedy(block: list[int], logits: torch.Tensor) -> tuple[int, int]:
    choice = logits.argmax(dim=-1).tolist()  # [K + 1]
    accepted = 0
    while accepted < len(block) and block[accepted] == choice[accepted]:
        accepted += 1
    return accepted, choice[accepted]


def _rejection_sample(
    block: list[int], p: torch.Tensor, q: torch.Tensor | None, gen: torch.Generator
) -> tuple[int, int]:
    k = len(block)
    uniform = torch.rand(k, generator=gen).tolist()  # always k draws: the stream of draws is fixed
    idx = torch.arange(k)
    ids = torch.tensor(block, dtype=torch.long)
    p_tok = p[idx, ids].tolist() if k else []
    q_tok = q[idx, ids].tolist() if (k and q is not None) else [1.0] * k
    for i in range(k):
        if uniform[i] * q_tok[i] < p_tok[i]:
            continue
        if q is None:
            residual = p[i].clone()
            residual[block[i]] = 0.0
        else:
            residual = (p[i] - q[i]).clamp_min(0.0)
        if float(residual.sum()) <= 0.0:  # p == q up to rounding: nothing to correct towards
            residual = p[i]
        return i, sample(residual / residual.sum(), gen)
    return k, sample(p[k], gen)

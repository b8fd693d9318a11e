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
  probabilities (prompt lookup) proposes with a one-hot q; a sampling drafter ships its q as a
  sparse ``Proposal`` (the top-k rows it drew from), which is exact for the same reason.

Everything runs where the logits lie (``verify_on_device``); a verdict is read back in one host
transfer of a few numbers per block (``read_verdict``), which a batched tier call concatenates
over its rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from via_sd_ray.core.sampling import (
    Proposal,
    SamplingParams,
    TokenLogprob,
    as_dense,
    draw,
    suppress,
    token_logprobs,
    top_k_proposal,
    uniforms,
    warp,
)


@dataclass
class Verdict:
    """What a verifier decided about one block."""

    accepted: int  # length of the accepted prefix of the block
    next_token: int  # recovered token (accepted < K) or bonus token (accepted == K)
    confidence: list[float]  # verifier's top probability at positions 0..accepted
    probs: Proposal | None = None  # verifier distributions at positions 0..accepted, when asked for
    logprobs: list[TokenLogprob] | None = None  # of the committed tokens (params.logprobs set)

    def tokens(self, block: list[int]) -> list[int]:
        """The tokens this verdict commits: the accepted prefix and the recovered or bonus token."""
        return list(block[: self.accepted]) + [self.next_token]


def verify(
    block: list[int],
    logits: torch.Tensor,  # [K + 1, V]
    params: SamplingParams,
    draft_probs: torch.Tensor | Proposal | None = None,  # [K, V] or sparse; None: one-hot on the block
    gen: torch.Generator | None = None,
    return_probs: bool = False,
    suppress_ids: tuple[int, ...] = (),
    suppress_rows: int = 0,
    proposal_top_k: int = 0,
) -> Verdict:
    """``verify_on_device`` and ``read_verdict`` for one block. ``suppress_ids`` are impossible in the first
    ``suppress_rows`` positions (min_tokens); logprobs are of the raw logits, as OpenAI's and vLLM's."""
    packed, proposal = verify_on_device(block, logits, params, draft_probs, gen, return_probs, suppress_ids,
                                        suppress_rows, proposal_top_k)
    return read_verdict(block, packed.tolist(), params, proposal, logits)


def verify_on_device(
    block: list[int],
    logits: torch.Tensor,  # [K + 1, V]
    params: SamplingParams,
    draft_probs: torch.Tensor | Proposal | None = None,
    gen: torch.Generator | None = None,
    return_probs: bool = False,
    suppress_ids: tuple[int, ...] = (),
    suppress_rows: int = 0,
    proposal_top_k: int = 0,
) -> tuple[torch.Tensor, Proposal | None]:
    """The verdict as a flat float64 tensor on the logits' device, [accepted, next_token, confidence 0..K],
    and (``return_probs``) the verifier's distributions at every position as a proposal on that device.

    ``return_probs`` with ``proposal_top_k`` > 0 makes the target the renormalised top-k of the warped
    distribution (the slim tier's, when its verdict goes on to the full verifier as a proposal): its
    committed tokens are then exact samples of the distribution it ships."""
    k, device = len(block), logits.device
    assert logits.shape[0] == k + 1, (logits.shape, k)
    logits = suppress(logits, suppress_ids, suppress_rows)
    probs = warp(logits, params)  # [K + 1, V]
    proposal = None
    if return_probs:
        proposal = top_k_proposal(probs, proposal_top_k)
        if proposal_top_k > 0 and not params.greedy:
            probs = proposal.dense(probs.shape[-1])
    ids = torch.tensor(block, dtype=torch.long, device=device)  # [K]
    if params.greedy:
        choice = logits.argmax(dim=-1)  # [K + 1]
        accepted = (choice[:k] == ids).cumprod(0).sum()
        next_token = choice[accepted]
    else:
        assert gen is not None, "sampled verification needs a generator"
        accepted, next_token = _rejection_sample(ids, probs, as_dense(draft_probs, probs.shape[-1], device), gen)
    header = torch.stack([accepted, next_token]).double()
    return torch.cat([header, probs.max(dim=-1).values.double()]), proposal


def read_verdict(block: list[int], packed: list[float], params: SamplingParams, proposal: Proposal | None = None,
                 raw_logits: torch.Tensor | None = None) -> Verdict:
    """The verdict of ``verify_on_device`` from its packed numbers, read back on the host. ``proposal``:
    its distributions, already on the host; ``raw_logits``: for logprobs (their own transfer, only when
    ``params.logprobs`` asks for them)."""
    accepted, next_token = int(packed[0]), int(packed[1])
    return Verdict(
        accepted=accepted,
        next_token=next_token,
        confidence=list(packed[2 : 3 + accepted]),
        probs=None if proposal is None else proposal[: accepted + 1],
        logprobs=None if params.logprobs is None else token_logprobs(
            raw_logits, list(block[:accepted]) + [next_token], params.logprobs),
    )


def _rejection_sample(
    ids: torch.Tensor, p: torch.Tensor, q: torch.Tensor | None, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Accepted length and next token (0-dim tensors on p's device) of the block ``ids`` [K] drawn from
    ``q`` [K, V] (None: one-hot), against the target ``p`` [K + 1, V]. Always 2K + 1 draws from ``gen``:
    one uniform per block token, one per position for its recovered (or, at K, bonus) token."""
    k, device = ids.shape[0], p.device
    u_accept, u_token = uniforms(gen, k, device), uniforms(gen, k + 1, device)
    rows = torch.arange(k, device=device)
    p_tok = p[rows, ids]  # [K]
    if q is None:
        q_tok = torch.ones_like(p_tok)
        residual = p[:k].scatter(-1, ids[:, None], 0.0)  # [K, V]: the rejected token's mass removed
    else:
        q_tok = q[rows, ids]
        residual = (p[:k] - q).clamp_min(0.0)
    # p == q up to rounding leaves nothing to correct towards: recover from p itself
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p[:k])
    accepted = (u_accept * q_tok < p_tok).cumprod(0).sum()
    candidates = draw(torch.cat([residual, p[k:]]), u_token)  # [K + 1]: each position's recovered / bonus token
    return accepted, candidates[accepted]

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

The work over the vocabulary runs where the logits lie (``verify_on_device``: argmaxes, or the
residual draws and the block tokens' probabilities); those few numbers per block are read back in
one host transfer, which a batched tier call concatenates over its rows, and the accepted length is
decided from them on the host (``read_verdict``), where the acceptance draws already are.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from via_sd_ray.core.sampling import (
    Proposal,
    SamplingParams,
    TokenLogprob,
    as_dense,
    as_float32,
    draw,
    suppress,
    to_device,
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


@dataclass
class OnDevice:
    """A verdict as far as it is decided where the logits lie: ``parts``, device tensors read back in the tier
    call's one transfer (as float32, which holds token ids below 2**24 exactly), and what stays on the host:
    the sampled acceptance draws, compared with the read-back probabilities there (a few numbers, so the
    device runs no accept/reject bookkeeping), and the verifier's distributions when asked for."""

    parts: list[torch.Tensor]
    proposal: Proposal | None = None
    u_accept: list[float] | None = None  # sampled: one uniform per block token

    @property
    def size(self) -> int:
        """How many numbers ``parts`` hold (their shapes are known without waiting for the device)."""
        return sum(part.numel() for part in self.parts)


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
    on_device = verify_on_device(block, logits, params, draft_probs, gen, return_probs, suppress_ids,
                                 suppress_rows, proposal_top_k)
    values = torch.cat([as_float32(part) for part in on_device.parts]).tolist()
    proposal = None if on_device.proposal is None else on_device.proposal.to("cpu")
    return read_verdict(block, values, params, on_device, proposal, logits)


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
    draws=None,
) -> OnDevice:
    """The verdict's device work: greedy, each position's argmax and confidence ([K + 1] each); sampled, each
    position's recovered (or, at K, bonus) token drawn from the residual, the confidences, and the target's and
    the proposal's probability of each block token ([K] each; the last left out for a one-hot proposal).
    ``read_verdict`` decides the accepted length from them on the host. ``return_probs``: the verifier's
    distributions at every position as a proposal on the device.

    ``return_probs`` with ``proposal_top_k`` > 0 makes the target the renormalised top-k of the warped
    distribution (the slim tier's, when its verdict goes on to the full verifier as a proposal): its
    committed tokens are then exact samples of the distribution it ships. ``draws``: a fused form of
    ``rejection_draws`` (the same arguments and results, e.g. ``models.qmm.residual_draws`` on CPUs)."""
    k, device = len(block), logits.device
    assert logits.shape[0] == k + 1, (logits.shape, k)
    logits = suppress(logits, suppress_ids, suppress_rows)
    probs = warp(logits, params)  # [K + 1, V]
    proposal = None
    if return_probs:
        proposal = top_k_proposal(probs, proposal_top_k)
        if proposal_top_k > 0 and not params.greedy:
            probs = proposal.dense(probs.shape[-1])
    confidence = probs.amax(dim=-1)  # [K + 1]
    if params.greedy:
        return OnDevice([logits.argmax(dim=-1), confidence], proposal)
    assert gen is not None, "sampled verification needs a generator"
    u = uniforms(gen, 2 * k + 1, "cpu")  # one per block token (acceptance), then one per position (its token)
    ids = (torch.tensor([[token] for token in block], dtype=torch.long, device=device) if block
           else torch.empty((0, 1), dtype=torch.long, device=device))  # [K, 1]
    q = draft_probs.to(device) if isinstance(draft_probs, Proposal) else as_dense(draft_probs, probs.shape[-1], device)
    tokens, p_tok, q_tok = (draws or rejection_draws)(ids, probs, q, to_device(u[k:], device))
    return OnDevice([tokens, confidence, p_tok] + ([] if q_tok is None else [q_tok]), proposal, u[:k].tolist())


def read_verdict(block: list[int], values: list[float], params: SamplingParams, on_device: OnDevice,
                 proposal: Proposal | None = None, raw_logits: torch.Tensor | None = None) -> Verdict:
    """The verdict from ``on_device``'s numbers, read back on the host (``values``, its parts in order):
    greedy, a block token is accepted while it equals the argmax; sampled, while ``u * q(d) < p(d)`` (the
    same float64 comparison the device would make). ``proposal``: the verifier's distributions, already on
    the host; ``raw_logits``: for logprobs (their own transfer, only when ``params.logprobs`` asks for them)."""
    k = len(block)
    tokens, confidence = values[: k + 1], values[k + 1 : 2 * k + 2]
    if params.greedy:
        accepted = next((i for i in range(k) if int(tokens[i]) != block[i]), k)
    else:
        p_tok = values[2 * k + 2 : 3 * k + 2]
        q_tok = values[3 * k + 2 : 4 * k + 2] or [1.0] * k  # a one-hot proposal: q(d) = 1
        u = on_device.u_accept
        accepted = next((i for i in range(k) if not u[i] * q_tok[i] < p_tok[i]), k)
    next_token = int(tokens[accepted])
    return Verdict(
        accepted=accepted,
        next_token=next_token,
        confidence=confidence[: accepted + 1],
        probs=None if proposal is None else proposal[: accepted + 1],
        logprobs=None if params.logprobs is None else token_logprobs(
            raw_logits, list(block[:accepted]) + [next_token], params.logprobs),
    )


def rejection_draws(
    at: torch.Tensor, p: torch.Tensor, q: torch.Tensor | Proposal | None, u_token: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """For the block ``at`` [K, 1] (its token ids) drawn from ``q`` [K, V] (or sparse rows; None: one-hot)
    against the target ``p`` [K + 1, V]: each position's recovered token, drawn from the normalised residual
    ``max(0, p - q)`` at ``u_token`` [K + 1] (at K, the bonus token, drawn from ``p``), and ``p(d)``, ``q(d)``
    of the block tokens ([K] each; ``q(d)`` None for a one-hot ``q``, where it is 1)."""
    k = at.shape[0]
    head = p[:k]  # [K, V]
    p_tok = head.gather(1, at).view(k)
    if q is None:
        q_tok = None
        residual = head.scatter(-1, at, 0.0)  # [K, V]: the rejected token's mass removed
    else:
        if isinstance(q, Proposal):  # (a dense q arrives padded to V, on p's device: verify_on_device)
            q = q.dense(p.shape[-1])
        q_tok = q.gather(1, at).view(k)
        residual = (head - q).clamp_min_(0.0)
    # p == q up to rounding leaves nothing to correct towards: recover from p itself
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, head)
    return draw(torch.cat([residual, p[k:]]), u_token), p_tok, q_tok

"""Time one tier call on tiny models (2 layers, hidden 64: overhead-bound, as a GPU is at batch 1).

Runs against whichever via_sd_ray is importable, so the same file times two trees side by side:

    python scripts/bench_tier_call.py                      # this tree
    python scripts/bench_tier_call.py --compile            # this tree, compiled passes (compile: on)
    PYTHONPATH=/path/to/other/tree python scripts/bench_tier_call.py

Prints per-call milliseconds (median of repeats) of a draft call (k=4) and a verify call (block of 4),
greedy and at temperature 1, each after a rollback to the same committed tokens, as JSON; and, at a real
vocabulary (151,936 ids, random logits, 2 threads), the verdict of a sampled block of 4 against its top-64
proposals with torch's ops and, where the C++ ops build, with ``qmm.residual_draws``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import via_sd_ray
from via_sd_ray.core.engine import DraftCall, VerifyCall
from via_sd_ray.core.policy import Tier
from via_sd_ray.core.sampling import SamplingParams
from via_sd_ray.models.decoder import DecoderStack, keep_layers
from via_sd_ray.models.runner import TierRunner
from via_sd_ray.models.tiny import tiny_model

torch.set_num_threads(1)
PROMPT = list(range(10, 74))  # 64 committed tokens
REPEAT, ROUNDS = 200, 5


def runner(name: str, compiled: bool) -> TierRunner:
    stack = DecoderStack(keep_layers(tiny_model(name), [0, 1]))
    pool = stack.new_pool(2, 256)  # as a served tier runs: caches in pool slots
    if compiled:
        stack.compile(pool, max_rows=1)
    return TierRunner(stack, pool)


def per_call_ms(fn, repeat: int = REPEAT) -> float:
    for _ in range(min(20, repeat)):
        fn()
    rounds = []
    for _ in range(ROUNDS):
        start = time.perf_counter()
        for _ in range(repeat):
            fn()
        rounds.append((time.perf_counter() - start) / repeat * 1e3)
    return statistics.median(rounds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compile", action="store_true", help="compiled passes (this tree's compile: on)")
    args = parser.parse_args()
    drafter, full = runner("drafter", args.compile), runner("verifier", args.compile)
    out = {"tree": via_sd_ray.__file__, "compiled": args.compile}
    for label, params in (("greedy", SamplingParams(max_tokens=64)),
                          ("sampled", SamplingParams(max_tokens=64, temperature=1.0))):
        draft_call = DraftCall("g", PROMPT, 4, params, seed=1)
        draft = drafter.draft(draft_call)
        verify_call = VerifyCall(Tier.FULL, "g", PROMPT, draft.tokens, params, seed=2, draft_probs=draft.probs)
        out[f"draft_k4_{label}_ms"] = per_call_ms(lambda: drafter.draft(draft_call))
        out[f"verify_k4_{label}_ms"] = per_call_ms(lambda: full.verify(verify_call))
    out.update(real_vocabulary_verdicts())
    print(json.dumps(out, indent=1))


def real_vocabulary_verdicts(vocab: int = 151_936) -> dict[str, float]:
    """ms of ``verify_on_device`` for a sampled block of 4 over ``vocab`` ids (torch draws, fused draws); nothing
    for an older tree without sparse proposals (the previous main, 8e55536)."""
    from via_sd_ray.core import sampling

    if not hasattr(sampling, "sampled_proposal"):
        return {}
    from via_sd_ray.core.sampling import generator
    from via_sd_ray.core.verify import verify_on_device
    from via_sd_ray.models import qmm

    torch.set_num_threads(2)
    gen = torch.Generator().manual_seed(0)
    params = SamplingParams(max_tokens=64, temperature=1.0)
    logits = torch.randn(5, vocab, generator=gen) * 3
    proposal = sampling.sampled_proposal(torch.randn(4, vocab, generator=gen) * 3, params, 64)
    block = proposal.ids[:, 0].tolist()
    fused = qmm.available() is None and hasattr(qmm, "residual_draws")  # (an older tree has no fused draws)
    ways = {"torch": {}, **({"fused": {"draws": qmm.residual_draws}} if fused else {})}
    timed = {}
    for name, kwargs in ways.items():
        def verdict(kwargs=kwargs):
            with torch.inference_mode():
                verify_on_device(block, logits, params, proposal, generator(2), **kwargs)
        timed[f"verdict_k4_sampled_152k_{name}_ms"] = per_call_ms(verdict, repeat=20)
    torch.set_num_threads(1)
    return timed


if __name__ == "__main__":
    main()

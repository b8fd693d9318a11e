"""``via-sd calibrate``: choose the slim verifier's layers and the router thresholds.

1. Reference: the full verifier generates greedy completions for ShareGPT code prompts of
   the calibration split (never the bench split).
2. Traces: teacher-forced passes give, at every completion position, the full verifier's
   token, the drafter's token and probability, and (per candidate layer set) the slim
   verifier's token and top probability.
3. Costs: drafter token, full-verifier call and slim call (a linear fit in the number of
   layers) are timed on this machine, in units of one autoregressive full step.
4. Search: the router is replayed on the traces (``core.simulate``) to find the thresholds
   with the highest predicted speedup at the target fidelity; first without a slim tier,
   then for each layer set proposed by Bayesian optimisation over layer masks (a Gaussian
   process with a Hamming-distance kernel and expected improvement, as SWIFT and
   Draft & Verify do for self-speculative layer skipping); then a joint refinement.
5. The profile (slim.layers and router thresholds, plus what was measured) is written as
   YAML that a config references with ``profile:``.
"""

from __future__ import annotations

import datetime
import itertools
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml

from via_sd_ray.config import load_config
from via_sd_ray.core.policy import SCORES, Mode, RouterPolicy
from via_sd_ray.core.sampling import SamplingParams
from via_sd_ray.core.simulate import Costs, SimResult, Trace, simulate
from via_sd_ray.data import load_prompts
from via_sd_ray.errors import ConfigError
from via_sd_ray.models.decoder import DecoderStack
from via_sd_ray.models.local import LocalEngine

DIRECT = (0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.98, 0.99, 0.995, 1.0)
SLIM = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
ESCALATE = (0.3, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)
BLOCK_SIZES = (3, 4, 5, 6, 8, 10, 12)
DRAFT_STOPS = (0.0, 0.3, 0.4, 0.5, 0.6, 0.7)


@dataclass
class Choice:
    policy: RouterPolicy
    result: SimResult


def best_policy(traces, costs, target, candidates, min_slim_share: float = 0.0) -> Choice | None:
    """The candidate policy with the highest predicted speedup at fidelity >= ``target`` (and, when
    ``min_slim_share`` is set, sending at least that share of blocks to the slim tier)."""
    best = None
    for policy in candidates:
        result = simulate(traces, policy, costs)
        if result.fidelity < target or result.tier_blocks["slim"] < min_slim_share * result.blocks:
            continue
        if best is None or result.speedup > best.result.speedup:
            best = Choice(policy, result)
    return best


def sd_candidates():
    for k, stop in itertools.product(BLOCK_SIZES, DRAFT_STOPS):
        yield RouterPolicy(mode=Mode.SD, block_size=k, draft_stop_threshold=stop)


def _policy(**kw) -> RouterPolicy | None:
    try:
        return RouterPolicy(mode=Mode.VIA_SD, **kw)
    except ConfigError:
        return None


def no_slim_candidates():
    for k, score, stop, direct in itertools.product(BLOCK_SIZES, SCORES, DRAFT_STOPS, DIRECT):
        yield _policy(block_size=k, score=score, draft_stop_threshold=stop, direct_threshold=direct,
                      slim_threshold=direct)


def slim_candidates(base: RouterPolicy):
    """Policies that send some blocks to the slim tier (slim_threshold < direct_threshold)."""
    for direct, slim, esc in itertools.product(DIRECT, SLIM, ESCALATE):
        if slim < direct and (p := _policy(block_size=base.block_size, score=base.score,
                                            draft_stop_threshold=base.draft_stop_threshold,
                                            direct_threshold=direct, slim_threshold=slim, escalate_threshold=esc)):
            yield p


def joint_candidates(best: RouterPolicy):
    for k, score, stop in itertools.product(BLOCK_SIZES, SCORES, DRAFT_STOPS):
        for direct, slim, esc in itertools.product(DIRECT, SLIM, ESCALATE):
            if slim <= direct and abs(DIRECT.index(direct) - _nearest(DIRECT, best.direct_threshold)) <= 1 \
                    and abs(SLIM.index(slim) - _nearest(SLIM, best.slim_threshold)) <= 1 \
                    and abs(ESCALATE.index(esc) - _nearest(ESCALATE, best.escalate_threshold)) <= 1:
                if p := _policy(block_size=k, score=score, draft_stop_threshold=stop, direct_threshold=direct,
                                slim_threshold=slim, escalate_threshold=esc):
                    yield p


def _nearest(grid, value) -> int:
    return min(range(len(grid)), key=lambda i: abs(grid[i] - value))


class MaskSearch:
    """Bayesian optimisation over keep-masks of decoder layers (first and last layer always kept)."""

    def __init__(self, n_layers: int, min_keep: int, max_keep: int, seed: int, length_scale: float = 4.0):
        self.n, self.min_keep, self.max_keep = n_layers, min_keep, max_keep
        self.rng = np.random.default_rng(seed)
        self.length_scale = length_scale
        self.masks: list[np.ndarray] = []
        self.values: list[float] = []

    def initial(self) -> list[np.ndarray]:
        """Contiguous middle skips (what hand-tuning tries first) and random masks."""
        designs = []
        for skip in (4, 6, 8, 10):
            keep = self.n - skip
            if self.min_keep <= keep <= self.max_keep:
                start = (self.n - skip) // 2
                designs.append(self._mask(set(range(start, start + skip))))
        seen = {d.tobytes() for d in designs}
        for _ in range(1000):
            if len(designs) >= 8:
                break
            mask = self._random()
            if mask.tobytes() not in seen:
                seen.add(mask.tobytes())
                designs.append(mask)
        return designs

    def _mask(self, skipped: set[int]) -> np.ndarray:
        return np.array([0 if i in skipped else 1 for i in range(self.n)], dtype=np.int8)

    def _random(self) -> np.ndarray:
        keep = int(self.rng.integers(self.min_keep, self.max_keep + 1))
        inner = self.rng.choice(np.arange(1, self.n - 1), size=keep - 2, replace=False)
        mask = np.zeros(self.n, dtype=np.int8)
        mask[[0, self.n - 1, *inner]] = 1
        return mask

    def _mutate(self, mask: np.ndarray) -> np.ndarray:
        mask = mask.copy()
        for _ in range(int(self.rng.integers(1, 3))):
            i = int(self.rng.integers(1, self.n - 1))
            mask[i] ^= 1
        keep = int(mask.sum())
        return mask if self.min_keep <= keep <= self.max_keep else self._random()

    def observe(self, mask: np.ndarray, value: float) -> None:
        self.masks.append(mask)
        self.values.append(value)

    def suggest(self, pool: int = 1500) -> np.ndarray:
        seen = {m.tobytes() for m in self.masks}
        order = np.argsort(self.values)[::-1][:5]
        cands = [self._random() for _ in range(pool // 2)]
        cands += [self._mutate(self.masks[i]) for i in order for _ in range(pool // 10)]
        cands = [c for c in cands if c.tobytes() not in seen] or [self._random()]
        x, y = np.array(self.masks, dtype=float), np.array(self.values)
        mu, sd = y.mean(), y.std() or 1.0
        yn = (y - mu) / sd
        kxx = self._kernel(x, x) + 1e-3 * np.eye(len(x))
        chol = np.linalg.cholesky(kxx)
        alpha = np.linalg.solve(chol.T, np.linalg.solve(chol, yn))
        c = np.array(cands, dtype=float)
        kcx = self._kernel(c, x)
        mean = kcx @ alpha
        v = np.linalg.solve(chol, kcx.T)
        std = np.sqrt(np.clip(1.0 - (v * v).sum(0), 1e-12, None))
        best = yn.max()
        z = (mean - best - 0.01) / std
        ei = (mean - best - 0.01) * _norm_cdf(z) + std * np.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
        return cands[int(np.argmax(ei))]

    def _kernel(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        hamming = np.abs(a[:, None, :] - b[None, :, :]).sum(-1)
        return np.exp(-hamming / self.length_scale)


def _norm_cdf(z):
    return 0.5 * (1.0 + np.vectorize(math.erf)(z / math.sqrt(2.0)))


def _timed(fn, repeat: int = 9) -> float:
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def measure_costs(engine: LocalEngine, context: list[int], block_size: int) -> dict:
    """Seconds per AR step, draft token, full call, and the slim call's fit a + b * layers."""
    full = engine.full.stack
    n_layers = len(full.layers)
    half = DecoderStack(engine.verifier_model, list(range(0, n_layers, 2)))

    def step(stack, cache, tokens):
        def run():
            cache.crop(len(context))
            stack(tokens, cache, len(tokens))
        return run

    caches = {}
    for name, stack in (("full", full), ("half", half)):
        caches[name] = stack.new_cache(len(context) + 64)
        stack(context, caches[name], 1)
    block = context[-(block_size + 1):]
    behind = context[-(block_size + 9):]  # the same block after 8 tokens of catch-up
    t_ar = _timed(step(full, caches["full"], block[:1]))
    t_full = _timed(step(full, caches["full"], block))
    t_behind = _timed(step(full, caches["full"], behind))
    t_half = _timed(step(half, caches["half"], block))
    slope = (t_full - t_half) / (n_layers - len(half.layers))
    result = {"ar_step_s": t_ar, "full_call_s": t_full, "slim_fixed_s": t_full - slope * n_layers,
              "slim_per_layer_s": slope, "catch_up_token_s": max(0.0, (t_behind - t_full) / 8)}
    drafter = getattr(engine.drafter, "stack", None)
    if drafter is not None:
        cache = drafter.new_cache(len(context) + 64)
        drafter(context, cache, 1)
        result["draft_token_s"] = _timed(step(drafter, cache, block[:1]))
    else:
        result["draft_token_s"] = 0.0
    return result


def teacher_forced(stack: DecoderStack, prompt: list[int], output: list[int]) -> tuple[list[int], list[float]]:
    """Greedy token and its probability at each output position, given the reference prefix."""
    seq = prompt + output
    logits = stack(seq[:-1], stack.new_cache(len(seq)), len(output))  # [N, V]
    probs = torch.softmax(logits, dim=-1)
    top = probs.max(dim=-1)
    return top.indices.tolist(), top.values.tolist()


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def reference_completions(engine: LocalEngine, args) -> tuple[list[list[int]], list[list[int]]]:
    """Calibration prompts (chat-encoded, at most 160 tokens) and the full verifier's greedy completions.
    With ``--cache``, completions computed before for the same models, prompts and length are reused."""
    prompts = load_prompts(args.num_prompts * 4 if args.prompts is None else args.num_prompts, "calibration",
                           args.prompts)
    encoded = [ids for ids in (engine.encode(p, chat=True) for p in prompts) if len(ids) <= 160]
    if len(encoded) < args.num_prompts:
        raise ConfigError(f"--num-prompts: expected at most {len(encoded)}, received {args.num_prompts}")
    encoded = encoded[: args.num_prompts]
    key = {"verifier": engine.config.models.verifier.model_dump(mode="json"), "prompts": encoded,
           "max_tokens": args.max_tokens}
    cache = Path(args.cache) if args.cache else None
    if cache and cache.is_file():
        saved = json.loads(cache.read_text())
        if saved.get("key") == key:
            _log(f"reusing {len(saved['refs'])} reference completions from {cache}")
            return encoded, saved["refs"]
    _log(f"calibrating on {len(encoded)} prompts x {args.max_tokens} tokens (calibration split)")
    ar = engine.config.router.policy(mode=Mode.AR)
    refs = []
    for i, ids in enumerate(encoded):
        refs.append(engine.generate(ids, SamplingParams(max_tokens=args.max_tokens), ar).token_ids)
        _log(f"  reference {i + 1}/{len(encoded)}: {len(refs[-1])} tokens")
    if cache:
        cache.write_text(json.dumps({"key": key, "refs": refs}))
    return encoded, refs


def run_calibration(args) -> dict:
    config = load_config(args.config, args.app)
    engine = LocalEngine(config)
    encoded, refs = reference_completions(engine, args)
    traces = []
    for ids, out in zip(encoded, refs):
        target, _ = teacher_forced(engine.full.stack, ids, out)
        draft, draft_prob = teacher_forced(engine.drafter.stack, ids, out)
        traces.append(Trace(target, draft, draft_prob))
    raw = measure_costs(engine, encoded[0] + refs[0][:32], config.router.block_size)
    t = raw["ar_step_s"]
    n_layers = len(engine.full.stack.layers)

    def costs_for(layers: int) -> Costs:
        slim = max(raw["slim_fixed_s"] + raw["slim_per_layer_s"] * layers, raw["full_call_s"] * layers / n_layers)
        return Costs(raw["draft_token_s"] / t, raw["full_call_s"] / t, slim / t, raw["catch_up_token_s"] / t)

    def with_slim(layers: list[int]) -> None:
        slim = DecoderStack(engine.verifier_model, layers)
        for tr, ids, out in zip(traces, encoded, refs):
            tr.slim, tr.slim_prob = teacher_forced(slim, ids, out)

    _log(f"costs (x AR step {t * 1000:.1f} ms): {costs_for(n_layers)}, slim per layer "
         f"{raw['slim_per_layer_s'] / t:.4f}")
    sd = best_policy(traces, costs_for(n_layers), 1.0, sd_candidates())
    base = best_policy(traces, costs_for(n_layers), args.target_fidelity, no_slim_candidates())
    if base is None:
        raise ConfigError(f"--target-fidelity: no policy reaches {args.target_fidelity} on these traces")
    _log(f"best sd replay: x{sd.result.speedup:.3f} ({_describe(sd.policy)})")
    _log(f"best without slim tier: x{base.result.speedup:.3f} at fidelity {base.result.fidelity:.4f} "
         f"({_describe(base.policy)})")

    # Bayesian optimisation over layer sets. The objective is the best speedup with the slim tier in
    # use (>= 5% of blocks), so layer sets are told apart even when none beats leaving the tier out.
    search = MaskSearch(n_layers, args.min_layers or n_layers // 2, n_layers - 1, args.seed)
    queue, trials, best_slim = search.initial(), [], None  # best_slim: (Choice, layers)
    for trial in range(args.trials):
        mask = queue.pop(0) if queue else search.suggest()
        layers = [i for i in range(n_layers) if mask[i]]
        with_slim(layers)
        choice = best_policy(traces, costs_for(len(layers)), args.target_fidelity, slim_candidates(base.policy),
                             min_slim_share=0.05)
        value = choice.result.speedup if choice else 0.0
        search.observe(mask, value)
        agree = _agreement(traces)
        trials.append({"layers": layers, "speedup_with_slim": round(value, 4), "slim_agreement": round(agree[0], 4),
                       "confident_agreement": round(agree[1], 4), "confident_share": round(agree[2], 4)})
        if choice and (best_slim is None or value > best_slim[0].result.speedup):
            best_slim = (choice, layers)
        _log(f"  trial {trial + 1}/{args.trials}: keep {len(layers)} skip {_skipped(layers, n_layers)} -> "
             f"x{value:.3f} (slim agrees {agree[0]:.2f}; {agree[1]:.2f} where conf >= 0.8, on {agree[2]:.2f} "
             f"of tokens)")
    choice, layers = base, None
    if best_slim is not None:
        slim_choice, slim_layers = best_slim
        with_slim(slim_layers)
        refined = best_policy(traces, costs_for(len(slim_layers)), args.target_fidelity,
                              joint_candidates(slim_choice.policy), min_slim_share=0.05) or slim_choice
        _log(f"best layer set {slim_layers}: x{refined.result.speedup:.3f} with the slim tier in use "
             f"({refined.result.tier_blocks}); without the slim tier x{base.result.speedup:.3f}")
        if refined.result.speedup > base.result.speedup:
            choice, layers = refined, slim_layers
        best_slim = (refined, slim_layers)
    profile = _profile(args, choice, base, sd, best_slim, raw, trials, n_layers)
    with open(args.out, "w") as f:
        f.write(f"# written by `via-sd {' '.join(sys.argv[1:])}` on {datetime.date.today()}\n")
        yaml.safe_dump(profile, f, sort_keys=False, default_flow_style=None)
    _log(f"profile written to {args.out}: x{choice.result.speedup:.3f} predicted at fidelity "
         f"{choice.result.fidelity:.4f}, slim tier {'on, layers ' + str(layers) if layers else 'off'}")
    return profile


def _profile(args, choice, base, sd, best_slim, raw, trials, n_layers) -> dict:
    p = choice.policy
    calibration = {
        "prompts": args.num_prompts, "max_tokens": args.max_tokens, "target_fidelity": args.target_fidelity,
        "predicted": _sim_dict(choice.result),
        "predicted_without_slim": _sim_dict(base.result),
        "predicted_sd": {**_sim_dict(sd.result), "block_size": sd.policy.block_size,
                         "draft_stop_threshold": sd.policy.draft_stop_threshold},
        "costs_s": {k: round(v, 5) for k, v in raw.items()},
        "trials": sorted(trials, key=lambda tr: -tr["speedup_with_slim"])[:10],
    }
    if best_slim is not None:
        calibration["best_with_slim"] = {**_sim_dict(best_slim[0].result), "layers": list(best_slim[1]),
                                         "router": _router_dict(best_slim[0].policy)}
    return {
        # the best layer set found, even when the thresholds leave the slim tier unused
        "slim": {"layers": list(best_slim[1]) if best_slim is not None else list(range(n_layers))},
        "router": _router_dict(p, sd.policy),
        "calibration": calibration,
    }


def _router_dict(p: RouterPolicy, sd: RouterPolicy | None = None) -> dict:
    out = {"block_size": p.block_size, "score": p.score, "draft_stop_threshold": p.draft_stop_threshold,
           "direct_threshold": p.direct_threshold, "slim_threshold": p.slim_threshold,
           "escalate_threshold": p.escalate_threshold}
    if sd is not None:
        out["sd"] = {"block_size": sd.block_size, "draft_stop_threshold": sd.draft_stop_threshold}
    return out


def _sim_dict(r: SimResult) -> dict:
    return {"speedup_vs_ar": round(r.speedup, 3), "fidelity": round(r.fidelity, 4), "blocks": r.blocks,
            "tier_blocks": dict(r.tier_blocks), "escalations": r.escalations}


def _describe(p: RouterPolicy) -> str:
    return (f"K={p.block_size} score={p.score} stop={p.draft_stop_threshold} direct={p.direct_threshold} "
            f"slim={p.slim_threshold} escalate={p.escalate_threshold}")


def _skipped(layers: list[int], n: int) -> list[int]:
    return [i for i in range(n) if i not in layers]


def _agreement(traces: list[Trace]) -> tuple[float, float, float]:
    hits = total = conf_hits = conf_total = 0
    for tr in traces:
        for s, p, y in zip(tr.slim, tr.slim_prob, tr.target):
            total += 1
            hits += s == y
            if p >= 0.8:
                conf_total += 1
                conf_hits += s == y
    return hits / total, conf_hits / max(1, conf_total), conf_total / max(1, total)

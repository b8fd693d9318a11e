"""``via-sd calibrate``: choose the slim verifier's layers and the router thresholds.

1. Reference: the full verifier generates greedy completions for ShareGPT code prompts of
   the calibration split (never the bench split).
2. Traces: teacher-forced passes give, at every completion position, the full verifier's
   token, the drafter's token and probability, and (per candidate layer set) the slim
   verifier's token and top probability.
3. Costs: drafter token, full-verifier call and slim call (a linear fit in the number of
   layers) are timed on this machine, in units of one autoregressive full step.
4. Search: the router is replayed on the traces (``core.simulate``) for every candidate
   policy: sd block shapes, via-sd without a slim tier (lossy direct blocks, and direct
   blocks held for the full verifier's deferred check), then slim layer sets proposed by
   Bayesian optimisation over layer masks (a Gaussian process with a Hamming-distance
   kernel and expected improvement, as SWIFT and Draft & Verify do for self-speculative
   layer skipping) with a joint refinement. The objective is predicted speed at a
   free-running fidelity target: the replay's estimate of the identical-prefix fraction
   (where the first committed error falls), not teacher-forced token agreement.
5. The speed-quality curve: the Pareto front of predicted speedup against estimated
   free-running fidelity. The default is the fastest point at ``--target-fidelity``, the
   ``fast`` preset the fastest at ``--fast-fidelity``.
6. Confirmation: both points (and ``sd``) generate free on the calibration prompts; their
   measured identical share, prefix fraction and speedup over the references' ``ar`` time
   go into the profile beside the replay's numbers. A default that misses its target when
   measured is replaced by the fastest deferred-check point (exact for greedy).
7. The profile (slim.layers, router thresholds, ``router.presets.fast``, the front and what
   was measured) is written as YAML that a config references with ``profile:``, and the
   curve as a PNG beside it.
"""

from __future__ import annotations

import datetime
import itertools
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml

from via_sd_ray.bench import forget_prefixes
from via_sd_ray.config import load_config
from via_sd_ray.core.fidelity import FreeRunning
from via_sd_ray.core.policy import SCORES, Mode, RouterPolicy
from via_sd_ray.core.sampling import SamplingParams
from via_sd_ray.core.simulate import Costs, SimResult, Trace, simulate
from via_sd_ray.data import load_prompts
from via_sd_ray.errors import ConfigError
from via_sd_ray.models.decoder import DecoderStack
from via_sd_ray.models.kv_cache import median_seconds
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


def best_policy(traces, costs, target, candidates, min_slim_share: float = 0.0,
                seen: list[Choice] | None = None) -> Choice | None:
    """The candidate policy with the highest predicted speedup at an estimated free-running fidelity
    (identical-prefix fraction) >= ``target`` (and, when ``min_slim_share`` is set, sending at least that
    share of blocks to the slim tier). Every candidate evaluated is appended to ``seen``."""
    best = None
    for policy in candidates:
        if policy is None:
            continue
        result = simulate(traces, policy, costs)
        if seen is not None:
            seen.append(Choice(policy, result))
        if result.prefix_fraction < target or result.tier_blocks["slim"] < min_slim_share * result.blocks:
            continue
        if best is None or result.speedup > best.result.speedup:
            best = Choice(policy, result)
    return best


def pareto(points: list[Choice]) -> list[Choice]:
    """The points no other point beats on both predicted speedup and estimated prefix fraction,
    fastest last (ascending speedup, descending fidelity). A point must be faster by more than the
    profile's reported precision (3 decimals), so the written front stays strictly increasing."""
    front: list[Choice] = []
    for c in sorted(points, key=lambda c: (-c.result.prefix_fraction, -c.result.speedup)):
        if not front or c.result.speedup > front[-1].result.speedup + 1e-3:
            front.append(c)
    return front


def fastest(points: list[Choice], target: float) -> Choice | None:
    ok = [c for c in points if c.result.prefix_fraction >= target]
    return max(ok, key=lambda c: c.result.speedup) if ok else None


def sd_candidates():
    for k, stop in itertools.product(BLOCK_SIZES, DRAFT_STOPS):
        yield RouterPolicy(mode=Mode.SD, block_size=k, draft_stop_threshold=stop)


def _policy(**kw) -> RouterPolicy | None:
    try:
        return RouterPolicy(mode=Mode.VIA_SD, **kw)
    except ConfigError:
        return None


DIRECT_RUNS = (0, 1, 2, 4)


def no_slim_candidates(deferred: bool = False):
    """via-sd without a slim tier: direct blocks committed (lossy) or held for the deferred check."""
    runs = DIRECT_RUNS if deferred else (0,)
    for k, score, stop, direct, run in itertools.product(BLOCK_SIZES, SCORES, DRAFT_STOPS, DIRECT, runs):
        yield _policy(block_size=k, score=score, draft_stop_threshold=stop, direct_threshold=direct,
                      slim_threshold=direct, deferred_check=deferred, max_direct_run=run)


def slim_candidates(base: RouterPolicy):
    """Policies that send some blocks to the slim tier (slim_threshold < direct_threshold)."""
    for direct, slim, esc in itertools.product(DIRECT, SLIM, ESCALATE):
        if slim < direct and (p := _policy(block_size=base.block_size, score=base.score,
                                            draft_stop_threshold=base.draft_stop_threshold,
                                            direct_threshold=direct, slim_threshold=slim, escalate_threshold=esc,
                                            deferred_check=base.deferred_check,
                                            max_direct_run=base.max_direct_run)):
            yield p


def joint_candidates(best: RouterPolicy):
    for k, score, stop in itertools.product(BLOCK_SIZES, SCORES, DRAFT_STOPS):
        for direct, slim, esc in itertools.product(DIRECT, SLIM, ESCALATE):
            if slim <= direct and abs(DIRECT.index(direct) - _nearest(DIRECT, best.direct_threshold)) <= 1 \
                    and abs(SLIM.index(slim) - _nearest(SLIM, best.slim_threshold)) <= 1 \
                    and abs(ESCALATE.index(esc) - _nearest(ESCALATE, best.escalate_threshold)) <= 1:
                if p := _policy(block_size=k, score=score, draft_stop_threshold=stop, direct_threshold=direct,
                                slim_threshold=slim, escalate_threshold=esc, deferred_check=best.deferred_check,
                                max_direct_run=best.max_direct_run):
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
    t_ar = median_seconds(step(full, caches["full"], block[:1]), full.device, repeat=9)
    t_full = median_seconds(step(full, caches["full"], block), full.device, repeat=9)
    t_behind = median_seconds(step(full, caches["full"], behind), full.device, repeat=9)
    t_half = median_seconds(step(half, caches["half"], block), full.device, repeat=9)
    slope = (t_full - t_half) / (n_layers - len(half.layers))
    result = {"ar_step_s": t_ar, "full_call_s": t_full, "slim_fixed_s": t_full - slope * n_layers,
              "slim_per_layer_s": slope, "catch_up_token_s": max(0.0, (t_behind - t_full) / 8)}
    drafter = getattr(engine.drafter, "stack", None)
    if drafter is not None:
        cache = drafter.new_cache(len(context) + 64)
        drafter(context, cache, 1)
        result["draft_token_s"] = median_seconds(step(drafter, cache, block[:1]), drafter.device, repeat=9)
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


def reference_completions(engine: LocalEngine, args):
    """Calibration prompts (chat-encoded, at most 160 tokens), the full verifier's greedy completions and
    the seconds each took (None when an older cache has no times). With ``--cache``, completions computed
    before for the same models, prompts and length are reused."""
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
            return encoded, saved["refs"], saved.get("seconds")
    _log(f"calibrating on {len(encoded)} prompts x {args.max_tokens} tokens (calibration split)")
    ar = engine.config.router.policy(mode=Mode.AR)
    refs, seconds = [], []
    for i, ids in enumerate(encoded):
        forget_prefixes(engine)
        result = engine.generate(ids, SamplingParams(max_tokens=args.max_tokens), ar)
        refs.append(result.token_ids)
        seconds.append(result.elapsed)
        _log(f"  reference {i + 1}/{len(encoded)}: {len(refs[-1])} tokens")
    if cache:
        cache.write_text(json.dumps({"key": key, "refs": refs, "seconds": seconds}))
    return encoded, refs, seconds


def run_calibration(args) -> dict:
    config = load_config(args.config, args.app)
    engine = LocalEngine(config)
    encoded, refs, ref_seconds = reference_completions(engine, args)
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
    points: list[Choice] = []  # every policy replayed without a slim tier: the speed-quality curve
    full_costs = costs_for(n_layers)
    sd = best_policy(traces, full_costs, 0.0, sd_candidates(), seen=points)
    best_policy(traces, full_costs, 0.0, no_slim_candidates(deferred=False), seen=points)
    deferred = best_policy(traces, full_costs, 0.0, no_slim_candidates(deferred=True), seen=points)
    via = [c for c in points if c.policy.mode is Mode.VIA_SD]
    base = fastest(via, args.target_fidelity)
    fast = fastest(via, args.fast_fidelity)
    if base is None or fast is None:
        raise ConfigError(f"--target-fidelity / --fast-fidelity: no policy reaches {args.target_fidelity} / "
                          f"{args.fast_fidelity} on these traces")
    _log(f"best sd replay: x{sd.result.speedup:.3f} ({_describe(sd.policy)})")
    _log(f"best deferred check: x{deferred.result.speedup:.3f} ({_describe(deferred.policy)})")
    _log(f"default (prefix >= {args.target_fidelity}): x{base.result.speedup:.3f} at prefix "
         f"{base.result.prefix_fraction:.4f} ({_describe(base.policy)})")
    _log(f"fast (prefix >= {args.fast_fidelity}): x{fast.result.speedup:.3f} at prefix "
         f"{fast.result.prefix_fraction:.4f} ({_describe(fast.policy)})")

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
    confirmed = confirm(engine, args, encoded, refs, ref_seconds,
                        {"default": choice.policy, "fast": fast.policy, "sd": sd.policy}, layers)
    if confirmed["default"]["prefix_fraction"] < args.target_fidelity and choice.policy != deferred.policy:
        _log(f"default measured prefix {confirmed['default']['prefix_fraction']:.4f} < {args.target_fidelity}: "
             f"taking the best deferred-check point instead")
        choice, layers = deferred, None
        confirmed.update(confirm(engine, args, encoded, refs, ref_seconds, {"default": deferred.policy}, None))
    profile = _profile(args, choice, fast, sd, best_slim, raw, trials, n_layers, pareto(points), confirmed)
    with open(args.out, "w") as f:
        f.write(f"# written by `via-sd {' '.join(sys.argv[1:])}` on {datetime.date.today()}\n")
        yaml.safe_dump(profile, f, sort_keys=False, default_flow_style=None)
    plot_path = args.plot or str(Path(args.out).with_suffix(".png"))
    plot_front(profile, plot_path, points)
    _log(f"profile written to {args.out} (curve: {plot_path}): default x{choice.result.speedup:.3f} predicted, "
         f"measured {confirmed['default']}; fast measured {confirmed['fast']}")
    return profile


def confirm(engine: LocalEngine, args, encoded, refs, ref_seconds, policies: dict[str, RouterPolicy],
            layers: list[int] | None) -> dict[str, dict]:
    """Free-running runs of ``policies`` on the first ``--confirm-prompts`` calibration prompts: identical
    share, prefix fraction and speedup over the references' ar time (timed again when not cached)."""
    n = min(args.confirm_prompts, len(encoded))
    if n == 0:
        return {name: {"prefix_fraction": None} for name in policies}
    if layers is not None and list(layers) != list(engine.slim.stack.layer_ids):
        engine.slim = type(engine.slim)(DecoderStack(engine.verifier_model, layers), name="slim")
    params = SamplingParams(max_tokens=args.max_tokens)

    def generate(ids: list[int], policy: RouterPolicy):
        forget_prefixes(engine)  # no run starts from a prefix another run computed (nor is timed shorter for it)
        return engine.generate(ids, params, policy)

    if ref_seconds is None:
        ar = engine.config.router.policy(mode=Mode.AR)
        ref_seconds = [generate(ids, ar).elapsed for ids in encoded[:n]]
    ar_rate = sum(len(r) for r in refs[:n]) / sum(ref_seconds[:n])
    out = {}
    for name, policy in policies.items():
        results = [generate(ids, policy) for ids in encoded[:n]]
        fr = FreeRunning.of(refs[:n], [r.token_ids for r in results])
        rate = sum(len(r.token_ids) for r in results) / sum(r.elapsed for r in results)
        out[name] = {"prompts": n, "identical_share": round(fr.identical_share, 4),
                     "prefix_fraction": round(fr.prefix_fraction, 4), "speedup_vs_ar": round(rate / ar_rate, 3)}
        _log(f"  confirmed {name}: {out[name]}")
    return out


def _profile(args, choice, fast, sd, best_slim, raw, trials, n_layers, front, confirmed) -> dict:
    p = choice.policy
    calibration = {
        "prompts": args.num_prompts, "max_tokens": args.max_tokens,
        "target_fidelity": args.target_fidelity, "fast_fidelity": args.fast_fidelity,
        "fidelity_measure": "free-running identical-prefix fraction (replay estimate; confirmed by generation)",
        "predicted": _sim_dict(choice.result),
        "confirmed": confirmed,
        "predicted_sd": {**_sim_dict(sd.result), "block_size": sd.policy.block_size,
                         "draft_stop_threshold": sd.policy.draft_stop_threshold},
        "pareto": [{**_sim_dict(c.result, brief=True), "router": _router_dict(c.policy)} for c in front],
        "costs_s": {k: round(v, 5) for k, v in raw.items()},
        "trials": sorted(trials, key=lambda tr: -tr["speedup_with_slim"])[:10],
    }
    if best_slim is not None:
        calibration["best_with_slim"] = {**_sim_dict(best_slim[0].result), "layers": list(best_slim[1]),
                                         "router": _router_dict(best_slim[0].policy)}
    fast_fields = _router_dict(fast.policy)
    fast_fields["measured"] = {"predicted": _sim_dict(fast.result, brief=True),
                               "confirmed": dict(confirmed.get("fast") or {})}  # a copy: no YAML alias
    router = _router_dict(p, sd.policy)
    router["presets"] = {"fast": fast_fields}
    return {
        # the best layer set found, even when the thresholds leave the slim tier unused
        "slim": {"layers": list(best_slim[1]) if best_slim is not None else list(range(n_layers))},
        "router": router,
        "calibration": calibration,
    }


def plot_front(profile: dict, path: str, points: list[Choice] | None = None) -> None:
    """The speed-quality curve of a profile: its Pareto front (replay), sd, the measured default and fast
    points, and (when given) every replayed policy. Fidelity below 0.3 is left out: there the fastest
    lossy policies commit nearly everything unchecked, which no one serves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lo = 0.3
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for group, color, label in (
            ([c for c in points or [] if c.policy.mode is Mode.VIA_SD and not c.policy.deferred_check],
             "#c7c7c7", "via-sd, direct blocks committed (replay)"),
            ([c for c in points or [] if c.policy.deferred_check], "#9ecae1", "via-sd, deferred check (replay)")):
        group = [c for c in group if c.result.prefix_fraction >= lo]
        ax.scatter([c.result.prefix_fraction for c in group], [c.result.speedup for c in group], s=6, c=color,
                   label=label)
    cal = profile["calibration"]
    front = [p for p in cal["pareto"] if p["prefix_fraction"] >= lo]
    ax.plot([p["prefix_fraction"] for p in front], [p["speedup_vs_ar"] for p in front], "-o", ms=3, c="#4c72b0",
            label="Pareto front (replay)")
    sd = cal["predicted_sd"]
    ax.scatter([sd["prefix_fraction"]], [sd["speedup_vs_ar"]], marker="s", c="k", label="sd (replay)", zorder=3)
    for name, marker, color in (("default", "*", "#d62728"), ("fast", "P", "#ff7f0e"), ("sd", "s", "#2ca02c")):
        m = cal["confirmed"].get(name) or {}
        if m.get("prefix_fraction") is not None:
            ax.scatter([m["prefix_fraction"]], [m["speedup_vs_ar"]], marker=marker, s=120, c=color,
                       label=f"{name} (measured, free-running)", zorder=4)
    ax.set_xlim(lo, 1.01)
    ax.set_xlabel("free-running fidelity: identical-prefix fraction vs the full model")
    ax.set_ylabel("speedup over ar")
    ax.set_title("via-sd calibrate: speed-quality curve")
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _router_dict(p: RouterPolicy, sd: RouterPolicy | None = None) -> dict:
    out = {"block_size": p.block_size, "score": p.score, "draft_stop_threshold": p.draft_stop_threshold,
           "direct_threshold": p.direct_threshold, "slim_threshold": p.slim_threshold,
           "escalate_threshold": p.escalate_threshold, "deferred_check": p.deferred_check,
           "max_direct_run": p.max_direct_run}
    if p.mode is Mode.SD:
        out = {"mode": "sd", "block_size": p.block_size, "draft_stop_threshold": p.draft_stop_threshold}
    if sd is not None:
        out["sd"] = {"block_size": sd.block_size, "draft_stop_threshold": sd.draft_stop_threshold}
    return out


def _sim_dict(r: SimResult, brief: bool = False) -> dict:
    out = {"speedup_vs_ar": round(r.speedup, 3), "prefix_fraction": round(r.prefix_fraction, 4),
           "identical_share": round(r.identical_share, 4), "teacher_forced": round(r.fidelity, 4)}
    if not brief:
        out.update({"blocks": r.blocks, "tier_blocks": dict(r.tier_blocks), "escalations": r.escalations})
    return out


def _describe(p: RouterPolicy) -> str:
    return (f"{p.mode.value} K={p.block_size} score={p.score} stop={p.draft_stop_threshold} "
            f"direct={p.direct_threshold} slim={p.slim_threshold} escalate={p.escalate_threshold} "
            f"deferred={p.deferred_check} run={p.max_direct_run}")


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

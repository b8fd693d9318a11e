"""``via-sd bench``: every mode on the same ShareGPT code prompts, side by side in one run.

Modes: ``ar`` (full verifier alone), ``sd`` (drafter + full verifier), ``via-sd`` (the
config's default router), ``via-sd:NAME`` (the router preset NAME, e.g. ``via-sd:fast``),
``via-sd-lossless``, and the transformers peers ``hf`` (``generate``) and ``hf-assisted``
(``generate(assistant_model=drafter)``). Modes are interleaved prompt by prompt, so
drift in machine speed hits all of them alike. All runs are greedy.

Fidelity is free-running (``core.fidelity``): each mode's own generation against ``ar``'s
for the same prompt (``ar`` is run untimed when it is not among the modes). ``--check-code``
runs the packaged code set (``via_sd_ray/codecheck_data.json``: raw-completion prompts with
unit tests) instead of ShareGPT and reports each mode's pass rate.

The JSON record (``schema: via-sd-bench/1``) has, per mode (``modes.<mode>``):

- ``tokens_per_s``: completion tokens / wall time, over all prompts;
- ``speedup_vs_ar``: ``tokens_per_s`` / that of ``ar``;
- ``completion_tokens``, ``elapsed_s``;
- ``mean_accepted``: draft tokens accepted per drafted block; ``acceptance_rate``:
  accepted / proposed draft tokens; ``tokens_per_block``: committed tokens per block;
- ``tier_fractions``: share of blocks decided by ``direct`` / ``slim`` / ``full``;
  ``escalations``: blocks the slim verifier handed to the full verifier;
- ``free_running``: against ``ar``'s generations: ``identical_share`` (generations
  token-identical to ``ar``'s), ``prefix_fraction`` (mean first divergence / length),
  ``mean_first_divergence`` (token index, over those that diverge), per-prompt ``first_divergence``;
- ``fidelity``: teacher-forced share of completion tokens equal to the full model's
  argmax given the same prefix (one batched pass of the full verifier per completion), a
  secondary figure: it forgives every token after a divergence;
- ``code``: with ``--check-code``, ``passed`` / ``total`` / ``pass_rate`` / ``failed``;
- ``analytic_speedup``: for ``sd``, Leviathan et al.: E[tokens/block] = (1 - a^(K+1)) / (1 - a)
  divided by the block cost K * c + v, with a the acceptance rate, K the mean block size,
  c the drafter's time per draft token and v the full verifier's time per call, both over
  ``ar``'s time per token; for ``via-sd`` the same cost model summed over the tier calls
  the run made (drafter tokens * c + slim calls * s + full calls * v);
  ``measured_over_analytic``: ``speedup_vs_ar`` / ``analytic_speedup`` (what the loop,
  Python and cache bookkeeping cost);
- ``unit_costs``: c, s and v above; ``time_split``: share of wall time per tier and other.

``targets`` holds the ratios the engine issue asks for, with their goals.
"""

from __future__ import annotations

import json
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from via_sd_ray.codecheck import STOP, load_problems, pass_rate
from via_sd_ray.config import PROMPT_LOOKUP, load_config
from via_sd_ray.core.fidelity import FreeRunning
from via_sd_ray.core.policy import Mode, RouterPolicy
from via_sd_ray.core.sampling import SamplingParams
from via_sd_ray.core.stats import GenerationStats
from via_sd_ray.data import load_prompts
from via_sd_ray.errors import ConfigError
from via_sd_ray.models.kv_cache import synchronize
from via_sd_ray.models.local import LocalEngine

MODES = ("ar", "sd", "via-sd", "via-sd-lossless", "hf", "hf-assisted")
SCHEMA = "via-sd-bench/2"


@dataclass
class ModeRun:
    """Everything measured for one mode over all prompts."""

    outputs: list[list[int]] = field(default_factory=list)
    elapsed: float = 0.0
    stats: GenerationStats = field(default_factory=GenerationStats)
    tier_seconds: dict[str, float] = field(default_factory=lambda: {"drafter": 0.0, "slim": 0.0, "full": 0.0})
    tier_calls: dict[str, int] = field(default_factory=lambda: {"drafter": 0, "slim": 0, "full": 0})
    fidelity_hits: int = 0
    texts: list[str] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        return sum(len(o) for o in self.outputs)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.elapsed if self.elapsed else 0.0


def policy_for(engine: LocalEngine, mode: str):
    if mode.startswith("via-sd:"):
        return engine.config.router.policy(preset=mode.split(":", 1)[1], mode=Mode.VIA_SD, lossless=False)
    if mode == "via-sd-lossless":
        return engine.config.router.policy(mode=Mode.VIA_SD, lossless=True)
    return engine.config.router.policy(mode=Mode(mode), lossless=False if mode == "via-sd" else None)


def run_mode(engine: LocalEngine, mode: str, prompt_ids: list[int], max_tokens: int, run: ModeRun,
             stop: tuple[str, ...] = (), policy: RouterPolicy | None = None) -> None:
    """Generate ``prompt_ids`` in ``mode`` (with ``policy`` where given, else the config's) into ``run``."""
    if mode in ("hf", "hf-assisted"):
        kwargs = {}
        if mode == "hf-assisted":
            if engine.config.models.drafter.source == PROMPT_LOOKUP:
                kwargs["prompt_lookup_num_tokens"] = engine.config.router.block_size
            else:
                kwargs["assistant_model"] = engine.drafter_model
        inputs = torch.tensor([prompt_ids], device=engine.verifier_model.device)
        synchronize(inputs.device)
        start = time.perf_counter()
        with torch.inference_mode():
            out = engine.verifier_model.generate(inputs, attention_mask=torch.ones_like(inputs), do_sample=False,
                                                 max_new_tokens=max_tokens, pad_token_id=engine.eos_token_ids[0],
                                                 eos_token_id=list(engine.eos_token_ids), **kwargs)
        synchronize(inputs.device)
        run.elapsed += time.perf_counter() - start
        run.outputs.append(out[0, len(prompt_ids):].tolist())
        run.texts.append(engine.decode(run.outputs[-1]))  # stop strings: the code check cuts at them
        return
    forget_prefixes(engine)  # every mode prefills its prompt: no mode reuses another's cached prompt
    result = engine.generate(prompt_ids, SamplingParams(max_tokens=max_tokens, stop=stop),
                             policy or policy_for(engine, mode))
    run.elapsed += result.elapsed
    run.outputs.append(result.token_ids)
    run.texts.append(result.text)
    run.stats.merge(result.stats)
    for tier in run.tier_seconds:
        run.tier_seconds[tier] += result.times.seconds[tier]
        run.tier_calls[tier] += result.times.calls[tier]


def forget_prefixes(engine: LocalEngine) -> None:
    """Drop the cached prefixes of finished generations in every tier (runs stay comparable)."""
    for runner in (engine.drafter, engine.slim, engine.full):
        clear = getattr(runner, "clear_prefixes", None)
        if clear is not None:
            clear()


def teacher_forced_hits(engine: LocalEngine, prompt_ids: list[int], output: list[int]) -> int:
    """How many ``output`` tokens equal the full verifier's argmax given the same prefix."""
    if not output:
        return 0
    seq = prompt_ids + output
    cache = engine.full.stack.new_cache(capacity=len(seq))
    logits = engine.full.stack(seq[:-1], cache, len(output))  # [N, V]: predictions of output[0..N)
    return int((logits.argmax(-1) == torch.tensor(output, device=logits.device)).sum())


def summarize(runs: dict[str, ModeRun], references: list[list[int]]) -> dict:
    ar = runs.get("ar")
    t_ar = ar.tier_seconds["full"] / ar.tier_calls["full"] if ar and ar.tier_calls["full"] else None
    out = {}
    for mode, run in runs.items():
        s = run.stats
        entry = {
            "tokens_per_s": run.tokens_per_s,
            "speedup_vs_ar": run.tokens_per_s / ar.tokens_per_s if ar and ar.tokens_per_s else None,
            "completion_tokens": run.tokens,
            "elapsed_s": run.elapsed,
            "free_running": FreeRunning.of(references, run.outputs).to_dict(),
            "fidelity": run.fidelity_hits / run.tokens if run.tokens else None,
        }
        if mode not in ("hf", "hf-assisted"):
            entry.update({
                "mean_accepted": s.mean_accepted,
                "acceptance_rate": s.acceptance_rate,
                "tokens_per_block": s.tokens_per_block,
                "tier_fractions": s.tier_fractions(),
                "tier_blocks": dict(s.tier_blocks),
                "escalations": s.escalations,
                "acceptance_per_position": s.to_dict()["acceptance_per_position"],
                "tier_seconds": dict(run.tier_seconds),
                "tier_calls": dict(run.tier_calls),
                "time_split": _time_split(run),
            })
            entry.update(_analytic(mode, run, t_ar, entry["speedup_vs_ar"]))
        out[mode] = entry
    return out


def _time_split(run: ModeRun) -> dict[str, float]:
    split = {tier: sec / run.elapsed for tier, sec in run.tier_seconds.items()} if run.elapsed else {}
    split["other"] = 1.0 - sum(split.values()) if split else 0.0
    return split


def _analytic(mode: str, run: ModeRun, t_ar: float | None, measured: float | None) -> dict:
    s, sec, calls = run.stats, run.tier_seconds, run.tier_calls
    if mode == "ar" or t_ar is None or not s.proposed:
        return {"analytic_speedup": None, "measured_over_analytic": None, "unit_costs": None}
    c = sec["drafter"] / s.proposed / t_ar  # per draft token
    v = sec["full"] / calls["full"] / t_ar if calls["full"] else None
    slim = sec["slim"] / calls["slim"] / t_ar if calls["slim"] else None
    if mode == "sd":
        a = min(s.acceptance_rate, 0.999999)
        k = s.proposed / max(1, sum(1 for r in s.records if r.proposed))
        expected = (1 - a ** (k + 1)) / (1 - a)
        analytic = expected / (k * c + v)
    else:
        cost = s.proposed * c + calls["slim"] * (slim or 0.0) + calls["full"] * (v or 0.0)
        analytic = s.committed / cost if cost else None
    return {
        "analytic_speedup": analytic,
        "measured_over_analytic": measured / analytic if analytic and measured else None,
        "unit_costs": {"drafter_token": c, "slim_call": slim, "full_call": v},
    }


def targets(summary: dict) -> dict:
    def ratio(a, b, key="tokens_per_s"):
        if a in summary and b in summary and summary[b][key]:
            return summary[a][key] / summary[b][key]
        return None

    via, sd = summary.get("via-sd"), summary.get("sd")
    gap = None
    if via and sd:
        gap = via["free_running"]["prefix_fraction"] - sd["free_running"]["prefix_fraction"]
    return {
        "ar_over_hf": {"value": ratio("ar", "hf"), "goal": ">= 1.0"},
        "sd_over_analytic": {"value": sd and sd.get("measured_over_analytic"), "goal": ">= 0.9"},
        "sd_over_hf_assisted": {"value": ratio("sd", "hf-assisted"), "goal": ">= 1.2"},
        "via_sd_over_sd": {"value": ratio("via-sd", "sd"), "goal": ">= 1.1"},
        "via_sd_prefix_fraction_minus_sd": {"value": gap, "goal": ">= -0.03"},
    }


def print_table(summary: dict, file=None) -> None:
    file = file or sys.stdout
    head = (f"{'mode':16s} {'tok/s':>7s} {'xAR':>5s} {'acc/blk':>7s} {'acc%':>5s} {'tok/blk':>7s} "
            f"{'direct':>6s} {'slim':>5s} {'full':>5s} {'escal':>5s} {'ident':>5s} {'prefix':>6s} {'1st-div':>7s} "
            f"{'tf-fid':>6s} {'pass':>5s} {'analytic':>8s} {'meas/an':>7s}")
    print(head, file=file)
    for mode, e in summary.items():
        tf, fr = e.get("tier_fractions") or {}, e["free_running"]
        code = (e.get("code") or {}).get("pass_rate")
        print(f"{mode:16s} {e['tokens_per_s']:7.2f} {_f(e['speedup_vs_ar'], 5)} {_f(e.get('mean_accepted'), 7)} "
              f"{_f(e.get('acceptance_rate'), 5)} {_f(e.get('tokens_per_block'), 7)} {_f(tf.get('direct'), 6)} "
              f"{_f(tf.get('slim'), 5)} {_f(tf.get('full'), 5)} {str(e.get('escalations', '-')):>5s} "
              f"{_f(fr['identical_share'], 5)} {_f(fr['prefix_fraction'], 6, 3)} "
              f"{_f(fr['mean_first_divergence'], 7, 1)} {_f(e['fidelity'], 6, 3)} {_f(code, 5)} "
              f"{_f(e.get('analytic_speedup'), 8)} {_f(e.get('measured_over_analytic'), 7)}", file=file)


def _f(value, width, digits=2) -> str:
    return f"{value:{width}.{digits}f}" if isinstance(value, (int, float)) else f"{'-':>{width}s}"


def plot(summary: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(summary)
    fig, ax = plt.subplots(figsize=(1.6 * len(modes) + 2, 4))
    bars = ax.bar(modes, [summary[m]["tokens_per_s"] for m in modes], color="#4c72b0")
    for bar, m in zip(bars, modes):
        fid = summary[m]["free_running"]["prefix_fraction"]
        ax.annotate(f"prefix {fid:.3f}" if fid is not None else "",
                    (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("tokens / s")
    ax.set_title("via-sd bench (greedy)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _modes(spec: str, config) -> list[str]:
    modes = [m.strip() for m in spec.split(",") if m.strip()]
    presets = [f"via-sd:{name}" for name in config.router.presets]
    unknown = [m for m in modes if m not in MODES and m not in presets]
    if unknown or not modes:
        raise ConfigError(f"--modes: expected a comma list of {MODES + tuple(presets)}, received {spec!r}")
    return modes


def run_bench(args) -> dict:
    config = load_config(args.config, args.app)
    modes = _modes(args.modes, config)
    engine = LocalEngine(config)
    problems, stop = None, ()
    if getattr(args, "check_code", False):
        problems = load_problems()[: args.num_prompts]
        prompt_ids, stop, source = [engine.encode(p.prompt) for p in problems], STOP, "code set"
    else:
        prompts = load_prompts(args.num_prompts, args.split, args.prompts)
        prompt_ids, source = [engine.encode(p, chat=True) for p in prompts], f"{args.split} split"
    print(f"{len(prompt_ids)} prompts ({source}), {args.max_tokens} tokens, modes {modes}", file=sys.stderr)
    for mode in modes:  # warm-up: first calls allocate and fill caches
        run_mode(engine, mode, prompt_ids[0][:32], 4, ModeRun())
    runs = {mode: ModeRun() for mode in modes}
    for i, ids in enumerate(prompt_ids):
        line = []
        for mode in modes:
            before = runs[mode].elapsed
            run_mode(engine, mode, ids, args.max_tokens, runs[mode], stop)
            line.append(f"{mode} {len(runs[mode].outputs[-1]) / (runs[mode].elapsed - before):.2f}")
        print(f"[{i + 1}/{len(prompt_ids)}] tok/s: " + ", ".join(line), file=sys.stderr, flush=True)
    if "ar" in runs:
        references = runs["ar"].outputs
    else:  # the reference of free-running fidelity, untimed
        references = [r.token_ids for r in (engine.generate(ids, SamplingParams(max_tokens=args.max_tokens,
                                                                                stop=stop), policy_for(engine, "ar"))
                                            for ids in prompt_ids)]
    for mode, run in runs.items():
        run.fidelity_hits = sum(teacher_forced_hits(engine, ids, out) for ids, out in zip(prompt_ids, run.outputs))
    summary = summarize(runs, references)
    if problems is not None:
        for mode, run in runs.items():
            summary[mode]["code"] = pass_rate(problems, run.texts)
    record = {
        "schema": SCHEMA,
        "command": " ".join(["via-sd", *sys.argv[1:]]),
        "config": config.model_dump(mode="json"),
        "machine": {"python": platform.python_version(), "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "processor": platform.processor() or platform.machine(),
                    "cpu": cpu_name()},
        "num_prompts": len(prompt_ids),
        "max_tokens": args.max_tokens,
        "split": "code" if problems is not None else args.split,
        "modes": summary,
        "targets": targets(summary),
    }
    print_table(summary)
    for name, t in record["targets"].items():
        print(f"target {name}: {_f(t['value'], 6, 3).strip()} (goal {t['goal']})")
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(record, indent=2))
    if args.plot:
        plot(summary, args.plot)
    return record


def cpu_name() -> str:
    from via_sd_ray.models.cpuinfo import cpu_field

    return cpu_field(("model name",)) or platform.processor() or platform.machine()

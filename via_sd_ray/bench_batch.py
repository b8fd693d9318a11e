"""``via-sd bench-batch``: the in-process engine serving several generations at once.

For each mode and concurrency c, the prompts run in groups of c through
``LocalEngine.generate_batch`` (each tier's calls of a round in one batched pass over the KV
pool, long prompts prefilled in chunks beside the others' steps); c = 1 is one generation at
a time. Printed and written per mode: aggregate tokens/s per c and its ratio to c = 1; the
mean time to first token (the prompts' prefill, which batching cannot shorten on a compute-bound
device); decode tokens/s, the tokens after each generation's first over each group's time after
its last first token, and its ratio; and whether every generation equals its c = 1 output (greedy).
``--prefix-tokens N`` also times the
first token of a prompt of N tokens (a repeated long system prompt plus a short question), sent
twice: the second finds the first's prefix in the pool and prefills only its tail.
"""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path

import torch

from via_sd_ray.bench import cpu_name, forget_prefixes, policy_for
from via_sd_ray.config import load_config
from via_sd_ray.core.sampling import SamplingParams
from via_sd_ray.data import load_prompts
from via_sd_ray.errors import ConfigError
from via_sd_ray.models.local import LocalEngine

SCHEMA = "via-sd-bench-batch/1"


def _levels(spec: str) -> list[int]:
    try:
        levels = sorted({int(x) for x in spec.split(",") if x.strip()})
    except ValueError:
        levels = []
    if not levels or levels[0] < 1:
        raise ConfigError(f"--concurrency: expected a comma list of positive integers, received {spec!r}")
    return levels


def run_level(engine: LocalEngine, mode: str, prompt_ids: list[list[int]], max_tokens: int, c: int) -> dict:
    params, policy = SamplingParams(max_tokens=max_tokens), policy_for(engine, mode)
    forget_prefixes(engine)  # each level prefills its prompts (no level reuses another's)
    outputs, ttfts, decode_s, start = [], [], 0.0, time.perf_counter()
    for i in range(0, len(prompt_ids), c):
        results = engine.generate_batch(prompt_ids[i : i + c], params, policy)
        outputs += [r.token_ids for r in results]
        ttfts += [r.first_token_s or 0.0 for r in results]
        # the group's decode phase: from its last first token (every prefill done) to its end
        decode_s += max(r.elapsed for r in results) - max(r.first_token_s or 0.0 for r in results)
    elapsed = time.perf_counter() - start
    tokens = sum(len(o) for o in outputs)
    decode_tokens = sum(max(len(o) - 1, 0) for o in outputs)
    return {"concurrency": c, "completion_tokens": tokens, "elapsed_s": elapsed,
            "tokens_per_s": tokens / elapsed if elapsed else 0.0,
            "ttft_s_mean": sum(ttfts) / len(ttfts), "prompt_tokens": sum(len(p) for p in prompt_ids),
            "decode_tokens_per_s": decode_tokens / decode_s if decode_s > 0 else 0.0, "outputs": outputs}


def prefix_ttft(engine: LocalEngine, tokens: int, question: str = "Summarise the rules above.") -> dict:
    """Time to the first token of a ``tokens``-token prompt, sent twice (pool prefixes cleared first)."""
    forget_prefixes(engine)
    unit = engine.encode("Rule: every function must have a docstring, type hints and a unit test. ")
    system = (unit * (tokens // len(unit) + 1))[: tokens - len(engine.encode(question))]
    ids = system + engine.encode(question)
    times = []
    for _ in range(2):
        start = time.perf_counter()
        engine.generate(ids, SamplingParams(max_tokens=1), policy_for(engine, "sd"))
        times.append(time.perf_counter() - start)
    return {"prompt_tokens": len(ids), "first_s": times[0], "repeat_s": times[1],
            "repeat_over_first": times[1] / times[0]}


def run_bench_batch(args) -> dict:
    config = load_config(args.config, args.app)
    levels = _levels(args.concurrency)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    engine = LocalEngine(config)
    prompts = load_prompts(args.num_prompts, args.split, args.prompts)
    prompt_ids = [engine.encode(p, chat=True) for p in prompts]
    print(f"{len(prompt_ids)} prompts, {args.max_tokens} tokens, modes {modes}, concurrency {levels}; "
          f"KV pools: full {engine.full.pool.describe()}", file=sys.stderr)
    for mode in modes:  # warm-up
        engine.generate_batch([prompt_ids[0][:32]] * 2, SamplingParams(max_tokens=4), policy_for(engine, mode))
    summary: dict = {}
    for mode in modes:
        rows = []
        for c in levels:
            rows.append(run_level(engine, mode, prompt_ids, args.max_tokens, c))
            print(f"{mode} c={c}: {rows[-1]['tokens_per_s']:.2f} tok/s", file=sys.stderr, flush=True)
        base = rows[0]
        for row in rows:
            row["over_lowest"] = row["tokens_per_s"] / base["tokens_per_s"] if base["tokens_per_s"] else 0.0
            row["decode_over_lowest"] = (row["decode_tokens_per_s"] / base["decode_tokens_per_s"]
                                         if base["decode_tokens_per_s"] else 0.0)
            row["identical_to_lowest"] = sum(a == b for a, b in zip(row["outputs"], base["outputs"]))
        summary[mode] = [{k: v for k, v in row.items() if k != "outputs"} for row in rows]
    record = {
        "schema": SCHEMA,
        "command": " ".join(["via-sd", *sys.argv[1:]]),
        "config": config.model_dump(mode="json"),
        "machine": {"python": platform.python_version(), "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "cpu": cpu_name()},
        "kv_pools": {name: getattr(r, "pool", None) and r.pool.describe()
                     for name, r in (("drafter", engine.drafter), ("slim", engine.slim), ("full", engine.full))},
        "num_prompts": len(prompt_ids), "max_tokens": args.max_tokens, "modes": summary,
    }
    if args.prefix_tokens:
        record["prefix_ttft"] = prefix_ttft(engine, args.prefix_tokens)
    low = "x c=" + str(levels[0])
    print(f"{'mode':<10}{'c':>4}{'tok/s':>9}{low:>9}{'TTFT s':>9}{'decode':>9}{low:>9}{'same':>7}")
    for mode, rows in summary.items():
        for row in rows:
            print(f"{mode:<10}{row['concurrency']:>4}{row['tokens_per_s']:>9.2f}{row['over_lowest']:>9.2f}"
                  f"{row['ttft_s_mean']:>9.1f}{row['decode_tokens_per_s']:>9.2f}{row['decode_over_lowest']:>9.2f}"
                  f"{row['identical_to_lowest']:>4}/{len(prompt_ids)}")
    if "prefix_ttft" in record:
        p = record["prefix_ttft"]
        print(f"first token of a {p['prompt_tokens']}-token prompt: {p['first_s']:.2f} s, repeated "
              f"{p['repeat_s']:.2f} s ({p['repeat_over_first']:.3f} x)")
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(record, indent=2))
    return record

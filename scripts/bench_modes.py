"""Tokens/s of ar, sd and via-sd on the default pair, greedy and sampled (temperature 1, seeded), in-process.

Runs against whichever via_sd_ray is importable, so one file times two trees side by side:

    python scripts/bench_modes.py --config deployments/via_sd.yaml --num-prompts 4 --max-tokens 64
    PYTHONPATH=/path/to/other/tree python scripts/bench_modes.py ...
    python scripts/bench_modes.py ... --runs sd@t=0,ar@t=0    # some of the runs, in this order

Prints one JSON record: tokens/s per mode (all prompts' tokens over all their seconds), and each
generation's token ids (a sampled run's tokens depend on the tree's sampler, a greedy run's must not).
"""

from __future__ import annotations

import argparse
import json
import sys

import via_sd_ray
from via_sd_ray.bench import forget_prefixes, policy_for
from via_sd_ray.config import load_config
from via_sd_ray.core.sampling import SamplingParams
from via_sd_ray.data import load_prompts
from via_sd_ray.models.local import LocalEngine

RUNS = [("ar", 0.0), ("sd", 0.0), ("via-sd", 0.0), ("sd", 1.0), ("via-sd", 1.0)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--num-prompts", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--runs", help="comma-separated MODE@t=TEMPERATURE, in order (default: "
                        + ",".join(f"{m}@t={t:g}" for m, t in RUNS) + ")")
    args = parser.parse_args()
    runs = RUNS
    if args.runs:
        try:
            runs = [(mode, float(t)) for mode, t in (run.split("@t=") for run in args.runs.split(","))]
        except ValueError:
            parser.error(f"--runs: expected MODE@t=TEMPERATURE[,...] (e.g. sd@t=0,ar@t=0), received {args.runs!r}")
    engine = LocalEngine(load_config(args.config, None))
    prompts = [engine.encode(p, chat=True) for p in load_prompts(args.num_prompts, "bench", None)]
    engine.generate(prompts[0], SamplingParams(max_tokens=4), policy_for(engine, "sd"))  # warm-up
    out = {"tree": via_sd_ray.__file__, "runs": {}}
    for mode, temperature in runs:
        tokens, seconds, ids = 0, 0.0, []
        for i, prompt in enumerate(prompts):
            forget_prefixes(engine)
            params = SamplingParams(max_tokens=args.max_tokens, temperature=temperature, seed=100 + i)
            result = engine.generate(prompt, params, policy_for(engine, mode))
            tokens, seconds = tokens + len(result.token_ids), seconds + result.elapsed
            ids.append(result.token_ids)
        key = f"{mode}@t={temperature:g}"
        out["runs"][key] = {"tokens_per_s": tokens / seconds, "tokens": tokens, "seconds": seconds, "ids": ids}
        print(f"{key:12s} {tokens / seconds:6.2f} tok/s ({tokens} tokens)", file=sys.stderr, flush=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()

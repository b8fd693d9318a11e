"""Host memory of each tier as a served replica builds it: every tier loaded in a fresh process by
``build_tier`` (weights, KV pool), then its peak RSS during the load, what stays resident after it, and what
one KV slot adds once a prompt is prefilled into it.

    python scripts/bench_memory.py --config deployments/via_sd.yaml [--tiers drafter,full] [--prompt-tokens 512]

Prints a line per tier and one JSON record. A served replica holds ~0.2 GB more (Ray's core worker).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import psutil

GB = 1e9


def resident() -> int:
    return psutil.Process().memory_info().rss


def child(config: str, tier: str, prompt_tokens: int) -> dict:
    import torch

    from via_sd_ray.config import load_config
    from via_sd_ray.models.tiers import build_tier

    cfg = load_config(config, None)
    torch.set_num_threads(cfg.threads or torch.get_num_threads())
    before = resident()
    start = time.perf_counter()
    runner = build_tier(cfg, tier)
    seconds = time.perf_counter() - start
    out = {
        "tier": tier,
        "load_s": round(seconds, 1),
        "rss_before_load_gb": round(before / GB, 3),
        "peak_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB, 3),  # KiB on Linux
        "resident_gb": round(resident() / GB, 3),
    }
    pool = getattr(runner, "pool", None)
    if pool is not None:
        out["pool"] = pool.describe()
        out["pool_reserved_gb"] = round(pool.nbytes / GB, 3)
        prompt = [(7 * i) % 5000 + 100 for i in range(prompt_tokens)]
        with torch.inference_mode():
            runner.stack.forward(prompt, pool.cache(0), 1)
        out["resident_after_prefill_gb"] = round(resident() / GB, 3)
        out["prefill_tokens"] = prompt_tokens
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--tiers", default="drafter,full", help="comma-separated: drafter, slim, full")
    parser.add_argument("--prompt-tokens", type=int, default=512, help="tokens prefilled into one KV slot")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.config, args.child, args.prompt_tokens)))
        return
    records = []
    for tier in args.tiers.split(","):
        done = subprocess.run([sys.executable, __file__, "--config", args.config, "--child", tier,
                               "--prompt-tokens", str(args.prompt_tokens)], capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"{tier}: the loading process failed (exit {done.returncode}):\n{done.stderr[-2000:]}")
        record = json.loads(done.stdout.strip().splitlines()[-1])
        records.append(record)
        line = (f"{tier:8s} load {record['load_s']:5.1f} s  peak {record['peak_gb']:.2f} GB  "
                f"resident {record['resident_gb']:.2f} GB")
        if "pool" in record:
            line += (f"  pool {record['pool']}  after a {record['prefill_tokens']}-token prefill "
                     f"{record['resident_after_prefill_gb']:.2f} GB")
        print(line, file=sys.stderr)
    print(json.dumps({"config": args.config, "tiers": records}))


if __name__ == "__main__":
    main()

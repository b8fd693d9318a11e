"""Milliseconds per pass of the default pair's models, the shapes SD runs: a one-token step, verify
blocks of 5 and 11 tokens, 4 decode rows batched, a 128-token prefill chunk; packed layers with the model's
activations and rounded to int8 (``activations: int8``), interleaved round by round.

    python scripts/bench_passes.py --config deployments/via_sd.yaml [--rounds 5]

Prints one JSON record (median ms per pass over the rounds, per tier and activations).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from via_sd_ray.config import load_config
from via_sd_ray.models.local import LocalEngine
from via_sd_ray.models.quant import round_activations

CONTEXT = 300  # tokens already in the cache, a prompt's length


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    engine = LocalEngine(load_config(args.config, None))
    stacks = {"drafter": engine.drafter.stack, "full": engine.full.stack}
    shapes = {"step": (1, 1), "verify5": (1, 5), "verify11": (1, 11), "batch4": (4, 1), "prefill128": (1, 128)}
    prompt = [(7 * i) % 5000 + 100 for i in range(CONTEXT)]
    times: dict[str, list[float]] = {}
    for _ in range(args.rounds):
        for tier, stack in stacks.items():
            pool = stack.new_pool(4, CONTEXT + 256)
            caches = [pool.cache(i) for i in range(4)]
            for cache in caches:
                stack.forward(prompt, cache, 0)
            for int8 in (False, True):
                round_activations(stack.hf_model, int8)
                for name, (rows, tokens) in shapes.items():
                    ids = [[(13 * j + r) % 3000 + 50 for j in range(tokens)] for r in range(rows)]
                    logits = [0 if name.startswith("prefill") else tokens] * rows
                    start = time.perf_counter()
                    stack.forward_batch(ids, caches[:rows], logits)
                    times.setdefault(f"{tier}/{'int8' if int8 else 'dtype'}/{name}", []).append(
                        (time.perf_counter() - start) * 1e3)
                    for cache in caches[:rows]:
                        cache.crop(CONTEXT)
    out = {key: round(statistics.median(v), 2) for key, v in times.items()}
    for key, ms in out.items():
        print(f"{key:32s} {ms:8.2f} ms", file=sys.stderr)
    print(json.dumps(out))


if __name__ == "__main__":
    main()

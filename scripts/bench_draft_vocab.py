"""Milliseconds per drafter pass with its LM head over the whole vocabulary and over the ranking's most
frequent ids (``models.drafter.draft_vocab``), loaded as the config loads the drafter, interleaved round
by round; and the share of each generation's tokens (a bench_modes record's ``ar`` ids) the narrowed
head could have drafted.

    python scripts/bench_draft_vocab.py --config deployments/via_sd.yaml \\
        --ranking deployments/profiles/qwen2.5-coder-draft-vocab.json --sizes 32768,16384 \\
        [--record docs/results/zen4-modes-q4.json] [--rounds 7]

Prints one JSON record.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from via_sd_ray.config import DraftVocabConfig, load_config
from via_sd_ray.models.decoder import DecoderStack
from via_sd_ray.models.tiers import load

CONTEXT = 300


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--ranking", required=True)
    parser.add_argument("--sizes", default="32768,16384")
    parser.add_argument("--record", default=None, help="a bench_modes JSON record: coverage of its ar tokens")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    cfg = load_config(args.config, None).models.drafter
    sizes = [int(s) for s in args.sizes.split(",")]
    stacks = {"whole": DecoderStack(load(cfg))}
    for size in sizes:
        narrowed = cfg.model_copy(update={"draft_vocab": DraftVocabConfig(file=args.ranking, size=size)})
        stacks[str(size)] = DecoderStack(load(narrowed))
    prompt = [(7 * i) % 5000 + 100 for i in range(CONTEXT)]
    shapes = {"step": 1, "batch4": 4}
    times: dict[str, list[float]] = {}
    caches = {}
    for name, stack in stacks.items():
        pool = stack.new_pool(4, CONTEXT + 64)
        caches[name] = [pool.cache(i) for i in range(4)]
        for cache in caches[name]:
            stack.forward(prompt, cache, 0)
    for _ in range(args.rounds):
        for name, stack in stacks.items():
            for shape, rows in shapes.items():
                start = time.perf_counter()
                stack.forward_batch([[1234 + r] for r in range(rows)], caches[name][:rows], [1] * rows)
                times.setdefault(f"{name}/{shape}", []).append((time.perf_counter() - start) * 1e3)
                for cache in caches[name][:rows]:
                    cache.crop(CONTEXT)
    out = {"ms": {key: round(statistics.median(v), 2) for key, v in times.items()}}
    if args.record:
        runs = json.loads(open(args.record).read())["runs"]
        ids = [t for row in runs["ar@t=0"]["ids"] for t in row]
        kept = {str(s): set(stacks[str(s)].hf_model.draft_vocab.ids.tolist()) for s in sizes}
        out["coverage_of_ar_tokens"] = {s: round(sum(t in kept[s] for t in ids) / len(ids), 4) for s in kept}
    for key, ms in out["ms"].items():
        print(f"{key:20s} {ms:8.2f} ms", file=sys.stderr)
    print(json.dumps(out))


if __name__ == "__main__":
    main()

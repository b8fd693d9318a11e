"""Our modes and llama.cpp on the same prompts, interleaved prompt by prompt in one run.

    SERVER=$(bash scripts/build_llama_cpp.sh | tail -1)     # once: builds llama-server (~15 min)
    python scripts/bench_side_by_side.py --server "$SERVER" --config deployments/via_sd.yaml \\
        --num-prompts 20 --max-tokens 128 [--modes sd,ar] [--peer plain,draft]

`bench_llama_cpp.py` and `bench_modes.py` run one side over all prompts, then the other: on a machine whose
speed drifts by 10-25 % from one minute to the next, the ratio of two such runs moves with it. Here
llama-server (each `--peer` setup started once, on loopback, 2 threads, every prompt prefilled whole:
``cache_prompt`` off) and our in-process engine (`--config`) take turns on each prompt, the order of the
sides alternating from one prompt to the next, so a slow spell falls on both. Each side's figure is its
tokens over its seconds, prefill included; the ratios are ours over llama.cpp's best setup, over all
prompts and per prompt. Greedy. Never run by the tests.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_llama_cpp import WARM_UP, complete, emit, start  # noqa: E402

from via_sd_ray.bench import forget_prefixes, policy_for  # noqa: E402
from via_sd_ray.config import load_config  # noqa: E402
from via_sd_ray.core.sampling import SamplingParams  # noqa: E402
from via_sd_ray.data import load_prompts  # noqa: E402
from via_sd_ray.models import registry  # noqa: E402
from via_sd_ray.models.local import LocalEngine  # noqa: E402

PEERS = ("plain", "draft")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", required=True, help="path of the llama-server binary")
    parser.add_argument("--config", required=True, help="our deployment config (deployments/via_sd.yaml)")
    parser.add_argument("--num-prompts", type=int, default=20)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--modes", default="sd,ar", help="our modes, comma-separated (ar, sd, via-sd)")
    parser.add_argument("--peer", default="plain,draft",
                        help="llama.cpp setups: plain (the verifier alone), draft (-md the drafter)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="also write the record here")
    args = parser.parse_args()
    modes = [m for m in args.modes.split(",") if m]
    peers = [p for p in args.peer.split(",") if p]
    if not modes or any(m not in ("ar", "sd", "via-sd") for m in modes):
        parser.error(f"--modes: expected some of ar, sd, via-sd, received {args.modes!r}")
    if not peers or any(p not in PEERS for p in peers):
        parser.error(f"--peer: expected some of {', '.join(PEERS)}, received {args.peer!r}")
    model = str(registry.gguf_file("qwen2.5-coder-1.5b-instruct"))
    draft = str(registry.gguf_file("qwen2.5-coder-0.5b-instruct"))
    texts = load_prompts(args.num_prompts, "bench", None)

    engine = LocalEngine(load_config(args.config, None))
    prompts = [engine.encode(p, chat=True) for p in texts]
    engine.generate(prompts[0], SamplingParams(max_tokens=4), policy_for(engine, modes[0]))  # warm-up
    servers = {}
    try:
        for peer in peers:
            servers[peer] = start(args.server, model, draft if peer == "draft" else None, 1, args.threads, 4096)
            complete(servers[peer][1], WARM_UP, 4, False)

        sides = [f"llama.cpp {p}" for p in peers] + [f"ours {m}" for m in modes]
        tokens = {s: [] for s in sides}
        seconds = {s: [] for s in sides}
        ids = {m: [] for m in modes}
        for i, (text, prompt) in enumerate(zip(texts, prompts)):
            for side in sides if i % 2 == 0 else sides[::-1]:
                kind, name = side.split(" ")
                if kind == "llama.cpp":
                    begin = time.perf_counter()
                    n, _ = complete(servers[name][1], text, args.max_tokens, False)
                    seconds[side].append(time.perf_counter() - begin)
                    tokens[side].append(n)
                else:
                    forget_prefixes(engine)
                    result = engine.generate(prompt, SamplingParams(max_tokens=args.max_tokens, seed=100 + i),
                                             policy_for(engine, name))
                    seconds[side].append(result.elapsed)
                    tokens[side].append(len(result.token_ids))
                    ids[name].append(result.token_ids)
            print(f"prompt {i:2d}: " + ", ".join(f"{s} {tokens[s][-1] / seconds[s][-1]:5.2f}" for s in sides),
                  file=sys.stderr, flush=True)
    finally:
        for process, _ in servers.values():
            process.terminate()
            process.wait(30)

    rate = {s: sum(tokens[s]) / sum(seconds[s]) for s in sides}
    best = max((f"llama.cpp {p}" for p in peers), key=rate.get)
    record = {"server": args.server, "config": args.config, "num_prompts": len(prompts),
              "max_tokens": args.max_tokens, "threads": args.threads, "order": "sides alternate per prompt",
              "tokens_per_s": {s: round(r, 2) for s, r in rate.items()},
              "tokens": {s: sum(t) for s, t in tokens.items()}, "llama_cpp_best": best, "ratios": {}}
    for m in modes:
        side = f"ours {m}"
        per_prompt = [(tokens[side][i] / seconds[side][i]) / (tokens[best][i] / seconds[best][i])
                      for i in range(len(prompts))]
        record["ratios"][m] = {"over_all_prompts": round(rate[side] / rate[best], 3),
                               "per_prompt_median": round(statistics.median(per_prompt), 3),
                               "per_prompt_range": [round(min(per_prompt), 3), round(max(per_prompt), 3)]}
    if len(modes) > 1:
        first = modes[0]
        record["identical_to_" + first] = {m: f"{sum(a == b for a, b in zip(ids[m], ids[first]))}/{len(prompts)}"
                                           for m in modes[1:]}
    for s in sides:
        print(f"{s:18s} {rate[s]:6.2f} tok/s ({sum(tokens[s])} tokens)", file=sys.stderr)
    for m, r in record["ratios"].items():
        print(f"ours {m} / {best}: {r['over_all_prompts']:.3f} (per prompt: median {r['per_prompt_median']:.3f}, "
              f"{r['per_prompt_range'][0]:.3f}-{r['per_prompt_range'][1]:.3f})", file=sys.stderr)
    emit(record, args.json)


if __name__ == "__main__":
    main()

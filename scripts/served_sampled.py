"""Sampled requests (temperature 1, seeded) against a running server, one at a time: tokens/s of sd and via-sd.

    serve run deployments/via_sd.yaml &    # then, once /health answers:
    python scripts/served_sampled.py --num-prompts 4 --max-tokens 64
"""

from __future__ import annotations

import argparse
import json
import time

from openai import OpenAI

from via_sd_ray.data import load_prompts


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--http", default="http://127.0.0.1:8000")
    parser.add_argument("--model", default="qwen2.5-coder-1.5b-via-sd")
    parser.add_argument("--num-prompts", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    client = OpenAI(base_url=f"{args.http}/v1", api_key="none", max_retries=0, timeout=600)
    prompts = load_prompts(args.num_prompts, "bench", None)
    client.chat.completions.create(model=args.model, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    out = {}
    for mode in ("sd", "via-sd"):
        tokens, seconds = 0, 0.0
        for i, prompt in enumerate(prompts):
            start = time.perf_counter()
            reply = client.chat.completions.create(
                model=args.model, messages=[{"role": "user", "content": prompt}], max_tokens=args.max_tokens,
                temperature=1.0, seed=100 + i, extra_body={"via_sd": {"mode": mode}})
            seconds += time.perf_counter() - start
            tokens += reply.usage.completion_tokens
        out[mode] = {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}
    print(json.dumps(out))


if __name__ == "__main__":
    main()

"""llama.cpp side by side: llama-server on the same GGUF files and prompts, plain and with the drafter.

    SERVER=$(bash scripts/build_llama_cpp.sh | tail -1)     # once: builds llama-server (~15 min)
    python scripts/bench_llama_cpp.py --server "$SERVER" --num-prompts 8 --max-tokens 64 --concurrency 1,4

Starts llama-server on loopback for each setup (`plain`: the verifier alone; `draft`: with the drafter,
`-md ... --spec-type draft-simple`), with as many slots as the largest concurrency, sends the ShareGPT
code prompts `via-sd bench` uses through /v1/chat/completions (greedy), and prints end-to-end tokens/s:
at concurrency 1 the prompts one after another (all tokens over all seconds), at c > 1 in groups of c
at once (aggregate). The GGUF files default to the registry's (the ones the via-sd checkpoints come
from). Never run by the tests.

llama-server reuses a slot's cached prompt (``cache_prompt``, on by default): each prompt after the first
finds the chat template's system prefix cached, as our engine's prefix cache does (`via-sd bench-batch`
keeps prefixes within a level). ``--no-cache-prompt`` turns that off, so every prompt is prefilled whole,
as `scripts/bench_modes.py` does (it forgets prefixes before each prompt). The record counts the prompt
tokens llama.cpp took from its cache. The warm-up request is not one of the measured prompts.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from via_sd_ray.data import load_prompts
from via_sd_ray.models import registry

START_TIMEOUT_S = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(server: str, model: str, draft: str | None, slots: int, threads: int, context: int):
    port = free_port()
    cmd = [server, "-m", model, "-t", str(threads), "-tb", str(threads), "-c", str(context * slots),
           "-np", str(slots), "--host", "127.0.0.1", "--port", str(port), "--no-webui"]
    if draft:
        cmd += ["-md", draft, "-td", str(threads), "-tbd", str(threads), "--spec-type", "draft-simple"]
    process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"llama-server exited with {process.returncode}: {process.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        time.sleep(1)
    process.kill()
    raise SystemExit(f"llama-server did not become healthy within {START_TIMEOUT_S} s")


WARM_UP = "Write a Python function that returns the sum of a list."


def complete(url: str, prompt: str, max_tokens: int, cache_prompt: bool) -> tuple[int, int]:
    """(completion tokens, prompt tokens llama.cpp took from its cache)"""
    reply = httpx.post(f"{url}/v1/chat/completions", timeout=600, json={
        "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "temperature": 0,
        "cache_prompt": cache_prompt})
    reply.raise_for_status()
    usage = reply.json()["usage"]
    return usage["completion_tokens"], (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)


def run(url: str, prompts: list[str], max_tokens: int, concurrency: int, cache_prompt: bool) -> dict:
    tokens, cached, seconds = 0, 0, 0.0
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(lambda _: complete(url, WARM_UP, 4, cache_prompt), range(concurrency)))  # warm-up, c at once
        for i in range(0, len(prompts), concurrency):
            group = prompts[i:i + concurrency]
            start_time = time.perf_counter()
            replies = list(pool.map(lambda p: complete(url, p, max_tokens, cache_prompt), group))
            seconds += time.perf_counter() - start_time
            tokens, cached = tokens + sum(r[0] for r in replies), cached + sum(r[1] for r in replies)
    return {"tokens_per_s": tokens / seconds, "tokens": tokens, "seconds": seconds, "cached_prompt_tokens": cached}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", required=True, help="path of the llama-server binary")
    parser.add_argument("--model", help="verifier GGUF (default: the registry's qwen2.5-coder-1.5b-instruct)")
    parser.add_argument("--draft", help="drafter GGUF (default: the registry's qwen2.5-coder-0.5b-instruct)")
    parser.add_argument("--num-prompts", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--concurrency", default="1,4")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-cache-prompt", action="store_true",
                        help="every prompt prefilled whole (llama-server's cache_prompt off)")
    parser.add_argument("--json", help="also write the record here")
    args = parser.parse_args()
    model = args.model or str(registry.gguf_file("qwen2.5-coder-1.5b-instruct"))
    draft = args.draft or str(registry.gguf_file("qwen2.5-coder-0.5b-instruct"))
    levels = [int(c) for c in args.concurrency.split(",")]
    prompts = load_prompts(args.num_prompts, "bench", None)
    record = {"server": args.server, "model": model, "draft": draft, "threads": args.threads,
              "num_prompts": len(prompts), "max_tokens": args.max_tokens, "cache_prompt": not args.no_cache_prompt,
              "runs": {}}
    for setup, drafter in (("plain", None), ("draft", draft)):
        for level in levels:
            # a fresh server per level: no level finds another's prompts in its slots
            process, url = start(args.server, model, drafter, max(levels), args.threads, 4096)
            try:
                result = run(url, prompts, args.max_tokens, level, not args.no_cache_prompt)
            finally:
                process.terminate()
                process.wait(30)
            record["runs"][f"{setup}@c={level}"] = result
            print(f"llama.cpp {setup:5s} c={level}: {result['tokens_per_s']:6.2f} tok/s ({result['tokens']} tokens, "
                  f"{result['cached_prompt_tokens']} prompt tokens cached)", file=sys.stderr, flush=True)
    emit(record, args.json)


def emit(record: dict, path: str | None) -> None:
    """The record to stdout, and to ``path`` where given."""
    print(json.dumps(record, indent=1))
    if path:
        with open(path, "w") as f:
            json.dump(record, f, indent=1)


if __name__ == "__main__":
    main()

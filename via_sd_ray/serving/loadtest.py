"""``via-sd bench-serve``: a serving benchmark against a running application (in the spirit
of vLLM's ``benchmark_serving`` on ShareGPT).

1. Single stream, prompt by prompt, interleaved: the in-process engine (loaded in this
   process while the server idles), gRPC ``GenerateStream`` and HTTP streaming through the
   ``openai`` client. Reports tokens/s of each and the ratios served / in-process, and the
   free-running fidelity of the served (gRPC) and in-process generations against the full
   model alone (``ar``, run in-process, untimed): identical share and identical-prefix fraction.
2. Concurrency sweep over HTTP streaming: for each level c, c client threads send the
   prompts; reports aggregate tokens/s, time to first token and time per output token
   (mean and p50/p90), and throughput relative to c = 1.

JSON record: ``schema: via-sd-bench-serve/1``; ``single_stream.{local,grpc,http}`` and
``concurrency.<c>`` with the fields printed in the tables.
"""

from __future__ import annotations

import json
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from via_sd_ray.core.fidelity import FreeRunning

SCHEMA = "via-sd-bench-serve/1"


@dataclass
class Sample:
    tokens: int
    elapsed: float
    ttft: float
    token_ids: list[int] | None = None

    @property
    def tpot(self) -> float:
        return (self.elapsed - self.ttft) / (self.tokens - 1) if self.tokens > 1 else 0.0


def http_stream(client, model: str, prompt: str, max_tokens: int) -> Sample:
    start, first, tokens = time.perf_counter(), None, 0
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0,
        stream=True, stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content and first is None:
            first = time.perf_counter() - start
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    elapsed = time.perf_counter() - start
    return Sample(tokens, elapsed, first if first is not None else elapsed)


def grpc_stream(stub, pb, prompt: str, max_tokens: int, api_key: str | None = None) -> Sample:
    start, first = time.perf_counter(), None
    request = pb.GenerateRequest(messages=[pb.ChatMessage(role="user", content=prompt)], max_tokens=max_tokens)
    ids = []
    metadata = (("authorization", f"Bearer {api_key}"),) if api_key else None
    for chunk in stub.GenerateStream(request, timeout=600, metadata=metadata):
        if first is None and chunk.token_ids:
            first = time.perf_counter() - start
        ids += chunk.token_ids
    elapsed = time.perf_counter() - start
    return Sample(len(ids), elapsed, first if first is not None else elapsed, ids)


def local_stream(engine, prompt: str, max_tokens: int) -> Sample:
    from via_sd_ray.core.sampling import SamplingParams

    generation = engine.new_generation(engine.encode(prompt, chat=True), SamplingParams(max_tokens=max_tokens))
    start, first = time.perf_counter(), None
    for event in engine.stream(generation):
        if first is None and event.token_ids:
            first = time.perf_counter() - start
    elapsed = time.perf_counter() - start
    return Sample(len(generation.output_ids), elapsed, first if first is not None else elapsed,
                  list(generation.output_ids))


def ar_tokens(engine, prompt: str, max_tokens: int) -> list[int]:
    from via_sd_ray.core.policy import Mode
    from via_sd_ray.core.sampling import SamplingParams

    policy = engine.config.router.policy(mode=Mode.AR)
    return engine.generate(engine.encode(prompt, chat=True), SamplingParams(max_tokens=max_tokens), policy).token_ids


def summarize(samples: list[Sample], wall: float | None = None) -> dict:
    tokens = sum(s.tokens for s in samples)
    busy = wall if wall is not None else sum(s.elapsed for s in samples)
    ttfts = sorted(s.ttft for s in samples)
    tpots = sorted(s.tpot for s in samples if s.tokens > 1)
    return {
        "requests": len(samples), "completion_tokens": tokens, "wall_s": busy,
        "tokens_per_s": tokens / busy if busy else 0.0,
        "ttft_ms_mean": 1000 * statistics.fmean(ttfts), "ttft_ms_p50": 1000 * _pct(ttfts, 50),
        "ttft_ms_p90": 1000 * _pct(ttfts, 90),
        "tpot_ms_mean": 1000 * statistics.fmean(tpots) if tpots else None,
        "tpot_ms_p50": 1000 * _pct(tpots, 50) if tpots else None,
        "tpot_ms_p90": 1000 * _pct(tpots, 90) if tpots else None,
    }


def _pct(values: list[float], q: int) -> float:
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def run_serving_bench(args) -> dict:
    import grpc
    from openai import OpenAI

    from via_sd_ray.config import load_config
    from via_sd_ray.data import load_prompts
    from via_sd_ray.serving.grpc_gen import via_sd_pb2 as pb
    from via_sd_ray.serving.grpc_gen import via_sd_pb2_grpc as pb_grpc

    config = load_config(args.config, args.app)
    prompts = load_prompts(args.num_prompts, "bench", args.prompts)
    levels = [int(c) for c in args.concurrency.split(",")]
    client = OpenAI(base_url=f"{args.http.rstrip('/')}/v1", api_key=args.api_key or "none", max_retries=0,
                    timeout=600)
    channel = grpc.insecure_channel(args.grpc)
    stub = pb_grpc.ViaSDStub(channel)
    model = config.served_model_name
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    http_stream(client, model, prompts[0], 4)  # warm-up of every path
    grpc_stream(stub, pb, prompts[0], 4, args.api_key)
    single = {"grpc": [], "http": []}
    engine = None
    if not args.no_local:
        from via_sd_ray.models.local import LocalEngine

        engine = LocalEngine(config)
        single["local"] = []
        local_stream(engine, prompts[0], 4)
    references = []  # the full model alone, in-process: the reference of free-running fidelity
    for i, prompt in enumerate(prompts):
        if engine is not None:
            single["local"].append(local_stream(engine, prompt, args.max_tokens))
            references.append(ar_tokens(engine, prompt, args.max_tokens))
        single["grpc"].append(grpc_stream(stub, pb, prompt, args.max_tokens, args.api_key))
        single["http"].append(http_stream(client, model, prompt, args.max_tokens))
        log(f"[single {i + 1}/{len(prompts)}] " + ", ".join(
            f"{k} {v[-1].tokens / v[-1].elapsed:.2f} tok/s" for k, v in single.items()))
    del engine  # free its memory before the concurrency sweep
    single_summary = {k: summarize(v) for k, v in single.items()}
    if "local" in single_summary:
        base = single_summary["local"]["tokens_per_s"]
        for k in ("grpc", "http"):
            single_summary[k]["over_local"] = single_summary[k]["tokens_per_s"] / base if base else None
        same = [a.token_ids == b.token_ids for a, b in zip(single["grpc"], single["local"])]
        single_summary["grpc"]["same_tokens_as_local"] = f"{sum(same)}/{len(same)}"
        for k in ("grpc", "local"):
            single_summary[k]["free_running"] = FreeRunning.of(references, [s.token_ids for s in single[k]]).to_dict()
    single_summary["per_prompt_tokens_per_s"] = {
        k: [round(s.tokens / s.elapsed, 3) for s in v] for k, v in single.items()}
    sweep = {}
    for c in levels:
        # a tag per level and request ahead of each prompt: no level finds the prompts of an earlier one in the
        # tiers' prefix caches (the chat template's shared system prompt is still reused, as in real traffic)
        work = [f"(request {c}.{i}) {prompts[i % len(prompts)]}" for i in range(max(len(prompts), 2 * c))]
        lock, samples = threading.Lock(), []

        def one(prompt):
            sample = http_stream(client, model, prompt, args.max_tokens)
            with lock:
                samples.append(sample)

        start = time.perf_counter()
        with ThreadPoolExecutor(c) as pool:
            list(pool.map(one, work))
        sweep[c] = summarize(samples, wall=time.perf_counter() - start)
        log(f"[concurrency {c}] {sweep[c]['tokens_per_s']:.2f} tok/s, TTFT p50 {sweep[c]['ttft_ms_p50']:.0f} ms, "
            f"TPOT p50 {sweep[c]['tpot_ms_p50'] or 0:.0f} ms")
    if levels and sweep[levels[0]]["tokens_per_s"]:
        for c in levels:
            sweep[c]["over_lowest_concurrency"] = sweep[c]["tokens_per_s"] / sweep[levels[0]]["tokens_per_s"]
    channel.close()
    record = {"schema": SCHEMA, "command": " ".join(["via-sd", *sys.argv[1:]]), "num_prompts": len(prompts),
              "max_tokens": args.max_tokens, "mode": config.router.mode.value,
              "single_stream": single_summary, "concurrency": {str(c): v for c, v in sweep.items()}}
    print_tables(record)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(record, indent=2))
    return record


def print_tables(record: dict) -> None:
    print(f"{'single stream':14s} {'tok/s':>7s} {'x local':>8s} {'TTFT ms':>8s} {'TPOT ms':>8s} "
          f"{'ident':>6s} {'prefix':>6s}")
    for k, v in record["single_stream"].items():
        if k == "per_prompt_tokens_per_s":
            continue
        ratio, fr = v.get("over_local"), v.get("free_running") or {}
        ident, prefix = fr.get("identical_share"), fr.get("prefix_fraction")
        print(f"{k:14s} {v['tokens_per_s']:7.2f} {'-' if ratio is None else f'{ratio:.2f}':>8s} "
              f"{v['ttft_ms_p50']:8.0f} {v['tpot_ms_p50'] or 0:8.0f} "
              f"{'-' if ident is None else f'{ident:.2f}':>6s} {'-' if prefix is None else f'{prefix:.3f}':>6s}")
    print(f"{'concurrency':14s} {'tok/s':>7s} {'x c=1':>8s} {'TTFT p50':>8s} {'TTFT p90':>8s} {'TPOT p50':>8s} "
          f"{'TPOT p90':>8s}")
    for c, v in record["concurrency"].items():
        print(f"{c:14s} {v['tokens_per_s']:7.2f} {v.get('over_lowest_concurrency', 0):8.2f} {v['ttft_ms_p50']:8.0f} "
              f"{v['ttft_ms_p90']:8.0f} {v['tpot_ms_p50'] or 0:8.0f} {v['tpot_ms_p90'] or 0:8.0f}")

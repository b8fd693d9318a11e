"""Load and leaks on a real local Ray Serve: a bounded soak of mixed requests at concurrency 16
(completions and chat, streamed and not, some cancelled by the client mid-stream) against tier KV
pools of 8 slots (SERVING_ARGS), so generations queue for slots: no error but 429, no preemption,
then every tier's KV slots and the router's generations are back to zero and memory stayed flat;
a client that disconnects cancels its generation in every tier."""

from __future__ import annotations

import json
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import psutil
from ray import serve

MODEL = "via-sd-tiny"
DEPLOYMENTS = ("Router", "Drafter", "SlimVerifier", "FullVerifier")
TIERS = DEPLOYMENTS[1:]
REQUESTS, CONCURRENCY = 192, 16


def stats(app: str = "via-sd") -> dict[str, dict]:
    return {name: serve.get_deployment_handle(name, app).stats.remote().result(timeout_s=60) for name in DEPLOYMENTS}


def held(app: str = "via-sd") -> dict[str, int]:
    """Generations the router runs, and KV slots each tier holds for running generations."""
    now = stats(app)
    return {"Router": now["Router"]["active_generations"], **{t: now[t]["slots_used"] for t in TIERS}}


def wait_until_nothing_is_held(limit_s: float) -> dict[str, int]:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        now = held()
        if not any(now.values()):
            return now
        time.sleep(0.25)
    return held()


def body(i: int, rng: random.Random) -> tuple[str, dict]:
    chat, stream = rng.random() < 0.5, rng.random() < 0.6
    prompt = f"request {i}: def f{i}(x):"
    payload = {"model": MODEL, "max_tokens": rng.choice([8, 16, 32, 48]), "stream": stream,
               "temperature": rng.choice([0.0, 0.8]), "seed": i,
               "via_sd": {"mode": rng.choice(["ar", "sd", "via-sd", "via-sd"])}}
    if chat:
        return "/v1/chat/completions", {**payload, "messages": [{"role": "user", "content": prompt}]}
    return "/v1/completions", {**payload, "prompt": prompt}


def one(http: httpx.Client, i: int, rng: random.Random) -> str:
    """Sends request i; returns "ok", "cancelled" or a description of an unexpected error."""
    path, payload = body(i, rng)
    if not payload["stream"]:
        reply = http.post(path, json=payload)
        if reply.status_code == 429 and "Retry-After" in reply.headers:
            return "429"
        return "ok" if reply.status_code == 200 and "error" not in reply.json() else f"{reply.status_code} {reply.text}"
    cancel_after = rng.choice([1, 2]) if rng.random() < 0.2 else None
    chunks = 0
    with http.stream("POST", path, json=payload) as reply:
        if reply.status_code == 429 and "Retry-After" in reply.headers:
            return "429"
        if reply.status_code != 200:
            return f"{reply.status_code} {reply.read()[:300]!r}"
        text = ""
        for line in reply.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                # refused for a KV slot before any text went out (the stream's headers precede a generation's
                # first tier call): the in-stream form of a 429; after text it would be a lost generation
                if not text and event["error"].get("code") == "rate_limit_exceeded":
                    return "429"
                return line
            choice = (event.get("choices") or [{}])[0]
            text += choice.get("text") or (choice.get("delta") or {}).get("content") or ""
            chunks += 1
            if cancel_after and chunks >= cancel_after:
                return "cancelled"  # leaving the block closes the connection mid-stream
    return "ok"


def test_soak_mixed_requests_leave_no_caches_and_flat_memory(cluster):
    pids = {name: s["pid"] for name, s in stats().items()}
    processes = {name: psutil.Process(pid) for name, pid in pids.items()}
    memory: list[dict[str, float]] = []
    outcomes: list[str] = []
    lock = threading.Lock()

    def worker(i: int) -> None:
        rng = random.Random(i)
        with httpx.Client(base_url=cluster.http, timeout=120) as http:
            outcome = one(http, i, rng)
        with lock:
            outcomes.append(outcome)
            if len(outcomes) % (REQUESTS // 8) == 0:
                memory.append({name: p.memory_info().rss / 2**20 for name, p in processes.items()})
                print(f"{len(outcomes):4d} requests  RSS MiB " +
                      "  ".join(f"{k} {v:.0f}" for k, v in memory[-1].items()), flush=True)

    with ThreadPoolExecutor(CONCURRENCY) as pool:
        list(pool.map(worker, range(REQUESTS)))
    unexpected = [o for o in outcomes if o not in ("ok", "cancelled", "429")]
    assert unexpected == [], unexpected[:5]
    assert outcomes.count("cancelled") > 10 and outcomes.count("ok") > REQUESTS // 2
    assert wait_until_nothing_is_held(limit_s=20) == {name: 0 for name in DEPLOYMENTS}
    after = stats()
    print(f"outcomes: {sorted((o, outcomes.count(o)) for o in set(outcomes))}; waited for a slot: "
          + ", ".join(f"{t} {after[t]['admitted_after_wait']}" for t in TIERS))
    for tier in TIERS:
        assert after[tier]["slots"] == 8 and after[tier]["preemptions"] == 0, after[tier]
    # 16 clients on 8 slots: generations did queue for a slot (the drafter and full verifier see them all)
    assert after["FullVerifier"]["admitted_after_wait"] + after["Drafter"]["admitted_after_wait"] > 0
    # no replica died and was replaced during the soak, and memory is flat across its second half
    assert {name: s["pid"] for name, s in stats().items()} == pids
    half = len(memory) // 2
    for name in DEPLOYMENTS:
        growth = memory[-1][name] - memory[half][name]
        assert growth < 64, f"{name} grew by {growth:.0f} MiB over the second half: {[m[name] for m in memory]}"


def test_a_client_that_disconnects_cancels_its_generation_in_every_tier(cluster):
    assert wait_until_nothing_is_held(limit_s=20) == {name: 0 for name in DEPLOYMENTS}
    # every block: drafter -> slim verifier, which escalates it to the full verifier (all three hold caches)
    payload = {"model": MODEL, "prompt": "def slow(x):", "max_tokens": 250, "ignore_eos": True, "stream": True,
               "temperature": 0, "via_sd": {"direct_threshold": 1.0, "slim_threshold": 0.0,
                                            "escalate_threshold": 1.0}}
    with httpx.Client(base_url=cluster.http, timeout=60) as http, \
            http.stream("POST", "/v1/completions", json=payload) as reply:
        for n, _ in enumerate(reply.iter_lines()):
            if n == 4:
                now = held()
                assert now == {name: 1 for name in DEPLOYMENTS}, now  # it is running, with a cache in every tier
                break
    # well before the replicas' idle expiry (cache_idle_timeout_s, 60 s): the cancellation released them
    assert wait_until_nothing_is_held(limit_s=10) == {name: 0 for name in DEPLOYMENTS}

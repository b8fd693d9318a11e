"""The served application over real loopback clients: the `openai` package, gRPC stubs, raw HTTP."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import httpx
import pytest
from openai import OpenAI

from via_sd_ray.core.sampling import SamplingParams
from via_sd_ray.serving.grpc_gen import via_sd_pb2 as pb
from via_sd_ray.serving.grpc_gen import via_sd_pb2_grpc as pb_grpc

MODEL = "via-sd-tiny"
PROMPTS = ["def fibonacci(n):", "Write a haiku about caches.", "import numpy as np\n"]


def reference(engine, prompt: str, chat: bool, max_tokens: int, mode: str = "via-sd") -> list[int]:
    ids = engine.encode(prompt, chat=chat)
    policy = engine.config.router.policy(mode=mode)
    return engine.generate(ids, SamplingParams(max_tokens=max_tokens), policy).token_ids


@pytest.fixture(scope="module")
def client(cluster):
    return OpenAI(base_url=f"{cluster.http}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def stub(cluster):
    channel = grpc.insecure_channel(cluster.grpc)
    yield pb_grpc.ViaSDStub(channel)
    channel.close()


@pytest.mark.parametrize("mode", ["ar", "sd", "via-sd"])
def test_openai_completions_equal_in_process_engine(client, local_engine, mode):
    for prompt in PROMPTS[:2]:
        want = reference(local_engine, prompt, chat=False, max_tokens=24, mode=mode)
        plain = client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0,
                                          extra_body={"via_sd": {"mode": mode, "return_token_ids": True}})
        assert plain.choices[0].model_extra["token_ids"] == want
        assert plain.usage.completion_tokens == len(want)
        assert plain.usage.model_extra["via_sd"]["mode"] == mode
        streamed, text = [], ""
        for chunk in client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0,
                                               stream=True, extra_body={"via_sd": {"mode": mode,
                                                                                   "return_token_ids": True}}):
            streamed += chunk.choices[0].model_extra.get("token_ids") or []
            text += chunk.choices[0].text
        assert streamed == want
        assert text == plain.choices[0].text == local_engine.decode(want)


def test_openai_chat_plain_and_streaming(client, local_engine):
    want = reference(local_engine, PROMPTS[1], chat=True, max_tokens=20)
    messages = [{"role": "user", "content": PROMPTS[1]}]
    plain = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0,
                                           extra_body={"via_sd": {"return_token_ids": True}})
    assert plain.choices[0].model_extra["token_ids"] == want
    assert plain.choices[0].message.role == "assistant"
    stats = plain.usage.model_extra["via_sd"]
    assert sum(stats["tier_blocks"].values()) == stats["blocks"] > 0
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == len(want)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")


def test_grpc_unary_and_streaming_equal_in_process_engine(stub, local_engine):
    for mode in ("sd", "via-sd"):
        want = reference(local_engine, PROMPTS[0], chat=False, max_tokens=24, mode=mode)
        request = pb.GenerateRequest(prompt=PROMPTS[0], max_tokens=24, mode=mode)
        unary = stub.Generate(request, timeout=60)
        assert list(unary.token_ids) == want
        assert unary.usage.completion_tokens == len(want) and unary.stats.mode == mode
        chunks = list(stub.GenerateStream(request, timeout=60))
        assert [t for c in chunks for t in c.token_ids] == want
        assert chunks[-1].finish_reason and chunks[-1].stats.blocks == unary.stats.blocks
        assert "".join(c.text for c in chunks) == unary.text
    chat = stub.Generate(pb.GenerateRequest(messages=[pb.ChatMessage(role="user", content=PROMPTS[1])],
                                            max_tokens=20), timeout=60)
    assert list(chat.token_ids) == reference(local_engine, PROMPTS[1], chat=True, max_tokens=20)


def test_eight_concurrent_generations_equal_sequential(client, local_engine):
    prompts = [f"{p} #{i}" for i in range(3) for p in PROMPTS][:8]

    def run(prompt):
        out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=32, temperature=0,
                                        extra_body={"via_sd": {"return_token_ids": True}})
        return out.choices[0].model_extra["token_ids"]

    with ThreadPoolExecutor(8) as pool:
        concurrent = list(pool.map(run, prompts))
    sequential = [run(p) for p in prompts]
    assert concurrent == sequential
    assert concurrent == [reference(local_engine, p, chat=False, max_tokens=32) for p in prompts]


def test_models_and_health(cluster):  # bad requests: test_bad_input.py
    with httpx.Client(base_url=cluster.http, timeout=30) as http:
        assert http.get("/health").json()["status"] == "ok"
        assert http.get("/v1/models").json()["data"][0]["id"] == MODEL
        ok = http.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 3, "temperature": 0})
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3


def test_serve_status_lists_every_deployment(cluster):
    env = {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "token")}
    out = subprocess.run([sys.executable, "-m", "ray.serve.scripts", "status", "-a", cluster.dashboard],
                         capture_output=True, text=True, timeout=60, env=env)
    if out.returncode != 0:  # clusters without token auth
        env.pop("RAY_AUTH_MODE")
        out = subprocess.run([sys.executable, "-m", "ray.serve.scripts", "status", "-a", cluster.dashboard],
                             capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0, out.stderr
    for name in ("Ingress", "Router", "Drafter", "SlimVerifier", "FullVerifier"):
        assert f"{name}:" in out.stdout, out.stdout


def test_prometheus_scrape_shows_tier_metrics(cluster, client):
    client.completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=16, temperature=0)
    wanted = ["via_sd_blocks_total", "via_sd_tier_latency_ms", "via_sd_cache_events_total",
              "via_sd_accepted_tokens_total", "via_sd_position_proposed_total"]
    deadline, text = time.monotonic() + 60, ""
    while time.monotonic() < deadline:
        text = httpx.get(f"http://127.0.0.1:{cluster.metrics_port}/metrics", timeout=10).text
        if all(name in text for name in wanted):
            break
        time.sleep(1)
    missing = [name for name in wanted if name not in text]
    assert not missing, missing
    # Ray prefixes application metrics with "ray_"
    tiers = {line.split('tier="')[1].split('"')[0] for line in text.splitlines()
             if line.startswith("ray_via_sd_tier_latency_ms_count")}
    assert {"drafter", "full"} <= tiers
    decided = {line.split('tier="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("ray_via_sd_blocks_total")}
    assert sum(decided.values()) > 0 and set(decided) <= {"direct", "slim", "full"}


def test_bench_serve_reports_free_running_fidelity_of_the_served_tokens(cluster, tmp_path, capsys):
    """`via-sd bench-serve` against the running app: served tokens equal the in-process engine's, and the
    served generations are scored free-running against the full model alone (ar)."""
    import json

    import yaml

    from tests.serving.conftest import SERVING_ARGS
    from via_sd_ray.cli import main

    config, prompts, out = tmp_path / "app.yaml", tmp_path / "prompts.json", tmp_path / "serve.json"
    config.write_text(yaml.safe_dump(SERVING_ARGS))
    prompts.write_text(json.dumps(PROMPTS[:2]))
    assert main(["bench-serve", "--config", str(config), "--http", cluster.http, "--grpc", cluster.grpc,
                 "--num-prompts", "2", "--max-tokens", "12", "--concurrency", "1", "--prompts", str(prompts),
                 "--json", str(out)]) == 0
    single = json.loads(out.read_text())["single_stream"]
    assert single["grpc"]["same_tokens_as_local"] == "2/2"
    for k in ("grpc", "local"):
        fr = single[k]["free_running"]
        assert fr["generations"] == 2 and 0.0 <= fr["prefix_fraction"] <= 1.0
    assert single["grpc"]["free_running"] == single["local"]["free_running"]
    assert "prefix" in capsys.readouterr().out

"""SmolLM2-135M-Instruct on the DeepSpeed engine: one rank gives the greedy tokens of the hf engine in
ar, sd and via-sd (slim verifier included); two ranks over Ray, an uneven split of its 3 KV heads,
give the tokens of one. Run with ``pytest -m slow`` (needs ``via-sd models pull smollm2-135m-instruct``
and deepspeed)."""

from __future__ import annotations

import importlib.util
import json

import pytest

from via_sd_ray.core.policy import RouterPolicy
from via_sd_ray.core.sampling import SamplingParams
from via_sd_ray.models import registry

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not registry.is_pulled("smollm2-135m-instruct"), reason="smollm2-135m-instruct is not pulled"),
    pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed"),
]

MODEL = "smollm2-135m-instruct"
SLIM_LAYERS = list(range(0, 24)) + [27, 29]  # of 30
PROMPTS = ["Write a Python function that returns the n-th Fibonacci number.", "List three facts about the Moon."]
MAX_TOKENS = 48
POLICIES = [RouterPolicy(mode="ar"), RouterPolicy(mode="sd", block_size=4), RouterPolicy(mode="via-sd", block_size=4),
            RouterPolicy(mode="via-sd", block_size=4, lossless=True, slim_threshold=0.0)]


def engine_on(engine: str):
    from via_sd_ray.config import parse_config
    from via_sd_ray.models.local import LocalEngine

    model = {"source": MODEL, "dtype": "float32"}
    return LocalEngine(parse_config({
        "models": {"drafter": {**model, "quantization": "none"}, "verifier": {**model, "engine": engine}},
        "slim": {"layers": SLIM_LAYERS},
    }))


def test_one_rank_gives_the_greedy_tokens_of_hf():
    hf, ds = engine_on("hf"), engine_on("deepspeed")
    slim_blocks = 0
    for prompt in PROMPTS:
        ids = hf.encode(prompt, chat=True)
        for policy in POLICIES:
            expected = hf.generate(ids, SamplingParams(max_tokens=MAX_TOKENS), policy)
            got = ds.generate(ids, SamplingParams(max_tokens=MAX_TOKENS), policy)
            assert got.token_ids == expected.token_ids, (prompt, policy)
            slim_blocks += got.stats.tier_blocks["slim"]
    assert slim_blocks > 0


@pytest.mark.scenario("tests.serving.tp_scenario", "smollm2")
def test_two_ranks_over_ray_give_the_tokens_of_one(scenario):
    code, record, log = scenario(timeout_s=900)
    print(json.dumps(record, indent=1)[:4000])
    assert code == 0, log
    assert record["tp2_info"]["kv_heads"] == 2  # rank 0's share of 3 KV heads (rank 1 holds 1)
    assert record["mismatches"] == {} and record["compared"] == 8
    assert record["check_after_kill"].startswith("ShardFailure")

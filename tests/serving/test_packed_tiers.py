"""Tier replicas over packed (int4) tiny models on the CPU: the tiers run every decoder layer of a pass in the
native C++ loop (``decoder.NativeLayers``), and the served tokens are the in-process engine's through the
Python layer plans, for one request and for several at once (batched passes, attention row by row over each
generation's cache)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
from openai import OpenAI

from tests.serving.apps import deployed, tiny_args
from via_sd_ray.config import parse_config
from via_sd_ray.core.sampling import SamplingParams
from via_sd_ray.models import qmm
from via_sd_ray.models.local import LocalEngine

pytestmark = pytest.mark.skipif(qmm.available() is not None, reason="the qmm kernel cannot be built here")

PROMPTS = ["def fibonacci(n):", "Write a haiku about caches.", "import numpy as np\n", "SELECT * FROM"]


def packed_args() -> dict:
    args = tiny_args()
    args["served_model_name"] = "via-sd-tiny-int4"
    args["models"] = {name: {"source": f"tiny-random:{name}", "dtype": "float32", "precision": "int4"}
                      for name in ("drafter", "verifier")}
    return args


def test_packed_tiers_serve_the_in_process_engines_tokens(cluster):
    args = packed_args()
    engine = LocalEngine(parse_config(args))
    stacks = [engine.drafter.stack, engine.slim.stack, engine.full.stack]
    for stack in stacks:  # a pass builds the plans and the native loop's arguments
        stack.forward([5, 6, 7], stack.new_cache(), 1)
    assert all(stack.native is not None for stack in stacks)  # the tiers of this config take the native loop
    for stack in stacks:  # the reference: the Python layer plans
        stack.native = None
    want = {}
    for mode in ("ar", "via-sd"):
        policy = engine.config.router.policy(mode=mode)
        want[mode] = [engine.generate(engine.encode(p), SamplingParams(max_tokens=24), policy).token_ids
                      for p in PROMPTS]
    with deployed(cluster, "int4", args) as app:
        client = OpenAI(base_url=f"{app.http}/v1", api_key="unused", max_retries=0, timeout=120)

        def served(prompt: str, mode: str) -> list[int]:
            out = client.completions.create(model="via-sd-tiny-int4", prompt=prompt, max_tokens=24, temperature=0,
                                            extra_body={"via_sd": {"mode": mode, "return_token_ids": True}})
            return out.choices[0].model_extra["token_ids"]

        for mode in ("ar", "via-sd"):
            assert [served(p, mode) for p in PROMPTS] == want[mode], mode
            with ThreadPoolExecutor(len(PROMPTS)) as pool:  # at once: the tiers batch them into shared passes
                assert list(pool.map(lambda p: served(p, mode), PROMPTS)) == want[mode], mode

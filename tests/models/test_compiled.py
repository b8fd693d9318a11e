"""Compiled passes (``compile: on``): the same logits, tokens and cache contents as the eager stack."""

from __future__ import annotations

import pytest
import torch

from via_sd_ray.core.policy import RouterPolicy
from via_sd_ray.core.sampling import SamplingParams
from via_sd_ray.errors import ConfigError
from via_sd_ray.models.decoder import DecoderStack, keep_layers
from via_sd_ray.models.tiers import compiled
from via_sd_ray.models.tiny import tiny_model

PROMPTS = ["hello world", "def add(a, b):\n    return a + b\n"]
MAX_TOKENS = 20


def stack_and_pool(slots: int = 4, slot_tokens: int = 128):
    stack = DecoderStack(keep_layers(tiny_model("verifier"), [0, 1]))
    return stack, stack.new_pool(slots, slot_tokens)


@pytest.fixture(scope="module")
def compiled_stack():
    stack, pool = stack_and_pool()
    stack.compile(pool, max_rows=3)
    return stack, pool


def test_a_compiled_pass_of_ragged_rows_equals_the_eager_pass(compiled_stack):
    stack, pool = compiled_stack
    eager, eager_pool = stack_and_pool()
    prompts = [list(range(3, 40)), list(range(50, 59)), [7]]  # prefills: longer than max_tokens runs eagerly
    steps = [[[5, 6, 7], [8], [9, 10, 11, 12, 13]],  # ragged rows: the shorter ones padded
             [[1], [2], [3]],
             [torch.tensor([4]), [5, 6], torch.tensor([7, 8])]]  # device tensors, as drafts feed them
    for s, p in ((stack, pool), (eager, eager_pool)):
        caches = [p.cache(i) for i in range(3)]
        s.forward_batch(prompts, caches, [1, 1, 1])
        s.outputs = [s.forward_batch(rows, caches, [len(r) for r in rows]) for rows in steps]
        s.caches = caches
    calls = stack.compiled.calls
    assert calls >= len(steps)  # the decode-shaped passes ran compiled
    for got, want in zip(stack.outputs, eager.outputs):
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)
    for c, e in zip(stack.caches, eager.caches):  # every row's keys and values where the eager pass put them
        assert c.token_ids[:40] == e.token_ids[:40] and len(c) == len(e)
        torch.testing.assert_close(c.data[..., : len(c), :], e.data[..., : len(e), :], rtol=1e-4, atol=1e-4)


def test_caches_outside_the_pool_and_rows_past_max_tokens_run_eagerly(compiled_stack):
    stack, pool = compiled_stack
    calls = stack.compiled.calls
    own = stack.new_cache()
    stack.forward_batch([[1, 2, 3]], [own], [1])
    stack.forward_batch([list(range(40))], [pool.cache(3)], [1])
    assert stack.compiled.calls == calls


def test_compile_on_is_an_error_where_a_stack_cannot_be_compiled():
    stack, _ = stack_and_pool()
    assert not compiled("auto", stack, "full")  # a CPU stack: auto is off
    assert compiled("on", stack, "full")
    stack.mirrored = True  # as a tensor-parallel stack
    assert not compiled("auto", stack, "full")
    with pytest.raises(ConfigError, match="models.verifier.compile.*tensor-parallel"):
        compiled("on", stack, "full")


@pytest.fixture(scope="module")
def engines(build_tiny_engine):
    """The tiny float64 engine eager and with every tier compiled."""
    models = {"drafter": {"source": "tiny-random:drafter", "dtype": "float64", "quantization": "none"},
              "verifier": {"source": "tiny-random:verifier", "dtype": "float64"}}
    on = {name: {**cfg, "compile": "on"} for name, cfg in models.items()}
    return build_tiny_engine(models=models), build_tiny_engine(models=on)


@pytest.mark.parametrize("mode", ["ar", "sd", "via-sd"])
def test_compiled_tiers_generate_what_the_eager_ones_do(engines, mode):
    eager, fast = engines
    policy = RouterPolicy(mode=mode, block_size=4, lossless=mode == "via-sd")
    for text in PROMPTS:
        ids = eager.encode(text)
        for params in (SamplingParams(max_tokens=MAX_TOKENS),
                       SamplingParams(max_tokens=MAX_TOKENS, temperature=1.0, seed=3)):
            want = eager.generate(ids, params, RouterPolicy(mode="ar") if params.greedy else policy)
            got = fast.generate(ids, params, policy)
            if params.greedy:
                assert got.token_ids == want.token_ids, (text, mode)
            else:  # the same seed draws the same tokens from the same logits
                assert got.token_ids == eager.generate(ids, params, policy).token_ids, (text, mode)
    runs = [fast.full, fast.slim] + ([fast.drafter] if mode != "ar" else [])
    assert all(r.stack.compiled is not None for r in runs)
    assert fast.full.stack.compiled.calls > 0

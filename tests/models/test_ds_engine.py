"""The DeepSpeed engine of the verifier tiers, one rank: the same greedy tokens as the hf engine in
every mode, the slim verifier on the same engine, and config errors that name the field."""

from __future__ import annotations

import pytest

from via_sd_ray.config import parse_config
from via_sd_ray.core.policy import RouterPolicy
from via_sd_ray.core.sampling import SamplingParams
from via_sd_ray.errors import ConfigError

deepspeed = pytest.importorskip("deepspeed", reason="deepspeed is not installed (pip install 'via-sd-ray[deepspeed]')")

PROMPTS = ["a", "hello world", "def add(a, b):\n    return a + b\n\nprint(add(1, 2))"]
MAX_TOKENS = 24
POLICIES = {
    "ar": RouterPolicy(mode="ar"),
    "sd": RouterPolicy(mode="sd", block_size=4),
    "via-sd": RouterPolicy(mode="via-sd", block_size=4),  # lossy: direct commits too
    "via-sd-lossless-slim": RouterPolicy(mode="via-sd", block_size=4, lossless=True, slim_threshold=0.0),
}


def tiny_args(engine: str, **verifier) -> dict:
    # float32: DeepSpeed inference takes no float64
    return {
        "models": {"drafter": {"source": "tiny-random:drafter", "dtype": "float32", "quantization": "none"},
                   "verifier": {"source": "tiny-random:verifier", "dtype": "float32", "engine": engine, **verifier}},
        "slim": {"layers": [0, 1, 3]},
    }


@pytest.fixture(scope="module")
def engines():
    from via_sd_ray.models.local import LocalEngine

    return LocalEngine(parse_config(tiny_args("hf"))), LocalEngine(parse_config(tiny_args("deepspeed")))


def test_deepspeed_wraps_the_one_verifier_model_both_verifier_tiers_run(monkeypatch):
    from via_sd_ray.models import ds_engine
    from via_sd_ray.models.local import LocalEngine

    wrapped = []
    monkeypatch.setattr(ds_engine, "wrap", lambda model, tp: wrapped.append((model, tp)) or model)
    engine = LocalEngine(parse_config(tiny_args("deepspeed")))
    assert [tp for _, tp in wrapped] == [1]  # one model, loaded and wrapped once
    assert engine.full.stack.hf_model is engine.slim.stack.hf_model is wrapped[0][0]
    assert len(engine.slim.stack.layers) == 3 and len(engine.full.stack.layers) == 4


@pytest.mark.parametrize("mode", list(POLICIES))
def test_deepspeed_one_rank_gives_the_greedy_tokens_of_hf(engines, mode):
    hf, ds = engines
    tiers = {"direct": 0, "slim": 0, "full": 0}
    for text in PROMPTS:
        ids = hf.encode(text)
        expected = hf.generate(ids, SamplingParams(max_tokens=MAX_TOKENS), POLICIES[mode])
        got = ds.generate(ids, SamplingParams(max_tokens=MAX_TOKENS), POLICIES[mode])
        assert got.token_ids == expected.token_ids, text
        assert got.stats.tier_blocks == expected.stats.tier_blocks
        tiers = {t: n + got.stats.tier_blocks[t] for t, n in tiers.items()}
    if mode.startswith("via-sd"):
        assert tiers["slim"] > 0  # the slim verifier took part


def test_slim_only_tier_loads_its_layers_on_the_deepspeed_engine(engines):
    from via_sd_ray.models.tiers import build_tier

    hf, _ = engines
    runner = build_tier(parse_config(tiny_args("deepspeed")), "slim")
    assert len(runner.stack.layers) == 3 and runner.stack.hf_model.config.num_hidden_layers == 3
    ids = hf.encode("hello world")
    cache_ref, cache = hf.slim.stack.new_cache(), runner.stack.new_cache()
    assert (runner.stack(ids, cache, len(ids)) == hf.slim.stack(ids, cache_ref, len(ids))).all()


@pytest.mark.parametrize(("verifier", "expected"), [
    ({"engine": "hf", "tensor_parallel_size": 2}, "tensor_parallel_size: expected 1 with engine 'hf'"),
    ({"engine": "deepspeed", "dtype": "float64"}, "dtype: expected float32, bfloat16 or float16"),
    ({"engine": "deepspeed", "tensor_parallel_size": 2, "quantization": "int8-weight-only"},
     "precision: expected 'auto' or 'bf16' with engine 'deepspeed'"),
    ({"engine": "deepspeed", "precision": "gguf"}, "precision: expected 'auto' or 'bf16' with engine 'deepspeed'"),
])
def test_config_names_what_the_engine_cannot_do(verifier, expected):
    with pytest.raises(ConfigError, match=expected):
        parse_config({"models": {"verifier": {"source": "tiny-random:verifier", **verifier}}})


def test_several_ranks_need_a_launcher():
    from via_sd_ray.models.local import LocalEngine

    config = parse_config(tiny_args("deepspeed", tensor_parallel_size=2))
    with pytest.raises(ConfigError, match="tensor_parallel_size: expected 1 in a single process, received 2"):
        LocalEngine(config)


def test_a_launcher_error_reaches_the_caller():
    from via_sd_ray.models.tiers import verifier_stacks

    class Launcher:
        def address(self):
            return "127.0.0.1"

        def start(self, spec):
            assert spec.rendezvous.world_size == 2 and spec.stacks == {"full": None}
            raise ConfigError("serving.deployments.FullVerifier.placement_group_bundles: expected 2 bundles")

    with pytest.raises(ConfigError, match="expected 2 bundles"):
        verifier_stacks(parse_config(tiny_args("deepspeed", tensor_parallel_size=2)), {"full": None}, None, Launcher())

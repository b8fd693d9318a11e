"""SmolLM2-135M-Instruct from the offline registry: greedy sd and lossless via-sd equal ar and
Hugging Face generate. Run with ``pytest -m slow`` (needs ``via-sd models pull smollm2-135m-instruct``)."""

from __future__ import annotations

import pytest
import torch

from via_sd_ray.core.policy import RouterPolicy
from via_sd_ray.core.sampling import SamplingParams
from via_sd_ray.models import registry

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not registry.is_pulled("smollm2-135m-instruct"), reason="smollm2-135m-instruct is not pulled"),
]

MODEL = "smollm2-135m-instruct"
SLIM_LAYERS = list(range(0, 24)) + [27, 29]  # of 30
PROMPTS = [
    "Write a Python function that returns the n-th Fibonacci number.",
    "List three facts about the Moon.",
]
MAX_TOKENS = 48


def engine_with(drafter: dict):
    from via_sd_ray.config import parse_config
    from via_sd_ray.models.local import LocalEngine

    return LocalEngine(parse_config({
        # the float checkpoint: Hugging Face generate is the reference (tests/slow/test_gguf_real.py: int4)
        "models": {"drafter": drafter, "verifier": {"source": MODEL, "dtype": "float32", "precision": "bf16"}},
        "slim": {"layers": SLIM_LAYERS},
    }))


@pytest.fixture(scope="module", params=["same-model-drafter", "prompt-lookup"])
def engine(request):
    drafter = {"source": MODEL, "dtype": "float32", "precision": "bf16"} if request.param == "same-model-drafter" else {
        "source": "prompt-lookup"}
    return engine_with(drafter)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_sd_and_lossless_via_sd_equal_ar_and_hugging_face(engine, prompt):
    ids = engine.encode(prompt, chat=True)
    greedy = SamplingParams(max_tokens=MAX_TOKENS)
    ar = engine.generate(ids, greedy, RouterPolicy(mode="ar")).token_ids

    input_ids = torch.tensor([ids])
    eos = list(engine.eos_token_ids)
    with torch.inference_mode():
        hf = engine.verifier_model.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                                            max_new_tokens=MAX_TOKENS, eos_token_id=eos, pad_token_id=eos[0])
    assert ar == hf[0, len(ids):].tolist()

    slim_blocks = 0
    for policy in (RouterPolicy(mode="sd", block_size=4),
                   RouterPolicy(mode="via-sd", block_size=4, lossless=True),
                   RouterPolicy(mode="via-sd", block_size=4, lossless=True, slim_threshold=0.0)):
        result = engine.generate(ids, greedy, policy)
        assert result.token_ids == ar, policy
        slim_blocks += result.stats.tier_blocks["slim"]
    assert slim_blocks > 0

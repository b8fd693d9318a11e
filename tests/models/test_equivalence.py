"""Greedy sd and lossless via-sd emit exactly the full model's greedy tokens; seeds reproduce samples."""

from __future__ import annotations

import pytest
import torch

from via_sd_ray.core.engine import VerifyCall
from via_sd_ray.core.policy import RouterPolicy, Tier
from via_sd_ray.core.sampling import SamplingParams

PROMPTS = ["a", "hello world", "def add(a, b):\n    return a + b\n\nprint(add(1, 2))"]
BLOCK_SIZES = [1, 2, 4, 7]
MAX_TOKENS = 24


def policies(block_size: int) -> dict[str, RouterPolicy]:
    return {
        "sd": RouterPolicy(mode="sd", block_size=block_size),
        "via-sd": RouterPolicy(mode="via-sd", block_size=block_size, lossless=True),
        # every block short of direct goes to the slim verifier first
        "via-sd-slim": RouterPolicy(mode="via-sd", block_size=block_size, lossless=True, slim_threshold=0.0),
    }


def hf_greedy(engine, prompt_ids: list[int], max_tokens: int, eos: list[int]) -> list[int]:
    ids = torch.tensor([prompt_ids])
    out = engine.verifier_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                                         do_sample=False, eos_token_id=eos, pad_token_id=eos[0])
    return out[0, len(prompt_ids):].tolist()


@pytest.fixture(scope="module")
def references(tiny_engine):
    """Per prompt: its ids and the full model's greedy continuation, from the engine alone (ar)."""
    refs = {}
    for text in PROMPTS:
        ids = tiny_engine.encode(text)
        refs[text] = ids, tiny_engine.generate(ids, SamplingParams(max_tokens=MAX_TOKENS), RouterPolicy(mode="ar"))
    return refs


@pytest.mark.parametrize("text", PROMPTS)
def test_ar_equals_hugging_face_generate(tiny_engine, references, text):
    ids, ar = references[text]
    assert ar.token_ids == hf_greedy(tiny_engine, ids, MAX_TOKENS, list(tiny_engine.eos_token_ids))


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_greedy_sd_and_lossless_via_sd_equal_ar(tiny_engine, references, block_size):
    slim_blocks = 0
    for text, (ids, ar) in references.items():
        for name, policy in policies(block_size).items():
            result = tiny_engine.generate(ids, SamplingParams(max_tokens=MAX_TOKENS), policy)
            assert result.token_ids == ar.token_ids, (text, name)
            assert result.finish_reason == ar.finish_reason
            assert result.stats.tier_blocks["direct"] == 0
            slim_blocks += result.stats.tier_blocks["slim"]
    assert slim_blocks > 0  # the slim verifier took part, and the full verifier corrected it where needed


def test_eos_inside_a_block_ends_the_generation_exactly_there(tiny_engine, references, monkeypatch):
    verdicts = []  # full verdicts: (committed tokens before the block, accepted, tokens offered)

    def dispatch(call, times, _dispatch=tiny_engine._dispatch):
        reply = _dispatch(call, times)
        if isinstance(call, VerifyCall) and call.tier is Tier.FULL:
            verdicts.append((len(call.committed), reply.accepted, reply.tokens(call.block)))
        return reply

    monkeypatch.setattr(tiny_engine, "_dispatch", dispatch)
    tested = 0
    for ids, ar in references.values():
        reference = ar.token_ids
        verdicts.clear()
        tiny_engine.generate(ids, SamplingParams(max_tokens=MAX_TOKENS), RouterPolicy(mode="sd", block_size=4))
        # output positions holding an accepted draft token that its verdict offered more tokens after
        inside = [start - len(ids) + i for start, accepted, _ in verdicts for i in range(accepted)]
        firsts = [j for j in inside if j >= 2 and reference[j] not in reference[:j]]
        if not firsts:
            continue
        at, tested = firsts[0], tested + 1
        end = SamplingParams(max_tokens=MAX_TOKENS, stop_token_ids=(reference[at],))
        assert hf_greedy(tiny_engine, ids, MAX_TOKENS, [reference[at]]) == reference[: at + 1]
        verdicts.clear()
        assert tiny_engine.generate(ids, end, RouterPolicy(mode="sd", block_size=4)).token_ids == reference[: at + 1]
        start, _, offered = verdicts[-1]
        assert start + len(offered) > len(ids) + at + 1  # the last verdict went on past the end token
        for block_size in BLOCK_SIZES:
            for name, policy in policies(block_size).items():
                result = tiny_engine.generate(ids, end, policy)
                assert result.token_ids == reference[: at + 1], (name, block_size)
                assert result.finish_reason == "stop"
    assert tested >= 2


@pytest.mark.parametrize("policy", [RouterPolicy(mode="via-sd"), RouterPolicy(mode="sd"),
                                    RouterPolicy(mode="via-sd", lossless=True)], ids=["via-sd", "sd", "lossless"])
def test_a_seed_reproduces_a_sampled_generation(tiny_engine, references, policy):
    ids = references["hello world"][0]

    def sample(seed):
        return tiny_engine.generate(ids, SamplingParams(max_tokens=MAX_TOKENS, temperature=1.0, seed=seed),
                                    policy).token_ids

    first = sample(7)
    assert sample(7) == first
    assert sample(8) != first


@pytest.fixture(scope="module")
def lookup_engine(build_tiny_engine):
    verifier = {"source": "tiny-random:verifier", "dtype": "float64"}
    return build_tiny_engine(models={"drafter": {"source": "prompt-lookup"}, "verifier": verifier})


def test_prompt_lookup_drafts_keep_greedy_output_exact(lookup_engine):
    ids = lookup_engine.encode("the cat sat on the mat. the cat sat on the mat. the cat")
    ar = lookup_engine.generate(ids, SamplingParams(max_tokens=MAX_TOKENS), RouterPolicy(mode="ar"))
    proposed = 0
    for name, policy in policies(4).items():
        result = lookup_engine.generate(ids, SamplingParams(max_tokens=MAX_TOKENS), policy)
        assert result.token_ids == ar.token_ids, name
        proposed += result.stats.proposed
    assert proposed > 0


@pytest.mark.parametrize("block_size", [2, 4])
def test_deferred_check_makes_greedy_via_sd_equal_ar_for_every_threshold(tiny_engine, references, block_size):
    """Real runners (KV rollback of held tokens, catch-up), float64: every threshold setting keeps ar's tokens."""
    held = 0
    for direct in (0.0, 0.05, 0.3, 0.9):
        for slim in (0.0, direct):
            for score in ("min", "prod"):
                policy = RouterPolicy(mode="via-sd", block_size=block_size, direct_threshold=direct,
                                      slim_threshold=slim, escalate_threshold=0.5, score=score,
                                      deferred_check=True)
                for text, (ids, ar) in references.items():
                    result = tiny_engine.generate(ids, SamplingParams(max_tokens=MAX_TOKENS), policy)
                    assert result.token_ids == ar.token_ids, (text, direct, slim, score)
                    assert result.finish_reason == ar.finish_reason
                    held += result.stats.tier_blocks["direct"] + result.stats.tier_blocks["slim"]
    assert held > 0

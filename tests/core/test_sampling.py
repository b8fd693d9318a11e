"""warp(): temperature, top-k, top-p; SamplingParams validation; seeds derived per call."""

from __future__ import annotations

import pytest
import torch

from via_sd_ray.core.sampling import SamplingParams, derive_seed, sampled_proposal, top_k_proposal, warp
from via_sd_ray.errors import InvalidRequest

PROBS = torch.tensor([[0.5, 0.3, 0.15, 0.05]])  # [1, V]
LOGITS = PROBS.log()


def sampled(**kw) -> SamplingParams:
    return SamplingParams(max_tokens=8, temperature=kw.pop("temperature", 1.0), **kw)


def test_greedy_warp_is_the_plain_softmax_whatever_the_cuts():
    probs = warp(LOGITS, SamplingParams(top_k=1, top_p=0.1))
    assert probs.dtype == torch.float32
    assert torch.allclose(probs, PROBS)


@pytest.mark.parametrize("temperature", [0.25, 1.0, 3.0])
def test_temperature_divides_the_logits(temperature):
    expected = torch.softmax(LOGITS / temperature, dim=-1)
    assert torch.allclose(warp(LOGITS, sampled(temperature=temperature)), expected, atol=1e-6)


def test_temperature_one_without_cuts_keeps_the_distribution():
    assert torch.allclose(warp(LOGITS, sampled()), PROBS, atol=1e-6)


@pytest.mark.parametrize(
    ("top_k", "expected"),
    [
        (1, [1.0, 0.0, 0.0, 0.0]),
        (2, [0.5 / 0.8, 0.3 / 0.8, 0.0, 0.0]),
        (3, [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0.0]),
        (4, [0.5, 0.3, 0.15, 0.05]),
        (10, [0.5, 0.3, 0.15, 0.05]),
    ],
)
def test_top_k_keeps_the_k_most_likely_and_renormalises(top_k, expected):
    assert torch.allclose(warp(LOGITS, sampled(top_k=top_k)), torch.tensor([expected]), atol=1e-6)


@pytest.mark.parametrize(
    ("top_p", "expected"),
    [
        (0.3, [1.0, 0.0, 0.0, 0.0]),  # the most likely token is always kept
        (0.75, [0.5 / 0.8, 0.3 / 0.8, 0.0, 0.0]),
        (0.85, [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0.0]),
        (1.0, [0.5, 0.3, 0.15, 0.05]),
    ],
)
def test_top_p_keeps_the_smallest_head_reaching_p_and_renormalises(top_p, expected):
    assert torch.allclose(warp(LOGITS, sampled(top_p=top_p)), torch.tensor([expected]), atol=1e-6)


def test_top_p_works_on_unsorted_vocabularies_row_by_row():
    logits = torch.tensor([[0.05, 0.15, 0.5, 0.3], [0.3, 0.05, 0.15, 0.5]]).log()  # [2, V]
    probs = warp(logits, sampled(top_p=0.75))
    assert torch.allclose(probs, torch.tensor([[0, 0, 0.625, 0.375], [0.375, 0, 0, 0.625]]), atol=1e-6)


def test_top_p_applies_after_top_k_and_temperature():
    params = sampled(temperature=0.5, top_k=3, top_p=0.8)
    sharp = torch.tensor([0.25, 0.09, 0.0225])  # p ** 2 over the top 3
    sharp = sharp / sharp.sum()  # [0.690, 0.248, 0.062]: the head reaching 0.8 is 2 tokens
    expected = torch.tensor([[sharp[0], sharp[1], 0.0, 0.0]]) / (sharp[0] + sharp[1])
    assert torch.allclose(warp(LOGITS, params), expected, atol=1e-6)


# -- validation ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "allowed"),
    [
        ("max_tokens", 0, "[1, inf)"),
        ("max_tokens", -5, "[1, inf)"),
        ("temperature", -0.1, "[0.0, inf)"),
        ("top_p", 0.0, "(0.0, 1.0]"),
        ("top_p", 1.5, "(0.0, 1.0]"),
        ("top_k", -1, "[0, inf)"),
        ("seed", 2**64, "[-9223372036854775808, 18446744073709551615]"),
        ("min_tokens", -1, "[0, 128]"),
        ("logprobs", 21, "[0, 20]"),
    ],
)
def test_out_of_range_names_the_field_the_range_and_the_value(field, value, allowed):
    with pytest.raises(InvalidRequest) as err:
        SamplingParams(**{field: value})
    assert str(err.value) == f"{field}: expected a value in {allowed}, received {value!r}"


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("max_tokens", 2.0, "int"),
        ("max_tokens", True, "int"),
        ("max_tokens", "16", "int"),
        ("top_k", 1.5, "int"),
        ("temperature", "1", "int or float"),
        ("temperature", None, "int or float"),
        ("top_p", False, "int or float"),
    ],
)
def test_wrong_types_name_the_field_and_the_expected_type(field, value, expected):
    with pytest.raises(InvalidRequest) as err:
        SamplingParams(**{field: value})
    assert str(err.value) == f"{field}: expected {expected}, received {value!r}"


@pytest.mark.parametrize(
    ("field", "value"),
    [("stop", "END"), ("stop", ("ok", "")), ("stop", (1,)), ("stop_token_ids", (3, -1)), ("stop_token_ids", ("3",))],
)
def test_bad_stops_name_the_field(field, value):
    with pytest.raises(InvalidRequest, match=rf"^{field}: expected"):
        SamplingParams(**{field: value})


def test_stops_given_as_lists_become_tuples():
    params = SamplingParams(stop=["a", "b"], stop_token_ids=[1])
    assert params.stop == ("a", "b") and params.stop_token_ids == (1,)
    hash(params)  # frozen and hashable


def test_invalid_request_survives_pickling():
    import pickle

    with pytest.raises(InvalidRequest) as err:
        SamplingParams(max_tokens=0)
    again = pickle.loads(pickle.dumps(err.value))
    assert type(again) is InvalidRequest and again.message == err.value.message


def test_derived_seeds_are_stable_and_differ_by_salt():
    assert derive_seed(7, "draft", 0) == derive_seed(7, "draft", 0)
    assert len({derive_seed(7, "draft", 0), derive_seed(7, "draft", 1), derive_seed(7, "verify", "full", 0),
                derive_seed(8, "draft", 0)}) == 4
    assert 0 <= derive_seed(2**63 - 1, "x") < 2**63


def test_any_64_bit_seed_is_accepted():
    assert SamplingParams(seed=-1).seed == -1
    assert SamplingParams(seed=2**64 - 1).seed == 2**64 - 1
    assert derive_seed(-5, "x") != derive_seed(5, "x")


def test_token_logprobs_are_the_log_softmax_with_top_alternatives():
    from via_sd_ray.core.sampling import token_logprobs

    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0, 0.0, 3.0, 0.0]])
    out = token_logprobs(logits, [1, 2], top=2)
    ref = torch.log_softmax(logits, dim=-1)
    assert out[0].logprob == pytest.approx(float(ref[0, 1]))
    assert [i for i, _ in out[0].top] == [0, 1] and out[0].top[0][1] == pytest.approx(float(ref[0, 0]))
    assert [i for i, _ in out[1].top][0] == 2
    assert token_logprobs(logits, [0], top=0)[0].top == ()


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0.7), SamplingParams(temperature=1.3, top_k=40),
    SamplingParams(temperature=1.0, top_k=5), SamplingParams(temperature=1.0, top_p=0.9)],
    ids=["temperature", "wide-top-k", "narrow-top-k", "top-p"])
def test_a_sampled_proposal_is_the_renormalised_head_of_the_warped_distribution(params):
    logits = torch.randn(3, 300, generator=torch.Generator().manual_seed(4)) * 3
    logits[1, :10] = float("-inf")  # suppressed ids
    fast, reference = sampled_proposal(logits, params, 16), top_k_proposal(warp(logits, params), 16)
    assert torch.equal(fast.ids, reference.ids)
    torch.testing.assert_close(fast.probs, reference.probs, rtol=1e-5, atol=1e-7)

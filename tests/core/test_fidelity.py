import pytest

from via_sd_ray.core.fidelity import FreeRunning, first_divergence, prefix_fraction


def test_identical_runs_score_one():
    ref = [5, 6, 7, 8]
    assert first_divergence(ref, list(ref)) is None
    assert prefix_fraction(ref, list(ref)) == 1.0
    fr = FreeRunning.of([ref, [1, 2]], [list(ref), [1, 2]])
    assert fr.identical_share == 1.0 and fr.prefix_fraction == 1.0 and fr.mean_first_divergence is None


@pytest.mark.parametrize("i", [0, 1, 5, 9])
def test_forced_divergence_at_i_gives_i_over_n(i):
    n = 10
    ref = list(range(100, 100 + n))
    out = list(ref)
    out[i] = 0  # forced divergence; what follows it no longer matters
    out[i + 1:] = [1] * (n - i - 1)
    assert first_divergence(ref, out) == i
    assert prefix_fraction(ref, out) == pytest.approx(i / n)


def test_length_differences_count_as_divergence():
    assert first_divergence([1, 2, 3], [1, 2]) == 2
    assert prefix_fraction([1, 2, 3], [1, 2]) == pytest.approx(2 / 3)
    assert prefix_fraction([1, 2], [1, 2, 3, 4]) == pytest.approx(2 / 4)
    assert prefix_fraction([], []) == 1.0


def test_aggregate_over_prompts():
    refs = [[1, 2, 3, 4], [1, 2, 3, 4], [9, 9]]
    outs = [[1, 2, 3, 4], [1, 0, 0, 0], [9, 8]]
    fr = FreeRunning.of(refs, outs)
    assert fr.identical_share == pytest.approx(1 / 3)
    assert fr.prefix_fraction == pytest.approx((1.0 + 0.25 + 0.5) / 3)
    assert fr.mean_first_divergence == pytest.approx(1.0)
    d = fr.to_dict()
    assert d["diverged"] == 2 and d["first_divergence"] == [None, 1, 1]
    with pytest.raises(ValueError):
        FreeRunning.of(refs, outs[:2])

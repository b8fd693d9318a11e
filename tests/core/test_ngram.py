"""Prompt-lookup drafting: the continuation of the latest earlier n-gram, with match statistics."""

from __future__ import annotations

import pytest

from via_sd_ray.core.engine import DraftCall
from via_sd_ray.core.ngram import PromptLookupDrafter
from via_sd_ray.core.sampling import SamplingParams


def draft(committed: list[int], k: int = 3, **kw):
    call = DraftCall("g", committed, k, SamplingParams(max_tokens=16), seed=0)
    return PromptLookupDrafter(**kw).draft(call)


def test_drafts_the_continuation_of_the_longest_matching_ngram():
    result = draft([1, 2, 3, 4, 9, 9, 1, 2, 3], k=3)
    assert result.tokens == [4, 9, 9]
    assert result.token_probs == pytest.approx([0.5, 0.5, 0.5])  # one match: 1 / (1 + 1)
    assert result.probs is None  # one-hot proposals for rejection sampling


def test_takes_the_latest_earlier_occurrence():
    assert draft([1, 2, 5, 6, 1, 2, 7, 8, 1, 2], k=3, max_ngram=2).tokens == [7, 8, 1]


def test_token_probs_count_the_matches_that_agree_with_the_block():
    # [1, 2] occurs twice before the end; both continue with 7, only the latest with 7, 9
    result = draft([1, 2, 7, 8, 1, 2, 7, 9, 1, 2], k=3, max_ngram=2)
    assert result.tokens == [7, 9, 1]
    assert result.token_probs == pytest.approx([2 / 3, 1 / 3, 1 / 3])


def test_falls_back_to_shorter_ngrams():
    # neither [2, 3, 7] nor [3, 7] occurred before; [7] did, at index 2
    assert draft([5, 6, 7, 1, 2, 3, 7], k=3).tokens == [1, 2, 3]


def test_a_longer_match_wins_over_a_later_shorter_one():
    # [4, 5] occurred at index 0; [5] alone more recently at index 4
    assert draft([4, 5, 1, 1, 5, 2, 2, 4, 5], k=2, max_ngram=2).tokens == [1, 1]


def test_min_ngram_forbids_falling_back_further():
    assert draft([5, 6, 7, 1, 2, 3, 7], k=3, min_ngram=2).tokens == []


def test_no_match_gives_an_empty_draft():
    result = draft([1, 2, 3, 4], k=3)
    assert (result.tokens, result.token_probs) == ([], [])
    assert draft([1], k=3).tokens == []


def test_block_is_cut_where_the_sequence_ends():
    assert draft([1, 2, 1], k=4).tokens == [2, 1]


def test_only_the_window_is_searched():
    committed = [8, 9, 0, 0, 0, 0, 8]
    assert draft(committed, k=2).tokens == [9, 0]
    assert draft(committed, k=2, window=5).tokens == []


def test_never_proposes_more_than_k():
    assert draft([1, 2, 3, 4, 5, 6, 7, 8, 1], k=4).tokens == [2, 3, 4, 5]

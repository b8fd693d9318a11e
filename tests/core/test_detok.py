"""Incremental detokenization: no partial character, stop-string holdback, final flush with a cut.

The tokenizer here is bytes: token t is byte t, decoded as UTF-8 with replacement
characters for incomplete sequences, as byte-level tokenizers do.
"""

from __future__ import annotations

import pytest

from via_sd_ray.models.detok import IncrementalText


def decode(ids: list[int]) -> str:
    return bytes(ids).decode("utf-8", errors="replace")


def tokens(text: str) -> list[int]:
    return list(text.encode())


def stream(ids: list[int], step: int = 1, stop=(), end=None) -> list[str]:
    """Pieces emitted while ``ids`` arrive ``step`` tokens at a time, the last push final."""
    detok, pieces = IncrementalText(decode, stop), []
    for n in range(step, len(ids) + step, step):
        final = n >= len(ids)
        pieces.append(detok.push(ids[:n], final=final, end=end if final else None))
    return pieces


def test_characters_split_across_tokens_are_emitted_only_once_complete():
    text = "añ€😀b"  # 1-, 2-, 3- and 4-byte characters
    pieces = stream(tokens(text))
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    assert pieces[:4] == ["a", "", "ñ", ""]


def test_multi_token_pushes_keep_the_text_intact():
    text = "héllo wörld 😀😀 ok"
    for step in (2, 3, 5):
        pieces = stream(tokens(text), step=step)
        assert "".join(pieces) == text
        assert all("\ufffd" not in p for p in pieces)


def test_text_that_may_start_a_stop_string_is_held_back():
    detok = IncrementalText(decode, ("STOP",))
    assert detok.push(tokens("abcdef")) == "abc"  # the last 3 characters could begin "STOP"
    assert detok.push(tokens("abcdefgh")) == "de"
    assert detok.push(tokens("abcdefghST")) == "fg"


@pytest.mark.parametrize(("text", "step"), [("hello STOP", 1), ("hello STOP", 2), ("hello STOP!!", 4)])
def test_final_flush_cuts_at_the_stop_string(text, step):
    # the generation ends on the push whose text completes the stop string, maybe with more after it
    pieces = stream(tokens(text), step=step, stop=("STOP",), end=len("hello "))
    assert "".join(pieces) == "hello "


def test_final_flush_without_a_cut_sends_the_held_back_text():
    pieces = stream(tokens("the end"), stop=("xyz",))
    assert "".join(pieces) == "the end"
    assert pieces[-1] == "end"  # two characters held back, then the last one


def test_final_flush_sends_a_trailing_incomplete_character_as_is():
    detok = IncrementalText(decode)
    assert detok.push(tokens("ab") + [0xE2, 0x82]) == "ab"
    assert detok.push(tokens("ab") + [0xE2, 0x82], final=True) == "\ufffd"


def test_nothing_is_sent_twice():
    detok = IncrementalText(decode)
    assert detok.push(tokens("abc")) == "abc"
    assert detok.push(tokens("abc")) == ""
    assert detok.push(tokens("abc"), final=True) == ""

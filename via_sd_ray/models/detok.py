"""Incremental detokenization for streams.

A stream must never show text it later takes back: a token that ends inside a UTF-8
character decodes to U+FFFD until the next token completes it, and text that may be
the start of a stop string is held back until it is known not to be one.
"""

from __future__ import annotations

from collections.abc import Callable


class IncrementalText:
    def __init__(self, decode: Callable[[list[int]], str], stop: tuple[str, ...] = ()):
        self.decode = decode
        self.holdback = max((len(s) for s in stop), default=1) - 1
        self.sent = 0  # characters already emitted

    def push(self, token_ids: list[int], final: bool = False, end: int | None = None) -> str:
        """New text for the output ``token_ids`` so far. ``final`` flushes; ``end`` cuts the text
        (where a stop string began)."""
        text = self.decode(token_ids)
        if end is not None:
            text = text[:end]
        limit = len(text)
        if not final:
            limit -= self.holdback
            partial = text.rfind("\ufffd")
            if partial >= len(text) - 4 and partial >= 0:  # an unfinished character at the end
                limit = min(limit, partial)
        if limit <= self.sent:
            return ""
        delta, self.sent = text[self.sent : limit], limit
        return delta

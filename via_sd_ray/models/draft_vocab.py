"""A drafter head over the tokens answers use most (a frequency-ranked draft vocabulary, as FR-Spec and
EAGLE-3 draft).

A drafter's LM head scores the whole vocabulary at every position it drafts: for Qwen2.5-Coder-0.5B,
151,936 rows of 896, about a quarter of the bytes a decode step reads. Most of those rows are tokens
an answer almost never holds. ``narrow_head`` keeps the ``size`` ids of a ranking (``rank``: ids by
how often they occur in a text sample) and the drafter scores only those: its picks, confidences and
sampled proposals are over them, mapped back to vocabulary ids (``DraftVocab``).

Nothing is lost but drafts: the verifier checks every block against its full vocabulary, a token the
drafter cannot propose is one it never drafts (the verifier's own token is committed there), and a
sampled block is rejection-sampled against the proposal it was drawn from, so the output's
distribution is the verifier's whatever the drafter's vocabulary.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import torch
from torch import nn

SCHEMA = "via-sd-draft-vocab/1"


def token_ids(tokenizer, texts: list[str]) -> list[int]:
    """The token ids of ``texts``, one after another."""
    return [i for text in texts for i in tokenizer(text, add_special_tokens=False)["input_ids"]]


def rank(tokenizer, texts: list[str]) -> tuple[list[int], int]:
    """Token ids of ``texts`` by how often they occur (most first, ties by id), and the tokens counted."""
    counts = Counter(token_ids(tokenizer, texts))
    return sorted(counts, key=lambda i: (-counts[i], i)), sum(counts.values())


def coverage(ranking: list[int], size: int, tokens: list[int]) -> float:
    """The share of ``tokens`` among the ``size`` first ids of ``ranking``."""
    kept = set(ranking[:size])
    return sum(t in kept for t in tokens) / max(1, len(tokens))


def save(path: str | Path, ids: list[int], meta: dict) -> None:
    Path(path).write_text(json.dumps({"schema": SCHEMA, **meta, "ids": ids}) + "\n")


def read(path: str | Path, size: int, vocab: int, keep: tuple[int, ...] = ()) -> list[int]:
    """The ``size`` ids a drafter keeps: ``keep`` (its end-of-sequence ids) first, then the ranking's most
    frequent, then, should the ranking hold fewer, the lowest ids it lacks; all below ``vocab``."""
    if not Path(path).is_file():
        raise ValueError(f"models.drafter.draft_vocab.file: expected an existing ranking file (`via-sd draft-vocab "
                         f"--out FILE`), received {str(path)!r}")
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError:
        data = {}
    if not isinstance(data, dict) or data.get("schema") != SCHEMA or not isinstance(data.get("ids"), list):
        raise ValueError(f"models.drafter.draft_vocab.file: expected a {SCHEMA} ranking (`via-sd draft-vocab`), "
                         f"received {str(path)!r}")
    if not 1 <= size <= vocab:
        raise ValueError(f"models.drafter.draft_vocab.size: expected 1 to {vocab} (the drafter's vocabulary), "
                         f"received {size}")
    chosen = dict.fromkeys(i for i in keep if 0 <= i < vocab)
    for i in data["ids"]:
        if len(chosen) >= size:
            break
        if 0 <= i < vocab:
            chosen.setdefault(i)
    rest = (i for i in range(vocab) if i not in chosen)
    while len(chosen) < size:
        chosen.setdefault(next(rest))
    return list(chosen)


def narrow_head(model: nn.Module, ids: list[int]) -> None:
    """Make ``model``'s LM head score only ``ids`` (in place; a tied head gets its own narrowed copy) and
    record them as ``model.draft_vocab``."""
    head = model.get_output_embeddings()
    if type(head) is not nn.Linear:
        raise ValueError(f"models.drafter.draft_vocab: expected a drafter whose LM head is a float nn.Linear, "
                         f"received {type(head).__name__}")
    rows = torch.tensor(ids, dtype=torch.long, device=head.weight.device)
    narrow = nn.Linear(head.in_features, len(ids), bias=head.bias is not None, device=head.weight.device,
                       dtype=head.weight.dtype)
    with torch.no_grad():
        narrow.weight.copy_(head.weight[rows])
        if head.bias is not None:
            narrow.bias.copy_(head.bias[rows])
    model.config.tie_word_embeddings = False
    model.set_output_embeddings(narrow)
    model.draft_vocab = DraftVocab(rows, head.out_features)


class DraftVocab:
    """The vocabulary ids of a narrowed head's rows (``ids`` [N] on the model's device) and the way back."""

    def __init__(self, ids: torch.Tensor, vocab: int):
        self.ids, self.vocab = ids, vocab
        self.row_of = {int(i): r for r, i in enumerate(ids.tolist())}  # vocabulary id -> head row

    def rows(self, token_ids) -> list[int]:
        """The head rows of those of ``token_ids`` the head has."""
        return [self.row_of[i] for i in token_ids if i in self.row_of]

    def widen(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits [N, rows] as [N, vocab], -inf where the head has no row."""
        out = logits.new_full((logits.shape[0], self.vocab), float("-inf"))
        out[:, self.ids] = logits
        return out

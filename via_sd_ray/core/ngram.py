"""Prompt-lookup drafting: propose the tokens that followed the latest earlier occurrence
of the sequence's last n-gram (Saxena 2023; transformers' ``prompt_lookup_num_tokens``,
vLLM's ``ngram`` speculator). No model, so users without a drafter model still get SD.

Its "probabilities" are match statistics: the token at block position i gets
``agree_i / (matches + 1)``, where ``matches`` counts the earlier occurrences of the
n-gram and ``agree_i`` those whose continuation equals the block up to i. The ``+ 1``
keeps a single match from claiming certainty, so the router sends such blocks to a
verifier. For rejection sampling the proposals count as one-hot (``probs`` is None), and so
for logprobs: a token this drafter decided (a direct block) reports log-probability 0.
"""

from __future__ import annotations

from via_sd_ray.core.engine import Draft, DraftCall
from via_sd_ray.core.sampling import TokenLogprob


class PromptLookupDrafter:
    """A model-free drafter behind the same ``draft(call) -> Draft`` interface as a model drafter."""

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1, window: int = 4096):
        assert 1 <= min_ngram <= max_ngram
        self.max_ngram, self.min_ngram, self.window = max_ngram, min_ngram, window

    def draft(self, call: DraftCall) -> Draft:
        ids = call.committed[-self.window :]
        for n in range(min(self.max_ngram, len(ids) - 1), self.min_ngram - 1, -1):
            suffix = ids[-n:]
            # starts of earlier occurrences, the most recent first; the suffix itself is excluded
            starts = [j for j in range(len(ids) - n - 1, -1, -1) if ids[j : j + n] == suffix]
            if not starts:
                continue
            block = ids[starts[0] + n : starts[0] + n + call.k]
            banned = set(call.suppress_ids)
            for i, token in enumerate(block[: call.suppress_rows]):
                if token in banned:  # a stop token before min_tokens: propose up to it
                    block = block[:i]
                    break
            if not block:
                continue
            probs = []
            for i in range(len(block)):
                agree = sum(1 for j in starts if ids[j + n : j + n + i + 1] == block[: i + 1])
                probs.append(agree / (len(starts) + 1))
            logprobs = [TokenLogprob(0.0)] * len(block) if call.params.logprobs is not None else None
            return Draft(block, probs, logprobs=logprobs)
        return Draft([], [])

    def draft_batch(self, calls: list[DraftCall]) -> list[Draft]:
        return [self.draft(call) for call in calls]

    def release(self, generation_id: str) -> None:  # no per-generation state
        pass

"""The sans-IO block loop, driven by ``drive`` with toy tiers.

The toy tiers answer the same protocol as ``models.runner.TierRunner``: ``draft(DraftCall)
-> Draft`` and ``verify(VerifyCall) -> Verdict``, over toy "models" that are functions from
a prefix to next-token logits [V], and record the calls they answer.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch

from tests.core.distribution import empirical, tv_bound, tv_distance
from via_sd_ray.core.engine import Commit, Draft, DraftCall, Generation, Verdict, VerifyCall, drive
from via_sd_ray.core.policy import RouterPolicy, Tier
from via_sd_ray.core.sampling import SamplingParams, generator, sample, warp
from via_sd_ray.core.verify import verify
from via_sd_ray.errors import InvalidRequest

ToyLM = Callable[[list[int]], torch.Tensor]  # prefix -> next-token logits [V]

V = 256  # toy vocabulary: bytes, so byte-level decoding works too
EOS = 15
PROMPT = [1, 2, 3]


class ToyTier:
    """A tier over a toy model, answering calls the way ``TierRunner`` does (without a cache)."""

    def __init__(self, lm: ToyLM):
        self.lm = lm
        self.drafts: list[tuple[DraftCall, Draft]] = []
        self.verdicts: list[tuple[VerifyCall, Verdict]] = []

    def draft(self, call: DraftCall) -> Draft:
        gen = None if call.params.greedy else generator(call.seed)
        seq = list(call.committed)
        tokens, token_probs, rows = [], [], []
        for _ in range(call.k):
            probs = warp(self.lm(seq)[None], call.params)[0]  # [V]
            token = int(probs.argmax()) if gen is None else sample(probs, gen)
            tokens.append(token)
            token_probs.append(float(probs[token]))
            rows.append(probs)
            seq.append(token)
            if token_probs[-1] < call.stop_threshold:
                break
        result = Draft(tokens, token_probs, None if gen is None else torch.stack(rows))  # probs [k, V]
        self.drafts.append((call, result))
        return result

    def verify(self, call: VerifyCall) -> Verdict:
        seq = call.committed + call.block
        logits = torch.stack([self.lm(seq[:n]) for n in range(len(call.committed), len(seq) + 1)])  # [K + 1, V]
        gen = None if call.params.greedy else generator(call.seed)
        verdict = verify(call.block, logits, call.params, call.draft_probs, gen, call.return_probs)
        self.verdicts.append((call, verdict))
        return verdict


@dataclass
class ToyTiers:
    drafter: ToyTier
    slim: ToyTier
    full: ToyTier
    calls: list = field(default_factory=list)  # every call, in order

    def dispatch(self, call: DraftCall | VerifyCall) -> Draft | Verdict:
        self.calls.append(call)
        if isinstance(call, DraftCall):
            return self.drafter.draft(call)
        return (self.slim if call.tier is Tier.SLIM else self.full).verify(call)


def tiers(drafter: ToyLM, slim: ToyLM, full: ToyLM) -> ToyTiers:
    return ToyTiers(ToyTier(drafter), ToyTier(slim), ToyTier(full))


def run(toy: ToyTiers, params: SamplingParams, policy: RouterPolicy, prompt=PROMPT, **kw):
    generation = Generation(list(prompt), params, policy, eos_token_ids=(EOS,), **kw)
    commits = list(drive(generation.steps(), toy.dispatch))
    return generation, commits


def scripted(tokens: list[int], confidence: float | Callable[[int], float] = 0.9) -> ToyLM:
    """A toy model that continues ``PROMPT`` with ``tokens`` (then token 0) whatever it is shown,
    putting ``confidence`` (a number, or a function of the output position) on its choice."""

    def lm(prefix: list[int]) -> torch.Tensor:
        pos = len(prefix) - len(PROMPT)
        conf = confidence(pos) if callable(confidence) else confidence
        probs = torch.full((V,), (1 - conf) / (V - 1))
        probs[tokens[pos] if pos < len(tokens) else 0] = conf
        return probs.log()

    return lm


def greedy(max_tokens: int = 20, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, **kw)


SD = RouterPolicy(mode="sd", block_size=4)
VIA_SD = RouterPolicy(mode="via-sd", block_size=4, direct_threshold=0.95, slim_threshold=0.5, escalate_threshold=0.8)


# -- where a generation ends --------------------------------------------------------------


def test_eos_inside_a_block_is_committed_and_ends_the_generation():
    script = scripted([5, 6, EOS, 7, 8])
    toy = tiers(script, script, script)
    generation, commits = run(toy, greedy(), SD)
    assert toy.full.verdicts[0][1].tokens([5, 6, EOS, 7]) == [5, 6, EOS, 7, 8]  # the verifier offered more
    assert commits == [Commit([5, 6, EOS], Tier.FULL, "stop")]
    assert generation.output_ids == [5, 6, EOS] and generation.finish_reason == "stop"
    record = generation.stats.records[0]
    assert (record.proposed, record.accepted, record.committed) == (4, 3, 3)


def test_stop_token_ids_end_like_eos_and_ignore_eos_goes_past_eos():
    script = scripted([5, 6, EOS, 7, 8])
    toy = tiers(script, script, script)
    assert run(toy, greedy(stop_token_ids=(6,)), SD)[0].output_ids == [5, 6]
    generation, _ = run(toy, greedy(max_tokens=5, ignore_eos=True), SD)
    assert generation.output_ids == [5, 6, EOS, 7, 8] and generation.finish_reason == "length"


def test_max_tokens_ends_with_length_and_the_last_block_shrinks():
    script = scripted([4, 5, 6, 7, 8, 9, 10, 11])
    toy = tiers(script, script, script)
    generation, commits = run(toy, greedy(max_tokens=6), SD)
    assert commits == [Commit([4, 5, 6, 7, 8], Tier.FULL, None), Commit([9], Tier.FULL, "length")]
    assert [call.k for call, _ in toy.drafter.drafts] == [4]  # one token left: no draft, an AR step
    assert [call.block for call, _ in toy.full.verdicts] == [[4, 5, 6, 7], []]


def test_tokens_past_max_tokens_are_not_committed():
    # lossless via-sd: slim's candidate (2 drafts + bonus) and the full verifier's bonus make 4 tokens for 3 places
    script = scripted([4, 5, 6, 7, 8])
    toy = tiers(scripted([4, 5, 6, 7, 8], confidence=0.7), script, script)
    policy = RouterPolicy(mode="via-sd", block_size=4, lossless=True)
    generation, commits = run(toy, greedy(max_tokens=3), policy)
    assert toy.full.verdicts[0][1].tokens([4, 5, 6]) == [4, 5, 6, 7]
    assert commits == [Commit([4, 5, 6], Tier.SLIM, "length")]


DECODED = {t: chr(ord("a") + t) for t in range(V)} | {12: "xcdy"}


def decode(ids: list[int]) -> str:
    return "".join(DECODED[t] for t in ids)


@pytest.mark.parametrize("block_size", [1, 2, 4])
def test_stop_string_ends_at_the_completing_token(block_size):
    script = scripted([0, 1, 2, 3, 4, 5, 6])  # "abcdefg"
    toy = tiers(script, script, script)
    policy = RouterPolicy(mode="sd", block_size=block_size)
    generation, commits = run(toy, greedy(stop=("cd",)), policy, decode=decode)
    assert generation.output_ids == [0, 1, 2, 3]  # "abcd": nothing after the token completing "cd"
    assert generation.finish_reason == "stop" and commits[-1].finish_reason == "stop"
    assert generation.stop_text_end == 2


def test_stop_string_inside_one_token():
    script = scripted([0, 12, 5])  # "a" "xcdy" "f"
    toy = tiers(script, script, script)
    generation, _ = run(toy, greedy(stop=("cd", "zz")), SD, decode=decode)
    assert generation.output_ids == [0, 12]
    assert generation.stop_text_end == 2  # "axcdy"[:2]


def test_stop_string_of_multi_byte_characters_split_into_byte_tokens():
    text = "ok 😀😀😀 then more"
    data = list(text.encode())  # byte-level tokens: four per emoji
    script = scripted(data)
    toy = tiers(script, script, script)
    params = greedy(max_tokens=len(data), stop=("😀😀😀",))
    generation, _ = run(toy, params, SD, decode=lambda ids: bytes(ids).decode("utf-8", errors="replace"))
    assert generation.output_ids == data[: len("ok 😀😀😀".encode())]
    assert generation.stop_text_end == 3


def test_stop_strings_need_a_decode():
    with pytest.raises(InvalidRequest, match="^stop:"):
        Generation(PROMPT, greedy(stop=("x",)), SD)


# -- tiers --------------------------------------------------------------------------------


def test_direct_blocks_are_committed_without_a_verifier():
    drafter, full = [4, 5, 6, 7], [9, 9, 9, 9]  # the full verifier would disagree everywhere
    toy = tiers(scripted(drafter, confidence=0.99), scripted(full), scripted(full))
    generation, commits = run(toy, greedy(max_tokens=4), VIA_SD)
    assert commits[0] == Commit([4, 5, 6], Tier.DIRECT, None)
    assert toy.slim.verdicts == []
    # the only verifier call is the last token's AR step, after the direct block
    [(call, _)] = toy.full.verdicts
    assert (call.committed, call.block) == (PROMPT + [4, 5, 6], [])
    assert generation.output_ids == [4, 5, 6, 9]
    assert generation.stats.tier_blocks == {"direct": 1, "slim": 0, "full": 1}


def test_slim_decides_a_block_it_is_sure_of():
    drafter = scripted([4, 5, 6, 7], confidence=0.7)
    slim = scripted([4, 5, 8, 7, 9], confidence=0.9)  # rejects the third draft token, recovers 8
    toy = tiers(drafter, slim, scripted([0] * 8))
    generation, commits = run(toy, greedy(max_tokens=5), VIA_SD)
    assert commits == [Commit([4, 5, 8], Tier.SLIM, None), Commit([7, 9], Tier.SLIM, "length")]
    assert toy.full.verdicts == []
    assert generation.stats.escalations == 0


def test_slim_escalates_the_rest_of_the_block_from_its_first_unsure_position():
    drafter = scripted([4, 5, 6, 7], confidence=0.7)
    slim = scripted([4, 5, 6, 7, 9], confidence=lambda pos: 0.9 if pos < 2 else 0.6)
    full = scripted([4, 5, 6, 10, 11])
    toy = tiers(drafter, slim, full)
    generation, commits = run(toy, greedy(max_tokens=5), VIA_SD)
    [(slim_call, slim_verdict)] = toy.slim.verdicts
    assert slim_verdict.tokens(slim_call.block) == [4, 5, 6, 7, 9]
    # the full verifier sees only the remainder, after the two tokens slim was sure of
    full_call = toy.full.verdicts[0][0]
    assert (full_call.committed, full_call.block) == (PROMPT + [4, 5], [6, 7, 9])
    assert commits[0] == Commit([4, 5, 6, 10], Tier.SLIM, None)
    assert generation.stats.escalations == 1 and generation.stats.records[0].escalated
    assert generation.output_ids == [4, 5, 6, 10, 11]


def test_lossless_slim_blocks_escalate_whole():
    drafter = scripted([4, 5, 6, 7], confidence=0.7)
    sure_slim = scripted([4, 5, 6, 7, 9], confidence=0.99)
    toy = tiers(drafter, sure_slim, scripted([4, 5, 6, 7, 9]))
    policy = RouterPolicy(mode="via-sd", block_size=4, lossless=True)
    generation, _ = run(toy, greedy(max_tokens=5), policy)
    [(call, _)] = toy.full.verdicts
    assert (call.committed, call.block) == (PROMPT, [4, 5, 6, 7, 9])
    assert generation.output_ids == [4, 5, 6, 7, 9]


# -- per-block records --------------------------------------------------------------------


def test_block_records_and_stats():
    drafter = scripted([4, 5, 6, 7, 8, 9, 10, 11])
    full = scripted([4, 5, 13, 7, 8, 9, 10, 11])
    toy = tiers(drafter, drafter, full)
    generation, commits = run(toy, greedy(max_tokens=8), RouterPolicy(mode="sd", block_size=3))
    assert [c.tokens for c in commits] == [[4, 5, 13], [7, 8, 9, 10], [11]]
    records = [(r.tier, r.proposed, r.accepted, r.committed) for r in generation.stats.records]
    assert records == [(Tier.FULL, 3, 2, 3), (Tier.FULL, 3, 3, 4), (Tier.FULL, 0, 0, 1)]
    stats = generation.stats.to_dict()
    assert {k: stats[k] for k in ("blocks", "proposed", "accepted", "committed", "escalations")} == {
        "blocks": 3, "proposed": 6, "accepted": 5, "committed": 8, "escalations": 0}
    assert stats["acceptance_per_position"] == [1.0, 1.0, 0.5]
    assert stats["mean_accepted"] == 2.5 and stats["tokens_per_block"] == pytest.approx(8 / 3)
    assert stats["tier_tokens"] == {"direct": 0, "slim": 0, "full": 8}


# -- requests the engine refuses ----------------------------------------------------------


def test_empty_prompt_is_invalid():
    with pytest.raises(InvalidRequest, match="^prompt: expected at least one token"):
        Generation([], greedy(), SD)


def test_prompt_plus_max_tokens_must_fit_the_context():
    Generation([1] * 10, greedy(max_tokens=6), SD, max_context=16)
    with pytest.raises(InvalidRequest) as err:
        Generation([1] * 10, greedy(max_tokens=7), SD, max_context=16)
    assert "at most 16 tokens" in str(err.value) and "10 prompt tokens + max_tokens 7" in str(err.value)


# -- lossless VIA-SD ----------------------------------------------------------------------

VS = 4  # the statistical tests' vocabulary: joints of two tokens have 16 cells


def table_lm(table: torch.Tensor) -> ToyLM:
    """A toy model whose next-token logits depend on the last token: ``table[last]``."""
    return lambda prefix: table[prefix[-1]]


def toy_tables(seed: int = 0) -> dict[str, torch.Tensor]:
    """Full, slim and drafter logit tables [VS, VS]: the slim model is a noisy full model, the drafter noisier."""
    gen = torch.Generator().manual_seed(seed)
    full = torch.randn(VS, VS, generator=gen) * 1.5
    return {"full": full,
            "slim": full + torch.randn(VS, VS, generator=gen) * 1.2,
            "drafter": full + torch.randn(VS, VS, generator=gen) * 2.0}


def toy_table_tiers(tables) -> ToyTiers:
    return tiers(table_lm(tables["drafter"]), table_lm(tables["slim"]), table_lm(tables["full"]))


# thresholds that send the toy drafter's blocks to every tier
MIXED = dict(mode="via-sd", block_size=2, direct_threshold=0.62, slim_threshold=0.1, escalate_threshold=0.5)


def full_coverage(toy: ToyTiers, generation: Generation) -> list[bool]:
    """For each output token: was it committed by a FULL verdict on this generation's own prefix?"""
    committed, start = generation.committed, len(generation.prompt_ids)
    covered = [False] * len(generation.output_ids)
    for call, verdict in toy.full.verdicts:
        if call.committed != committed[: len(call.committed)]:
            continue
        for offset, token in enumerate(verdict.tokens(call.block)):
            pos = len(call.committed) + offset
            if pos < len(committed) and committed[pos] == token:
                covered[pos - start] = True
    return covered


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_lossless_commits_every_token_through_a_full_verdict(temperature):
    tables = toy_tables()
    for lossless in (True, False):
        toy = toy_table_tiers(tables)
        tiers_seen, covered = Counter(), []
        for seed in range(10):
            params = SamplingParams(max_tokens=12, temperature=temperature, seed=seed)
            generation, _ = run(toy, params, RouterPolicy(lossless=lossless, **MIXED), prompt=[seed % VS])
            tiers_seen.update(r.tier.value for r in generation.stats.records)
            covered += full_coverage(toy, generation)
        if lossless:
            assert all(covered) and tiers_seen["direct"] == 0
        else:  # the same blocks, lossy: some tokens never see the full verifier
            assert not all(covered) and tiers_seen["direct"] > 0


def test_greedy_lossless_via_sd_equals_the_full_model_alone():
    tables = toy_tables()
    for prompt in ([0], [1], [2, 3]):
        outputs = []
        for policy in (RouterPolicy(mode="ar"), RouterPolicy(mode="sd", block_size=3),
                       RouterPolicy(lossless=True, **MIXED)):
            outputs.append(run(toy_table_tiers(tables), greedy(max_tokens=12), policy, prompt=prompt)[0].output_ids)
        assert outputs[0] == outputs[1] == outputs[2]


def exact_first_two(table: torch.Tensor, first: int = 0) -> torch.Tensor:
    """P(t0, t1) [VS * VS] of the model ``table`` sampling two tokens after ``first``."""
    p0 = torch.softmax(table[first].double(), dim=-1)
    return torch.stack([p0[a] * torch.softmax(table[a].double(), dim=-1) for a in range(VS)]).flatten()


def sampled_first_two(tables, policy: RouterPolicy, n: int) -> tuple[torch.Tensor, Counter]:
    toy, tiers_seen, samples = toy_table_tiers(tables), Counter(), []
    for seed in range(n):
        params = SamplingParams(max_tokens=3, temperature=1.0, seed=seed)
        generation, _ = run(toy, params, policy, prompt=[0])
        samples.append(generation.output_ids[0] * VS + generation.output_ids[1])
        tiers_seen.update(r.tier.value for r in generation.stats.records)
    return empirical(samples, VS * VS), tiers_seen


@pytest.mark.parametrize("policy", [RouterPolicy(mode="sd", block_size=2), RouterPolicy(lossless=True, **MIXED)],
                         ids=["sd", "lossless-via-sd"])
def test_sampled_lossless_generations_follow_the_full_model(policy):
    tables, n = toy_tables(), 8_000
    freq, tiers_seen = sampled_first_two(tables, policy, n)
    target, bound = exact_first_two(tables["full"]), tv_bound(VS * VS, n)
    assert tv_distance(freq, target) < bound
    # committing the slim model's or the drafter's choices would be seen
    assert tv_distance(exact_first_two(tables["slim"]), target) > 2 * bound
    assert tv_distance(exact_first_two(tables["drafter"]), target) > 2 * bound
    if policy.mode == "via-sd":
        assert tiers_seen["slim"] > n // 2


def test_sampled_lossy_via_sd_does_not_follow_the_full_model():
    """The statistical test above can fail: the same toy tiers without lossless drift from the full model."""
    tables, n = toy_tables(), 2_000
    freq, tiers_seen = sampled_first_two(tables, RouterPolicy(**MIXED), n)
    assert tiers_seen["direct"] > 0
    assert tv_distance(freq, exact_first_two(tables["full"])) > 2 * tv_bound(VS * VS, n)


def test_a_block_cap_shortens_blocks_as_it_changes_and_keeps_greedy_output():
    tables = toy_tables()
    want = run(toy_table_tiers(tables), greedy(max_tokens=16), RouterPolicy(mode="ar"), prompt=[0])[0].output_ids
    caps = iter([4, 2, 0, 0, 1, 3] + [4] * 20)  # the load changes between blocks
    seen = []

    def cap():
        seen.append(next(caps))
        return seen[-1]

    toy = toy_table_tiers(tables)
    generation, _ = run(toy, greedy(max_tokens=16), RouterPolicy(mode="sd", block_size=3), prompt=[0], block_cap=cap)
    assert generation.output_ids == want
    proposed = [r.proposed for r in generation.stats.records]
    assert all(p <= min(3, c) for p, c in zip(proposed, seen))
    assert proposed[2:4] == [0, 0]  # cap 0: the full verifier decodes one token, nothing is drafted
    assert len(toy.drafter.drafts) == sum(1 for p in proposed if p)


# -- deferred_check: direct blocks held until the full verifier checks them ---------------------------


@pytest.mark.parametrize("max_direct_run", [0, 1, 3])
@pytest.mark.parametrize("direct_threshold", [0.0, 0.3, 0.62, 0.9])
def test_checked_direct_blocks_keep_greedy_output_equal_to_the_full_model(direct_threshold, max_direct_run):
    tables = toy_tables()
    policy = RouterPolicy(mode="via-sd", block_size=2, direct_threshold=direct_threshold,
                          slim_threshold=min(0.1, direct_threshold), escalate_threshold=0.5, deferred_check=True,
                          max_direct_run=max_direct_run)
    held = rolled_back = 0
    for prompt in ([0], [1], [2, 3]):
        want = run(toy_table_tiers(tables), greedy(max_tokens=16), RouterPolicy(mode="ar"), prompt=prompt)[0]
        generation, commits = run(toy_table_tiers(tables), greedy(max_tokens=16), policy, prompt=prompt)
        assert generation.output_ids == want.output_ids
        assert [t for c in commits for t in c.tokens] == generation.output_ids  # no token streamed twice
        assert all(c.tier is not Tier.DIRECT for c in commits)  # only verified tokens are released
        direct = [r for r in generation.stats.records if r.tier is Tier.DIRECT]
        held += len(direct)
        rolled_back += sum(r.accepted < r.proposed for r in direct)
        if max_direct_run:
            runs, longest = 0, 0
            for r in generation.stats.records:
                runs = runs + 1 if r.tier is Tier.DIRECT else 0
                longest = max(longest, runs)
            assert longest <= max_direct_run
    if direct_threshold <= 0.62:
        assert held > 0 and rolled_back > 0  # blocks were held, and the check caught some of them


def test_checked_direct_blocks_reach_the_full_verifier_with_the_next_block():
    # the drafter is sure of the first 6 tokens (direct), then unsure (full); the full model agrees on 0..3 only
    out = [40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51]
    full_out = out[:4] + [90] + out[5:]
    toy = tiers(scripted(out, lambda pos: 0.99 if pos < 6 else 0.3), scripted(out), scripted(full_out, 0.99))
    policy = RouterPolicy(mode="via-sd", block_size=3, direct_threshold=0.9, slim_threshold=0.9, deferred_check=True)
    generation, commits = run(toy, greedy(max_tokens=12), policy)
    call, verdict = toy.full.verdicts[0]
    assert call.committed == PROMPT and call.block == out[:9]  # two held blocks + the unsure one
    assert verdict.accepted == 4 and commits[0].tokens == full_out[:5]  # rolled back at the disagreement
    assert generation.output_ids == full_out
    first = generation.stats.records[:3]
    assert [r.tier for r in first] == [Tier.DIRECT, Tier.DIRECT, Tier.FULL]
    assert [(r.accepted, r.committed) for r in first] == [(3, 3), (1, 2), (0, 0)]


def test_a_held_block_holding_eos_is_checked_at_once():
    out = [40, 41, EOS, 43, 44]
    toy = tiers(scripted(out, 0.99), scripted(out), scripted(out, 0.99))
    policy = RouterPolicy(mode="via-sd", block_size=4, direct_threshold=0.9, slim_threshold=0.9, deferred_check=True)
    generation, commits = run(toy, greedy(max_tokens=12), policy)
    assert generation.output_ids == out[:3] and generation.finish_reason == "stop"
    assert len(toy.drafter.drafts) == 1 and toy.full.verdicts[0][0].block == [40, 41, EOS, 43]


def test_sampled_checked_direct_via_sd_follows_the_full_model():
    tables, n = toy_tables(), 8_000
    policy = RouterPolicy(mode="via-sd", block_size=2, direct_threshold=0.3, slim_threshold=0.0,
                          deferred_check=True)
    freq, tiers_seen = sampled_first_two(tables, policy, n)
    assert tiers_seen["direct"] > n // 10
    assert tv_distance(freq, exact_first_two(tables["full"])) < tv_bound(VS * VS, n)

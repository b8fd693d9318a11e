"""A drafter over a frequency-ranked subset of the vocabulary (``models.drafter.draft_vocab``): its head
scores only the kept ids, its drafts and proposals are vocabulary ids among them, and the output is the
verifier's still (greedy: token for token; sampled: in distribution, tokens it cannot draft included)."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import TINY_ARGS
from tests.core.distribution import empirical, tv_bound, tv_distance
from via_sd_ray.config import parse_config
from via_sd_ray.core.engine import DraftCall, VerifyCall
from via_sd_ray.core.policy import Tier
from via_sd_ray.core.sampling import SamplingParams, warp
from via_sd_ray.errors import ConfigError
from via_sd_ray.models import draft_vocab
from via_sd_ray.models.decoder import DecoderStack
from via_sd_ray.models.loading import load_tokenizer, resolve
from via_sd_ray.models.local import LocalEngine
from via_sd_ray.models.runner import TierRunner
from via_sd_ray.models.tiny import tiny_model

PROMPT = [5, 17, 42, 9, 3, 77, 21]
V = tiny_model("drafter").get_output_embeddings().out_features  # the tiny byte-level vocabulary


def ranking(tmp_path, ids, name="vocab.json"):
    path = tmp_path / name
    draft_vocab.save(path, ids, {"tokenizer": "tiny"})
    return path


def test_rank_orders_ids_by_count_then_id():
    tokenizer = load_tokenizer(resolve("tiny-random:verifier"))
    ids, counted = draft_vocab.rank(tokenizer, ["abcab", "b"])
    enc = tokenizer("abcabb", add_special_tokens=False)["input_ids"]
    assert counted == len(enc)
    assert ids[0] == max(set(enc), key=lambda i: (enc.count(i), -i))  # "b": three times
    assert sorted(ids) == sorted(set(enc))


def test_read_keeps_end_ids_then_the_most_frequent_then_fills(tmp_path):
    path = ranking(tmp_path, [9, 4, 700, 4, 2])  # 700: past the vocabulary
    assert draft_vocab.read(path, 3, 512, keep=(1,)) == [1, 9, 4]
    assert draft_vocab.read(path, 6, 512) == [9, 4, 2, 0, 1, 3]  # the ranking runs out: the lowest ids it lacks
    with pytest.raises(ValueError, match="size: expected 1 to 512"):
        draft_vocab.read(path, 513, 512)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"ids": [1, 2]}))
    with pytest.raises(ValueError, match="via-sd-draft-vocab/1 ranking"):
        draft_vocab.read(bad, 2, 512)


def test_a_narrowed_head_scores_the_kept_rows_exactly():
    full, narrow = tiny_model("drafter"), tiny_model("drafter")
    ids = list(range(0, V, 3))
    draft_vocab.narrow_head(narrow, ids)
    a, b = DecoderStack(full), DecoderStack(narrow)
    la = a.forward_batch([PROMPT], [a.new_cache()], [2])[0]
    lb = b.forward_batch([PROMPT], [b.new_cache()], [2])[0]
    assert lb.shape == (2, len(ids))
    torch.testing.assert_close(lb, la[:, ids], rtol=1e-5, atol=1e-5)  # the same rows (a narrower GEMM's rounding)
    assert torch.equal(narrow.draft_vocab.widen(lb)[:, ids], lb)
    assert narrow.draft_vocab.rows([3, 4, 9]) == [1, 3]


def narrowed_runners(ids, top_k=4):
    drafter, verifier = tiny_model("drafter"), tiny_model("verifier")
    draft_vocab.narrow_head(drafter, ids)
    draft, full = DecoderStack(drafter), DecoderStack(verifier)
    return (TierRunner(draft, draft.new_pool(4, 256), "drafter", host_steps=False, proposal_top_k=top_k),
            TierRunner(full, full.new_pool(4, 256), "full", proposal_top_k=top_k))


@pytest.mark.parametrize("temperature", [0.0, 1.0], ids=["greedy", "sampled"])
def test_drafts_and_proposals_are_vocabulary_ids_among_the_kept(temperature):
    kept = list(range(1, V, 2))  # odd ids only
    drafter, _ = narrowed_runners(kept)
    params = SamplingParams(max_tokens=16, temperature=temperature, ignore_eos=True, logprobs=2)
    draft = drafter.draft(DraftCall("g", PROMPT, k=6, params=params, seed=3))
    assert len(draft.tokens) == 6 and all(t % 2 == 1 for t in draft.tokens)
    if temperature:
        assert all(i % 2 == 1 for i in draft.probs.ids.flatten().tolist())
    # logprobs over the whole vocabulary: the drafted token's own, alternatives among the kept
    assert all(lp.top[0][0] % 2 == 1 and lp.logprob <= 0 for lp in draft.logprobs)
    banned = drafter.draft(DraftCall("h", PROMPT, k=2, params=params, seed=3, suppress_ids=(draft.tokens[0],),
                                     suppress_rows=1))
    assert banned.tokens[0] != draft.tokens[0]


def test_sampled_sd_with_a_narrowed_drafter_commits_tokens_distributed_as_the_full_model():
    """3,000 blocks of 2 from a drafter that cannot propose two of the full model's 8 likeliest first
    tokens: the first committed token still follows the full model's distribution, those two included."""
    params = SamplingParams(max_tokens=8, temperature=1.0, top_k=8, ignore_eos=True)
    probe = DecoderStack(tiny_model("verifier"))
    p0 = warp(probe.forward_batch([PROMPT], [probe.new_cache()], [1])[0], params)[0]
    support = p0.nonzero().flatten().tolist()
    missing = set(support[:2])
    drafter, full = narrowed_runners([i for i in range(V) if i not in missing])
    first = []
    for seed in range(3000):
        gid = f"s{seed}"
        draft = drafter.draft(DraftCall(gid, PROMPT, k=2, params=params, seed=seed))
        assert not missing & set(draft.tokens)
        verdict = full.verify(VerifyCall(Tier.FULL, gid, PROMPT, draft.tokens, params, seed=10_000 + seed,
                                         draft_probs=draft.probs))
        first.append(support.index(verdict.tokens(draft.tokens)[0]))
        for runner in (drafter, full):
            runner.release(gid)
            runner.clear_prefixes()
    seen = empirical(first, 8)
    assert all(seen[support.index(m)] > 0 for m in missing)  # committed, though never drafted
    assert tv_distance(seen, p0[support]) < tv_bound(8, len(first))


def test_an_engine_with_a_draft_vocab_gives_ar_tokens_in_greedy_sd(tmp_path, build_tiny_engine):
    (tmp_path / "cfg").mkdir()
    ranking(tmp_path / "cfg", list(range(100, V)) + list(range(100)))
    args = {**TINY_ARGS, "models": {**TINY_ARGS["models"], "drafter": {
        **TINY_ARGS["models"]["drafter"], "draft_vocab": {"file": "vocab.json", "size": 128}}}}
    config = parse_config(args, base_dir=tmp_path / "cfg")  # the file found beside the config
    assert config.models.drafter.draft_vocab.file == str(tmp_path / "cfg" / "vocab.json")
    engine, plain = LocalEngine(config), build_tiny_engine()
    assert engine.drafter.draft_vocab is not None and len(engine.drafter.draft_vocab.ids) == 128
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    sd = engine.generate(PROMPT, params, config.router.policy(mode="sd", block_size=4))
    assert sd.token_ids == plain.generate(PROMPT, params, plain.config.router.policy(mode="ar")).token_ids
    assert sd.stats.to_dict()["acceptance_rate"] > 0  # the narrowed drafter's blocks are accepted too
    via = engine.generate(PROMPT, params, config.router.policy(mode="via-sd", block_size=4))  # lossy by design
    assert len(via.token_ids) == 24
    with pytest.raises(ConfigError, match="draft_vocab"):
        LocalEngine(parse_config({**args, "models": {**args["models"], "drafter": {
            **args["models"]["drafter"], "draft_vocab": {"file": "missing.json", "size": 128}}}}, base_dir=tmp_path))


def test_a_draft_vocab_given_without_a_config_file_is_found_from_the_working_directory_as_an_absolute_path(
        tmp_path, monkeypatch):
    # what `serve run` hands build_app: args without their file's directory; the replicas that read the ranking
    # run elsewhere, so the path they get is absolute
    ranking(tmp_path, list(range(V)))
    monkeypatch.chdir(tmp_path)
    args = {**TINY_ARGS, "models": {**TINY_ARGS["models"], "drafter": {
        **TINY_ARGS["models"]["drafter"], "draft_vocab": {"file": "vocab.json", "size": 128}}}}
    assert parse_config(args).models.drafter.draft_vocab.file == str(tmp_path / "vocab.json")

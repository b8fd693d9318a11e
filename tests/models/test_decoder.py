"""DecoderStack against the Hugging Face forward; slim stacks against partially loaded checkpoints."""

from __future__ import annotations

import shutil
from types import SimpleNamespace

import pytest
import torch

from via_sd_ray.errors import ConfigError
from via_sd_ray.models import tiny
from via_sd_ray.models.decoder import DecoderStack
from via_sd_ray.models.loading import ResolvedSource, load_model, resolve

IDS = [17, 200, 3, 99, 45, 45, 120, 7, 250, 31, 64, 64, 9, 180, 222, 5, 77, 140, 33, 2]
SLIM = [0, 1, 3]


def logits(stack: DecoderStack, ids: list[int] = IDS, chunks: list[int] | None = None, capacity: int = 256):
    """Logits [len(ids), V] of every position, running ``ids`` in ``chunks`` (default: one pass); and the cache."""
    cache, out, start = stack.new_cache(capacity), [], 0
    for size in chunks or [len(ids)]:
        out.append(stack(ids[start : start + size], cache, size))
        start += size
    assert start == len(ids)
    return torch.cat(out), cache


@pytest.fixture(scope="module")
def verifier():
    return tiny.tiny_model("verifier", torch.float64)


@pytest.fixture(scope="module")
def from_dir(tiny_dir):
    return load_model(ResolvedSource("dir", str(tiny_dir)), "float64")


@pytest.mark.parametrize("model_type", ["qwen2", "llama"])
def test_stack_logits_equal_the_hugging_face_forward(model_type):
    model = tiny.tiny_model("verifier", torch.float64, model_type=model_type)
    ours, _ = logits(DecoderStack(model))
    with torch.no_grad():
        theirs = model(torch.tensor([IDS])).logits[0]  # [T, V]
    assert ours.dtype == torch.float32  # the stack hands out float32 logits
    assert torch.allclose(ours.double(), theirs, atol=1e-5)
    assert (ours.argmax(-1) == theirs.argmax(-1)).all()


@pytest.mark.parametrize("chunks", [[1] * 20, [5, 1, 4, 1, 9], [19, 1]])
def test_incremental_decoding_equals_one_pass(verifier, chunks):
    stack = DecoderStack(verifier)
    whole, whole_cache = logits(stack)
    parts, parts_cache = logits(stack, chunks=chunks, capacity=4)  # also grows the cache from 4 slots
    assert torch.allclose(parts, whole, atol=1e-6)
    assert parts_cache.token_ids == whole_cache.token_ids == IDS
    n = len(IDS)
    assert torch.allclose(parts_cache.data[..., :n, :], whole_cache.data[..., :n, :], atol=1e-10)


def test_stack_returns_only_the_last_logits_asked_for(verifier):
    stack = DecoderStack(verifier)
    whole, _ = logits(stack)
    last3 = stack(IDS, stack.new_cache(), 3)
    assert torch.allclose(last3, whole[-3:], atol=1e-6)


def test_slim_stack_shares_the_full_model_modules(verifier):
    full, slim = DecoderStack(verifier), DecoderStack(verifier, SLIM)
    assert slim.layer_ids == SLIM
    assert [id(m) for m in slim.layers] == [id(full.layers[i]) for i in SLIM]
    assert slim.lm_head is full.lm_head and slim.embed_tokens is full.embed_tokens
    assert slim.new_cache().shape[0] == len(SLIM)


def test_checkpoint_directory_loads_the_tiny_model(verifier, from_dir):
    assert torch.allclose(logits(DecoderStack(from_dir))[0], logits(DecoderStack(verifier))[0], atol=1e-6)


def test_partial_loading_reads_the_slim_layers(from_dir, tiny_dir):
    partial = load_model(ResolvedSource("dir", str(tiny_dir)), "float64", layers=SLIM)
    assert len(partial.model.layers) == len(SLIM)
    for new, orig in enumerate(SLIM):
        assert torch.equal(partial.model.layers[new].mlp.down_proj.weight,
                           from_dir.model.layers[orig].mlp.down_proj.weight)
    slim_logits, _ = logits(DecoderStack(from_dir, SLIM))
    assert torch.allclose(logits(DecoderStack(partial))[0], slim_logits, atol=1e-6)
    # and the comparison can tell layer sets apart
    other, _ = logits(DecoderStack(from_dir, [0, 1, 2]))
    assert not torch.allclose(other, slim_logits, atol=1e-3)


def test_partial_loading_of_a_tiny_source_keeps_the_same_layers(verifier):
    partial = load_model(ResolvedSource("tiny", "verifier"), "float64", layers=SLIM)
    assert torch.allclose(logits(DecoderStack(partial))[0], logits(DecoderStack(verifier, SLIM))[0], atol=1e-6)


def test_directory_without_safetensors_is_refused(tiny_dir, tmp_path):
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_dir / name, tmp_path / name)
    with pytest.raises(ConfigError, match="safetensors"):
        resolve(str(tmp_path))
    with pytest.raises(ConfigError, match="safetensors"):
        load_model(ResolvedSource("dir", str(tmp_path)), "float64", layers=SLIM)


@pytest.mark.parametrize("layers", [[1, 0], [0, 0, 1], [0, 4], [], [-1, 2]])
def test_bad_slim_layers_name_the_field(verifier, layers):
    with pytest.raises(ConfigError, match=r"slim\.layers: expected increasing distinct indices in \[0, 3\]"):
        DecoderStack(verifier, layers)


def test_unsupported_architecture_is_a_config_error():
    with pytest.raises(ConfigError, match=r"architecture.*'gpt2'"):
        DecoderStack(SimpleNamespace(config=SimpleNamespace(model_type="gpt2")))

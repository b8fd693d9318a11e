"""A GGUF checkpoint's 4-bit blocks served as they are (models/gguf_int4.py): Q4_K / Q4_0 / Q4_1 codes read
into the int4 layout equal gguf-py's de-quantization of the same blocks, and a tiny model quantized
through this path decodes the same greedy tokens as its de-quantized copy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFWriter, quants

from via_sd_ray.models import gguf_int4
from via_sd_ray.models.gguf_int4 import Q4_0, Q4_1, Q4_K, read_q4
from via_sd_ray.models.quant import Int4WeightOnlyLinear
from via_sd_ray.models.tiny import tiny_model

KINDS = {Q4_0: GGMLQuantizationType.Q4_0, Q4_1: GGMLQuantizationType.Q4_1, Q4_K: GGMLQuantizationType.Q4_K}


def random_blocks(kind: int, rows: int, inputs: int, seed: int = 0) -> np.ndarray:
    """Random raw blocks of ``kind`` for a [rows, inputs] tensor: random codes and packed scales, with
    the fp16 factors set to small positive values (random bytes would give inf / NaN)."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(rows * inputs // gguf_int4.BLOCK_WEIGHTS[kind],
                                        gguf_int4.BLOCK_BYTES[kind]), dtype=np.uint8)
    factors = 2 if kind == Q4_0 else 4  # d (Q4_0); d, m (Q4_1); d, dmin (Q4_K)
    values = rng.uniform(-0.05 if kind == Q4_1 else 1e-4, 0.05, size=(blocks.shape[0], factors // 2))
    blocks[:, :factors] = values.astype(np.float16).view(np.uint8).reshape(blocks.shape[0], factors)
    return blocks.reshape(rows, -1)


@pytest.mark.parametrize("kind", [Q4_K, Q4_0, Q4_1], ids=["Q4_K", "Q4_0", "Q4_1"])
def test_codes_scales_and_offsets_equal_the_gguf_dequantization(kind):
    rows, inputs = 48, 512
    blocks = random_blocks(kind, rows, inputs)
    weights = read_q4(kind, blocks, (rows, inputs))
    assert weights.codes.dtype == torch.uint8 and int(weights.codes.max()) <= 15
    assert weights.scale.shape == weights.low.shape == (rows, inputs // 32)
    reference = torch.from_numpy(quants.dequantize(blocks, KINDS[kind]).reshape(rows, inputs))
    assert torch.equal(weights.dequantize(), reference)  # float32, exactly: the same affine groups


@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-5), (torch.float32, 2e-2), (torch.bfloat16, 2e-2)])
def test_the_int4_layer_computes_with_the_files_weights(dtype, tolerance):
    rows, inputs = 64, 256
    weights = read_q4(Q4_K, random_blocks(Q4_K, rows, inputs, seed=1), (rows, inputs))
    bias = torch.randn(rows, dtype=dtype)
    layer = Int4WeightOnlyLinear.from_codes(weights.codes, weights.scale, weights.low, bias, dtype)
    x = torch.randn(3, 5, inputs)
    reference = x.double() @ weights.dequantize().double().T + bias.double()
    out = layer(x.to(dtype))
    assert out.dtype == dtype and out.shape == (3, 5, rows)
    assert float((out.double() - reference).abs().max()) <= tolerance * float(reference.abs().max())


def llama_permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """What llama.cpp's converter does to a llama checkpoint's q / k rows (its rotary layout)."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, -1).swapaxes(1, 2).reshape(weight.shape)


def write_gguf(model, path, kind: GGMLQuantizationType) -> dict[str, torch.Tensor]:
    """The model's decoder-layer linears quantized to ``kind`` in a GGUF file at ``path`` (as llama.cpp lays
    them out); returns their de-quantized weights by module name."""
    config = model.config
    writer = GGUFWriter(str(path), config.model_type)
    dequantized = {}
    for index in range(config.num_hidden_layers):
        for module, short in gguf_int4.LAYER_LINEARS.items():
            name = f"model.layers.{index}.{module}"
            weight = model.get_submodule(name).weight.detach().float().numpy()
            heads = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads}.get(short)
            stored = llama_permute(weight, heads) if config.model_type == "llama" and heads else weight
            blocks = quants.quantize(stored, kind)
            restored = quants.dequantize(blocks, kind).reshape(weight.shape)
            if config.model_type == "llama" and heads:  # the loader undoes the permutation
                restored = restored[gguf_int4.unpermute_rows(heads, weight.shape[0]).numpy()]
            dequantized[name] = torch.from_numpy(np.ascontiguousarray(restored))
            writer.add_tensor(f"blk.{index}.{short}.weight", blocks, raw_shape=blocks.shape, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dequantized


@pytest.mark.parametrize("model_type", ["qwen2", "llama"])
@pytest.mark.parametrize("kind", [GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1], ids=["Q4_0", "Q4_1"])
def test_a_tiny_model_through_the_int4_path_decodes_as_its_dequantized_copy(tmp_path, model_type, kind):
    path = tmp_path / "tiny.gguf"
    dequantized = write_gguf(tiny_model("verifier", model_type=model_type), path, kind)
    # float64 models: the int4 kernel then runs in float32 (bf16 otherwise), so only the float32 rounding
    # of the per-group scales and offsets separates the two
    copy = tiny_model("verifier", dtype=torch.float64, model_type=model_type)
    with torch.no_grad():
        for name, weight in dequantized.items():
            copy.get_submodule(name).weight.copy_(weight)
    served = tiny_model("verifier", dtype=torch.float64, model_type=model_type)
    counts = gguf_int4.apply_gguf_int4(served, path)
    assert counts["int4"] == len(dequantized) == 7 * served.config.num_hidden_layers
    assert counts["float"] == 1  # the LM head: not in the file
    ids = torch.tensor([[5, 77, 120, 33, 9]])
    with torch.inference_mode():
        want = copy.generate(ids, max_new_tokens=32, do_sample=False, min_new_tokens=32)
        got = served.generate(ids, max_new_tokens=32, do_sample=False, min_new_tokens=32)
        logits = (served(want).logits - copy(want).logits).abs().max()
    assert got.tolist() == want.tolist()
    assert float(logits) < 1e-3


def test_a_slim_process_reads_the_layers_it_holds(tmp_path):
    from via_sd_ray.models.decoder import keep_layers

    path = tmp_path / "tiny.gguf"
    dequantized = write_gguf(tiny_model("verifier"), path, GGMLQuantizationType.Q4_1)
    slim = keep_layers(tiny_model("verifier", dtype=torch.float64), [0, 2])
    gguf_int4.apply_gguf_int4(slim, path, layers=[0, 2])
    held = slim.get_submodule("model.layers.1.mlp.up_proj")
    x = torch.randn(2, held.in_features, dtype=torch.float64)
    assert torch.allclose(held(x), x @ dequantized["model.layers.2.mlp.up_proj"].double().T, atol=1e-5)


def test_a_shape_mismatch_names_the_tensor(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_gguf(tiny_model("verifier"), path, GGMLQuantizationType.Q4_0)
    other = tiny_model("verifier-wide")
    with pytest.raises(ValueError, match=r"model.layers.0.self_attn.q_proj is \(64, 64\) in the GGUF file"):
        gguf_int4.apply_gguf_int4(other, path)

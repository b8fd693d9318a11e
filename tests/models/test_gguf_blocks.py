"""A GGUF checkpoint's blocks served as they are (models/gguf_blocks.py): Q4_K / Q4_0 / Q4_1 / Q5_0 / Q5_1 /
Q6_K codes read into the packed layout equal gguf-py's de-quantization of the same blocks, the packed layer
computes with the file's weights (to the fp16 rounding of the group scales), and a tiny model quantized
through this path decodes the same greedy tokens as its de-quantized copy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFWriter, quants

from via_sd_ray.models import gguf_blocks
from via_sd_ray.models.gguf_blocks import Q4_0, Q4_1, Q4_K, Q5_0, Q5_1, Q6_K, read_blocks
from via_sd_ray.models.quant import PackedLinear
from via_sd_ray.models.tiny import tiny_model

KINDS = {Q4_0: GGMLQuantizationType.Q4_0, Q4_1: GGMLQuantizationType.Q4_1, Q4_K: GGMLQuantizationType.Q4_K,
         Q5_0: GGMLQuantizationType.Q5_0, Q5_1: GGMLQuantizationType.Q5_1, Q6_K: GGMLQuantizationType.Q6_K}
NAMES = {kind: kind_type.name for kind, kind_type in KINDS.items()}


def random_blocks(kind: int, rows: int, inputs: int, seed: int = 0) -> np.ndarray:
    """Random raw blocks of ``kind`` for a [rows, inputs] tensor: random codes and packed scales, with
    the fp16 factors set to small positive values (random bytes would give inf / NaN)."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(rows * inputs // gguf_blocks.BLOCK_WEIGHTS[kind],
                                        gguf_blocks.BLOCK_BYTES[kind]), dtype=np.uint8)
    # where the fp16 factors lie: d (Q4_0, Q5_0); d, m (Q4_1, Q5_1); d, dmin (Q4_K); d last (Q6_K)
    at = {Q4_0: 0, Q5_0: 0, Q4_1: 0, Q5_1: 0, Q4_K: 0, Q6_K: 208}[kind]
    factors = 2 if kind in (Q4_0, Q5_0, Q6_K) else 4
    values = rng.uniform(-0.05 if kind in (Q4_1, Q5_1) else 1e-4, 0.05, size=(blocks.shape[0], factors // 2))
    blocks[:, at:at + factors] = values.astype(np.float16).view(np.uint8).reshape(blocks.shape[0], factors)
    return blocks.reshape(rows, -1)


@pytest.mark.parametrize("kind", list(KINDS), ids=list(NAMES.values()))
def test_codes_scales_and_offsets_equal_the_gguf_dequantization(kind):
    rows, inputs = 48, 512
    blocks = random_blocks(kind, rows, inputs)
    weights = read_blocks(kind, blocks, (rows, inputs))
    code_bits = {Q4_0: 4, Q4_1: 4, Q4_K: 4, Q5_0: 5, Q5_1: 5, Q6_K: 6}[kind]
    assert weights.codes.dtype == torch.uint8 and int(weights.codes.max()) == 2**code_bits - 1
    assert weights.scale.shape == weights.low.shape == (rows, inputs // weights.group)
    reference = torch.from_numpy(quants.dequantize(blocks, KINDS[kind]).reshape(rows, inputs))
    assert torch.equal(weights.dequantize(), reference)  # float32, exactly: the same affine groups


@pytest.mark.parametrize("kind", [Q4_K, Q6_K, Q5_1], ids=["Q4_K", "Q6_K", "Q5_1"])
@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 2e-3), (torch.float32, 2e-3), (torch.bfloat16, 2e-2)])
def test_the_packed_layer_computes_with_the_files_weights(kind, dtype, tolerance):
    """Only the fp16 rounding of each group's scale and offset (2^-11, relative) separates the layer's weights
    from the file's; in bf16 the activations' rounding adds to it."""
    rows, inputs = 72, 512  # 72 rows: two full blocks of 32 and a part of one
    weights = read_blocks(kind, random_blocks(kind, rows, inputs, seed=1), (rows, inputs))
    bias = torch.randn(rows, dtype=dtype)
    layer = PackedLinear.from_codes(weights.codes, weights.scale, weights.low, bias, weights.bits, weights.group)
    x = torch.randn(3, 5, inputs)
    reference = x.double() @ weights.dequantize().double().T + bias.double()
    out = layer(x.to(dtype))
    assert out.dtype == dtype and out.shape == (3, 5, rows)
    assert float((out.double() - reference).abs().max()) <= tolerance * float(reference.abs().max())
    held, file = layer.weight.double(), weights.dequantize().double()  # the kernel's: the file's, to fp16 scales
    assert float((held - file).abs().max()) <= 2**-10 * float(file.abs().max())


def llama_permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """What llama.cpp's converter does to a llama checkpoint's q / k rows (its rotary layout)."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, -1).swapaxes(1, 2).reshape(weight.shape)


def write_gguf(model, path, kind: GGMLQuantizationType,
               head: GGMLQuantizationType | None = None) -> dict[str, torch.Tensor]:
    """The model's decoder-layer linears quantized to ``kind`` in a GGUF file at ``path`` (as llama.cpp lays
    them out); returns their de-quantized weights by module name."""
    config = model.config
    writer = GGUFWriter(str(path), config.model_type)
    dequantized = {}
    for index in range(config.num_hidden_layers):
        for module, short in gguf_blocks.LAYER_LINEARS.items():
            name = f"model.layers.{index}.{module}"
            weight = model.get_submodule(name).weight.detach().float().numpy()
            heads = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads}.get(short)
            stored = llama_permute(weight, heads) if config.model_type == "llama" and heads else weight
            blocks = quants.quantize(stored, kind)
            restored = quants.dequantize(blocks, kind).reshape(weight.shape)
            if config.model_type == "llama" and heads:  # the loader undoes the permutation
                restored = restored[gguf_blocks.unpermute_rows(heads, weight.shape[0]).numpy()]
            dequantized[name] = torch.from_numpy(np.ascontiguousarray(restored))
            writer.add_tensor(f"blk.{index}.{short}.weight", blocks, raw_shape=blocks.shape, raw_dtype=kind)
    if head is not None:  # the LM head in its own format, as Q4_K_M files hold it (in Q6_K)
        weight = model.lm_head.weight.detach().float().numpy()
        blocks = quants.quantize(weight, head)
        dequantized["lm_head"] = torch.from_numpy(quants.dequantize(blocks, head).reshape(weight.shape))
        writer.add_tensor("output.weight", blocks, raw_shape=blocks.shape, raw_dtype=head)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dequantized


@pytest.mark.parametrize("model_type, kind, head", [
    ("qwen2", GGMLQuantizationType.Q4_0, None), ("llama", GGMLQuantizationType.Q4_0, None),
    ("qwen2", GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q5_1), ("llama", GGMLQuantizationType.Q4_1, None),
    ("qwen2", GGMLQuantizationType.Q5_0, GGMLQuantizationType.Q5_0)], ids=str)
def test_a_tiny_model_through_the_gguf_path_decodes_as_its_dequantized_copy(tmp_path, model_type, kind, head):
    path = tmp_path / "tiny.gguf"
    dequantized = write_gguf(tiny_model("verifier", model_type=model_type), path, kind, head)
    # float64 models: the kernel then runs in float32 (bf16 otherwise), so only the fp16 rounding of the
    # per-group scales and offsets and float32 arithmetic separate the two
    copy = tiny_model("verifier", dtype=torch.float64, model_type=model_type)
    with torch.no_grad():
        for name, weight in dequantized.items():
            copy.get_submodule(name).weight.copy_(weight)
    served = tiny_model("verifier", dtype=torch.float64, model_type=model_type)
    counts = gguf_blocks.apply_gguf_blocks(served, path)
    layers = 7 * served.config.num_hidden_layers
    assert counts["int4" if kind.name.startswith("Q4") else "int6"] >= layers  # 4-bit codes at 4 bits, 5-bit at 6
    assert counts["int4"] + counts["int6"] == len(dequantized) == layers + (head is not None)
    assert counts["float"] == (head is None)  # an LM head not in the file keeps its float weight
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
    gguf_blocks.apply_gguf_blocks(slim, path, layers=[0, 2])
    held = slim.get_submodule("model.layers.1.mlp.up_proj")
    x = torch.randn(2, held.in_features, dtype=torch.float64)
    assert torch.allclose(held(x), x @ dequantized["model.layers.2.mlp.up_proj"].double().T, atol=1e-5)


def test_a_shape_mismatch_names_the_tensor(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_gguf(tiny_model("verifier"), path, GGMLQuantizationType.Q4_0)
    other = tiny_model("verifier-wide")
    with pytest.raises(ValueError, match=r"model.layers.0.self_attn.q_proj is \(64, 64\) in the GGUF file"):
        gguf_blocks.apply_gguf_blocks(other, path)


def test_a_bf16_checkpoint_with_its_gguf_loads_at_its_own_width_to_the_same_model(tmp_path, monkeypatch):
    """A registry checkpoint (bf16 safetensors beside the GGUF file it came from) served in float32: the layers
    the file's blocks replace are never widened, and the model equals one loaded wide and then replaced."""
    from transformers import AutoModelForCausalLM

    from via_sd_ray.models import loading, qmm

    if qmm.available() is not None:
        pytest.skip(f"the qmm kernel cannot be built here: {qmm.available()}")
    checkpoint = tmp_path / "checkpoint"
    tiny_model("verifier", dtype=torch.bfloat16).save_pretrained(checkpoint)
    write_gguf(tiny_model("verifier", dtype=torch.bfloat16), checkpoint / "model.gguf", GGMLQuantizationType.Q4_1)
    monkeypatch.setattr(loading.ResolvedSource, "gguf", lambda self: checkpoint / "model.gguf")
    resolved = loading.ResolvedSource("dir", str(checkpoint), registry="tiny-registry-model")
    assert loading._narrower(resolved, torch.float32) is torch.bfloat16
    read, original = [], loading._load
    monkeypatch.setattr(loading, "_load", lambda source, dtype, *rest: read.append(dtype) or original(source, dtype,
                                                                                                        *rest))

    served = loading.load_model(resolved, "float32", precision="gguf")
    assert read == [torch.bfloat16]
    wide = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    gguf_blocks.apply_gguf_blocks(wide, checkpoint / "model.gguf")
    packed = [m for m in served.modules() if isinstance(m, PackedLinear)]
    assert len(packed) == 7 * served.config.num_hidden_layers
    assert all(m.meta.dtype == torch.float16 for m in packed)  # the scales keep the file's format
    floats = {name: p for name, p in served.named_parameters()}
    assert floats and all(p.dtype == torch.float32 for p in floats.values()) and served.dtype == torch.float32
    table = served.get_input_embeddings()  # held at the checkpoint's bf16, its rows widened as they are looked up
    assert isinstance(table, loading.WideningEmbedding) and table.weight.dtype == torch.bfloat16
    floats["model.embed_tokens.weight"] = table.weight
    for name, p in wide.named_parameters():
        assert torch.equal(floats[name].float(), p), name
    ids = torch.tensor([[5, 77, 120, 33, 9]])
    with torch.inference_mode():
        assert torch.equal(served(ids).logits, wide(ids).logits)


def test_an_embedding_is_held_narrow_only_where_that_keeps_its_values_and_no_head_shares_it():
    from via_sd_ray.models import kernels
    from via_sd_ray.models.loading import WideningEmbedding, narrow_embedding

    model = tiny_model("verifier", dtype=torch.bfloat16).float()  # bf16 values in float32
    ids = torch.tensor([[5, 77, 120, 33, 9]])
    with torch.inference_mode():
        before = model(ids).logits
    assert narrow_embedding(model, rows_at_once=100)
    table = model.get_input_embeddings()
    assert isinstance(table, WideningEmbedding) and table.weight.dtype == torch.bfloat16
    assert model.dtype == torch.float32  # the table is a buffer: the first parameter is still a float32 one
    with torch.inference_mode():
        assert model.model.embed_tokens(ids).dtype == torch.float32
        assert torch.equal(model(ids).logits, before)
    assert not narrow_embedding(model)  # already narrow
    if torch.backends.mkldnn.is_available():  # what reads the dtype from the first parameter sees float32
        kernels.apply(model, "onednn")
    exact = tiny_model("verifier", dtype=torch.float32)  # float32 values: not bf16 ones
    assert not narrow_embedding(exact) and exact.get_input_embeddings().weight.dtype == torch.float32
    tied = tiny_model("verifier", dtype=torch.bfloat16).float()
    tied.lm_head.weight = tied.model.embed_tokens.weight  # a float head computes with the table
    assert not narrow_embedding(tied) and tied.lm_head.weight is tied.model.embed_tokens.weight


def test_widening_what_the_blocks_left_keeps_tied_weights_one_tensor():
    from via_sd_ray.models.loading import _cast_float

    model = tiny_model("verifier", dtype=torch.bfloat16)
    model.lm_head.weight = model.model.embed_tokens.weight  # tied, as small checkpoints are
    _cast_float(model, torch.float32)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.lm_head.weight.dtype == torch.float32 and model.config.dtype == torch.float32

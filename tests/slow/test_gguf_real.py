"""The GGUF 4-bit path on the real checkpoints: one real SmolLM2 tensor (Q4_1) read into the int4 layout
equals gguf-py's de-quantization and the registry's converted float checkpoint, and the 4-bit SmolLM2
decodes greedily like its float checkpoint. Run with ``pytest -m slow`` (pulls smollm2-135m-instruct)."""

from __future__ import annotations

import pytest
import torch

from via_sd_ray.models import registry

pytestmark = pytest.mark.slow
MODEL = "smollm2-135m-instruct"


def test_a_real_q4_1_tensor_equals_the_gguf_dequantization_and_the_float_checkpoint():
    from gguf import GGUFReader, quants
    from safetensors import safe_open
    from transformers import AutoConfig

    from via_sd_ray.models import gguf_blocks

    path = registry.gguf_file(MODEL)
    config = AutoConfig.from_pretrained(path.parent)
    (tensor,) = [t for t in GGUFReader(str(path)).tensors if t.name == "blk.3.attn_q.weight"]
    assert tensor.tensor_type.name == "Q4_1"
    inputs, rows = (int(x) for x in tensor.shape)
    weights = gguf_blocks.read_blocks(int(tensor.tensor_type), tensor.data, (rows, inputs))
    reference = torch.from_numpy(quants.dequantize(tensor.data, tensor.tensor_type).reshape(rows, inputs))
    assert torch.equal(weights.dequantize(), reference)
    order = gguf_blocks.unpermute_rows(config.num_attention_heads, rows)  # llama: q rows as transformers has them
    with safe_open(str(path.parent / "model.safetensors"), "pt") as f:
        converted = f.get_tensor("model.layers.3.self_attn.q_proj.weight")
    assert torch.equal(weights.rows(order).dequantize().to(converted.dtype), converted)  # it is bf16(w)


def test_the_4_bit_smollm2_decodes_like_its_float_checkpoint():
    from via_sd_ray.models.loading import load_model, load_tokenizer, resolve

    source = resolve(MODEL)
    tokenizer = load_tokenizer(source)
    float_model = load_model(source, "float64", precision="bf16")
    int4_model = load_model(source, "float64", precision="gguf")  # the int4 kernel in float32
    ids = tokenizer("def fibonacci(n):", return_tensors="pt").input_ids
    with torch.inference_mode():
        want = float_model.generate(ids, max_new_tokens=32, do_sample=False)
        got = int4_model.generate(ids, max_new_tokens=32, do_sample=False)
    # the two differ only by float32 rounding (of the scales and offsets, and in the kernel)
    assert got.tolist() == want.tolist()

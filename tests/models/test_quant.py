"""Weight-only int8 linear layers."""

import pytest
import torch
from torch import nn

from via_sd_ray.models.quant import Int8WeightOnlyLinear, quantize_int8_weight_only


def test_int8_linear_is_close_to_float():
    torch.manual_seed(0)
    lin = nn.Linear(64, 32, bias=True)
    q = Int8WeightOnlyLinear(lin)
    x = torch.randn(5, 64)
    ref = lin(x)
    out = q(x)
    assert out.shape == ref.shape
    assert (out - ref).abs().max() < 0.02 * ref.abs().max()
    assert q.weight_int8.dtype == torch.int8 and q.scale.shape == (32,)


def test_bf16_path_and_model_replacement():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)).to(torch.bfloat16)
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    ref = model(x).float()
    quantize_int8_weight_only(model)
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    assert torch.allclose(model(x).float(), ref, atol=0.1)


def test_float64_falls_back_to_dequantized_matmul():
    lin = nn.Linear(8, 4).double()
    x = torch.randn(2, 8, dtype=torch.float64)
    assert torch.allclose(Int8WeightOnlyLinear(lin)(x), lin(x), atol=0.05)


def test_int4_linear_is_close_to_float_and_packs_on_cpu():
    from via_sd_ray.models.quant import PackedLinear, quantize

    torch.manual_seed(0)
    lin = nn.Linear(64, 48, bias=True).to(torch.bfloat16)
    q = PackedLinear.from_float(lin)
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    ref = lin(x).float()
    assert q.codes.dtype == torch.uint8 and q.codes.numel() == 64 * 64 // 2  # 48 rows padded to a block of 64
    assert (q(x).float() - ref).abs().max() < 0.1 * ref.abs().max()
    model = nn.Sequential(nn.Linear(64, 16), nn.Linear(16, 8)).to(torch.bfloat16)
    quantize(model, "int4-weight-only")
    assert isinstance(model[0], PackedLinear)
    assert isinstance(model[1], Int8WeightOnlyLinear)  # 16 inputs: not a multiple of the group size


def test_torchao_int8_model_equals_its_dequantized_reference_and_keeps_greedy_tokens():
    """The path every non-CPU device takes (torchao ``quantize_``), on the CPU where torchao's int8 runs: the
    quantized model's logits equal those of its own de-quantized weights, and greedy decoding agrees."""
    pytest.importorskip("torchao")
    from via_sd_ray.models.quant import quantize_torchao
    from via_sd_ray.models.tiny import tiny_model

    model = tiny_model("verifier")  # float32: the de-quantized reference holds the int8 weights exactly
    quantize_torchao(model, "int8-weight-only")
    reference = tiny_model("verifier")
    with torch.no_grad():  # the same int8 weights, de-quantized once into plain linear layers
        for (name, q), (_, ref) in zip(model.named_modules(), reference.named_modules()):
            if isinstance(ref, nn.Linear):
                ref.weight.copy_(q.weight.dequantize())
    ids = torch.tensor([[5, 17, 42, 9, 3]])
    with torch.no_grad():
        got, want = model(ids).logits.float(), reference(ids).logits.float()
    assert (got - want).abs().max() < 1e-3 * want.abs().max()
    greedy = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert model.generate(ids, **greedy).tolist() == reference.generate(ids, **greedy).tolist()


def test_int4_off_cpu_and_cuda_is_a_config_error_not_a_per_forward_dequantization():
    pytest.importorskip("torchao")
    from via_sd_ray.models.quant import quantize

    model = nn.Sequential(nn.Linear(64, 32)).to("meta")
    with pytest.raises(ValueError, match="int4-weight-only.*'meta'"):
        quantize(model, "int4-weight-only")

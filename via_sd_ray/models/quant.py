"""Weight-only quantization of a model's linear layers: int8 per output channel, or int4 in
groups of 32 input channels (asymmetric: ``w = scale * code + low`` per group).

Decoding one token on a CPU is bound by reading the weights, so smaller weights make a
forward pass faster while the activations stay in the model's dtype. int4 layers are built from
float weights (each group's min and max span the codes) or from the codes a GGUF checkpoint holds
(``models/gguf_blocks.py``: Q4_K / Q4_0 / Q4_1 blocks are such groups, so those layers are the
checkpoint's own weights). ``config.ModelConfig.precision`` chooses; int4 is the drafter's default
(a drafter's errors cost speed, never correctness).

On a CPU, int4 layers (and a GGUF checkpoint's Q6_K layers, at 8 bits a code) run on the grouped kernel
of ``models/qmm.py``, int8 on torch's ``_weight_int8pack_mm``. Why not a library: torchao 0.18, the
latest release, has no CPU int4 weight-only layout (its int4 weight-only tensors need CUDA or the mslk
kernels; its int8-activation layouts either de-quantize per call or need its C++ kernel library, which
the PyPI wheel does not load here), and torch's own ``_weight_int4pack_mm_for_cpu`` is a matrix-vector
kernel, 2x faster than bf16 at one token and no faster at five: SD's verify passes got nothing from 4
bits (README, 4-bit GGUF weights). On any other device the model goes through torchao's ``quantize_``
(int8 weight-only; int4 weight-only in tinygemm's tile-packed layout, groups of 32), and a device
neither path serves is a config error: weights are never de-quantized per forward.
"""

from __future__ import annotations

import torch
from torch import nn

from via_sd_ray.models import qmm

_PACKED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)  # what the CPU int8 kernel takes


class Int8WeightOnlyLinear(nn.Module):
    """``nn.Linear`` with int8 weights [out, in] and one scale per output channel."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        weight = linear.weight.detach().float()
        scale = weight.abs().amax(dim=1).clamp_min(1e-8) / 127.0  # [out]
        self.register_buffer("weight_int8", torch.round(weight / scale[:, None]).clamp(-128, 127).to(torch.int8))
        self.register_buffer("scale", scale.to(linear.weight.dtype))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    @property
    def weight(self) -> torch.Tensor:
        """The de-quantized weight (for code that reads ``.weight``, e.g. shape checks)."""
        return self.weight_int8.to(self.scale.dtype) * self.scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)  # [N, in]
        if flat.device.type == "cpu" and flat.dtype == self.scale.dtype and flat.dtype in _PACKED_DTYPES:
            out = torch._weight_int8pack_mm(flat, self.weight_int8, self.scale)  # [N, out]
        else:
            out = nn.functional.linear(flat, self.weight.to(flat.dtype))
        if self.bias is not None:
            out = out + self.bias
        return out.view(*x.shape[:-1], self.out_features)


class PackedLinear(nn.Module):
    """``nn.Linear`` with low-bit weights in groups of ``group`` input channels: ``w = scale * code + low`` per
    group and output row, packed for the grouped CPU kernel (``models/qmm.py``). Built from a float layer
    (``PackedLinear.from_float``: int4, each group's min and max span the codes 0..15) or from codes a
    checkpoint already holds (``from_codes``: a GGUF file's Q4 blocks at 4 bits, its Q6_K blocks at 8,
    models/gguf_blocks.py)."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, low: torch.Tensor, bias: torch.Tensor | None,
                 bits: int = 4, group: int = 32):
        super().__init__()
        assert codes.device.type == "cpu", "other devices quantize through torchao (quantize)"
        self.out_features, self.in_features = codes.shape
        self.bits, self.group = bits, group
        packed, meta = qmm.pack(codes, scale, low, bits, group)
        self.register_buffer("codes", packed)
        self.register_buffer("meta", meta)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scale: torch.Tensor, low: torch.Tensor, bias: torch.Tensor | None,
                   bits: int = 4, group: int = 32) -> PackedLinear:
        """``codes`` [out, in] below 2**bits, ``scale`` and ``low`` [out, in / group]: ``w = scale * code + low``."""
        return cls(codes, scale, low, bias, bits, group)

    @classmethod
    def from_float(cls, linear: nn.Linear, group: int = 32) -> PackedLinear:
        """int4 from float weights: each group's min and max span the codes 0..15."""
        weight = linear.weight.detach().float()  # [out, in]
        out_features, in_features = weight.shape
        assert in_features % group == 0, (in_features, group)
        grouped = weight.view(out_features, in_features // group, group)  # [out, in / g, g]
        low, high = grouped.amin(-1), grouped.amax(-1)
        scale = ((high - low) / 15.0).clamp_min(1e-8)
        codes = ((grouped - low[..., None]) / scale[..., None]).round().clamp(0, 15).view(out_features, in_features)
        return cls(codes.to(torch.uint8), scale, low, linear.bias, 4, group)

    @property
    def weight(self) -> torch.Tensor:
        """The de-quantized weight [out, in] in float32 (for checks; the forward never builds it)."""
        eye = torch.eye(self.in_features, dtype=torch.float32)
        return qmm.matmul(eye, self.codes, self.meta, self.out_features, self.bits, self.group).T

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = qmm.matmul(x, self.codes, self.meta, self.out_features, self.bits, self.group)
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, group={self.group}"


SCHEMES = ("none", "int8-weight-only", "int4-weight-only")


def quantize(model: nn.Module, scheme: str) -> nn.Module:
    """Replace every ``nn.Linear`` of ``model`` in place (the LM head included). int4 falls back to
    int8 for a layer the grouped kernel cannot take (inputs not a multiple of 32)."""
    if scheme == "none":
        return model
    if scheme not in SCHEMES:
        raise ValueError(f"quantization: expected one of {SCHEMES}, received {scheme!r}")
    device = next(model.parameters()).device
    if device.type != "cpu":
        return quantize_torchao(model, scheme)
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if not isinstance(child, nn.Linear):
                continue
            if scheme == "int4-weight-only" and child.in_features % 32 == 0:
                setattr(module, name, PackedLinear.from_float(child))
            else:
                setattr(module, name, Int8WeightOnlyLinear(child))
    return model


def quantize_torchao(model: nn.Module, scheme: str) -> nn.Module:
    """``quantize`` through torchao (the path of every device but the CPU; int8 works on the CPU too)."""
    try:
        from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_
    except ImportError:
        raise ValueError(f"quantization: {scheme!r} off the CPU runs through torchao; install it "
                         "(pip install 'via-sd-ray[gpu]') or set quantization: none") from None
    device = next(model.parameters()).device
    if scheme == "int4-weight-only" and device.type != "cuda":
        raise ValueError(f"quantization: expected a CPU or a CUDA device for 'int4-weight-only', received "
                         f"{device.type!r} (torchao's int4 kernels are CUDA-only); use int8-weight-only")
    config = (Int4WeightOnlyConfig(group_size=32, int4_packing_format="tile_packed_to_4d")
              if scheme == "int4-weight-only" else Int8WeightOnlyConfig())
    quantize_(model, config)
    return model


def quantize_int8_weight_only(model: nn.Module) -> nn.Module:
    return quantize(model, "int8-weight-only")

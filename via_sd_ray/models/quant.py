"""Weight-only int8 quantization of a model's linear layers (per output channel).

Decoding one token on a CPU is bound by reading the weights, so int8 weights make a
forward pass about 2.7x faster than bf16 (the 0.5B drafter: 26 ms vs 70 ms here) while
the activations stay in the model's dtype. Measured on full-model generated code, the
quantized 0.5B drafter agrees with the 1.5B verifier's argmax on 83.6% of tokens against
84.8% for bf16, so it is the default for the drafter: a drafter's errors cost speed,
never correctness. The verifier tiers stay unquantized unless configured.
"""

from __future__ import annotations

import torch
from torch import nn


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


def quantize_int8_weight_only(model: nn.Module) -> nn.Module:
    """Replace every ``nn.Linear`` of ``model`` in place (the LM head included)."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, name, Int8WeightOnlyLinear(child))
    return model

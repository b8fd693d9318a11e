"""The kernel behind a model's ``nn.Linear`` layers, chosen per device and dtype.

On a CPU, torch computes a float32 ``nn.Linear`` with MKL's sgemm. On the 2-core AMD EPYC
(AVX2) build machine that costs 3.6x as much for 6 rows as for 1 (the 1.5B verifier: 1.87 s
for a 6-token verification pass, 0.53 s for one decoding step), which takes most of
speculative decoding's gain: a verifier pass over a block should cost little more than one
step, since both read every weight once. oneDNN, with each weight reordered once at load
into its blocked layout, runs the same pass in 0.79 s and the step in 0.46 s. ``auto``
uses it for float32 on CPUs; bf16 on CPU already goes through oneDNN in torch, and CUDA
keeps cuBLAS.
"""

from __future__ import annotations

import torch
from torch import nn

KERNELS = ("auto", "aten", "onednn")


class OneDNNLinear(nn.Module):
    """A float32 ``nn.Linear`` whose weight is held in oneDNN's layout (reordered once)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach()
        bias = linear.bias.detach() if linear.bias is not None else weight.new_zeros(self.out_features)
        self.register_buffer("weight", weight.to_mkldnn(), persistent=False)
        self.register_buffer("bias", bias.to_mkldnn(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).contiguous()  # [N, in]
        out = torch._C._nn.mkldnn_linear(flat.to_mkldnn(), self.weight, self.bias).to_dense()  # [N, out]
        return out.view(*x.shape[:-1], self.out_features)


def resolve(kernel: str, device: torch.device | str, dtype: torch.dtype) -> str:
    """The kernel ``kernel`` names for weights of ``dtype`` on ``device`` (``auto`` decided)."""
    if kernel not in KERNELS:
        raise ValueError(f"linear_kernel: expected one of {KERNELS}, received {kernel!r}")
    usable = torch.device(device).type == "cpu" and dtype == torch.float32 and torch.backends.mkldnn.is_available()
    if kernel == "onednn" and not usable:
        raise ValueError(f"linear_kernel: 'onednn' needs float32 weights on a CPU with torch's oneDNN, "
                         f"received {dtype} on {device}")
    if kernel == "auto":
        return "onednn" if usable else "aten"
    return kernel


def apply(model: nn.Module, kernel: str) -> nn.Module:
    """Put every float32 ``nn.Linear`` of ``model`` (the LM head included) on ``kernel``, in place.
    Quantized layers keep their own kernels."""
    first = next(model.parameters())
    if resolve(kernel, first.device, first.dtype) == "aten":
        return model
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.Linear and child.weight.dtype == torch.float32:
                setattr(module, name, OneDNNLinear(child))
    return model

"""One decoder layer as a short function of its modules (the eager hot path of ``DecoderStack``).

transformers' layer ``forward`` runs ~60 small ops and as many Python calls a layer; for a small model
(or a GPU at batch 1) that, not the arithmetic, is the cost of a pass. A ``LayerPlan`` looks the layer's
modules up once and calls the cheapest form of each: a float ``nn.Linear`` as the ``mm`` it runs (``rows_linear``),
our own layers' ``forward`` directly, anything else (tensor-parallel layers that all-reduce, oneDNN ones)
through its ``__call__``. With the fused projections of ``quant.fuse_projections`` (q / k / v in one call,
gate / up with SiLU in one), the C++ norm, rotary and attention ops of ``models/qmm.py`` on CPUs and a
table of rotary angles, a decode step of a layer is ~10 calls. On CPUs a model whose layers are all packed runs
the same ops from C++ instead (``decoder.NativeLayers``, ``decoder_layers`` in csrc/qmm.cpp); the plans remain
the path everywhere else (GPUs, float and tensor-parallel layers) and the reference the native loop is tested
against.
"""

from __future__ import annotations

import torch
from torch import nn

from via_sd_ray.models import qmm
from via_sd_ray.models.quant import FusedLinear, FusedSwiGLU, PackedLinear, SwiGLU

# rotary variants whose angles depend only on the position (not on the sequence length): tabulated
STATIC_ROPE = ("default", "linear", "llama3", "yarn")


def cheapest(module: nn.Module):
    """``module`` as the cheapest callable computing its forward of rows [N, in]."""
    if type(module) in (nn.Linear, FusedLinear):
        return rows_linear(module.weight, module.bias)
    if type(module) is FusedSwiGLU:
        linear = rows_linear(module.weight, module.bias)
        return lambda x: FusedSwiGLU.activate(linear(x))
    if isinstance(module, (PackedLinear, FusedLinear, SwiGLU)):
        return module.forward  # no hooks are registered on these
    # others (DeepSpeed's tensor-parallel layers slice their input as [B, T, H]) get the batch dimension
    # transformers' layers give them
    return lambda x: module(x[None])[0]


def rows_linear(weight: torch.Tensor, bias: torch.Tensor | None):
    """``F.linear`` of rows [N, in] as the one kernel it dispatches to (``mm`` / ``addmm`` of the transposed
    weight, bit for bit), without ``linear``'s and ``matmul``'s dispatch on the way: ~4 us a call on a CPU, as
    many of host time a projection at batch 1 on a GPU."""
    transposed = weight.t()
    if bias is None:
        return lambda x: torch.mm(x, transposed)
    return lambda x: torch.addmm(bias, x, transposed)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of ``x`` [H, N, D] (the half-split convention of these architectures)."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


class Norm:
    """An RMSNorm module applied to rows [N, H], after ``x += residual`` (in place: ``x`` is the residual stream)
    when one is given. ``fused`` (CPU): both in one C++ op (``qmm.rms_norm``, what the module computes); else
    ``torch.rms_norm`` (bit for bit the module in float32; on a CPU in bf16 ~60 us a row, a composite of
    converting ops). float64 models (tests) go through the module, which computes in float32 there."""

    def __init__(self, module: nn.Module):
        self.module, self.weight, self.eps = module, module.weight, module.variance_epsilon

    def __call__(self, x: torch.Tensor, fused: bool, residual: torch.Tensor | None = None) -> torch.Tensor:
        if x.dtype == torch.float64:
            return self.module(x if residual is None else x.add_(residual))
        if fused:
            return qmm.rms_norm(x, self.weight, self.eps, residual)
        if residual is not None:
            x.add_(residual)
        return torch.rms_norm(x, self.weight.shape, self.weight, self.eps)


class RotaryTable:
    """cos and sin of the rotary embedding by position: the model's own ``rotary_emb`` run once over a range of
    positions (doubled as longer sequences come), then looked up (one index op a pass instead of ~10)."""

    def __init__(self, rotary_emb: nn.Module):
        self.rotary_emb = rotary_emb
        self.static = getattr(rotary_emb, "rope_type", "default") in STATIC_ROPE
        self.cos = self.sin = None

    def at(self, positions: torch.Tensor | range, end: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [N, D] of ``positions`` [N] (all below ``end``; a ``range``: consecutive ones, looked up as
        views), in ``like``'s dtype."""
        if isinstance(positions, range):
            if not self.static:
                positions = torch.arange(positions.start, positions.stop, device=like.device)
            else:
                positions = slice(positions.start, positions.stop)
        if not self.static:
            cos, sin = self.rotary_emb(like[None], position_ids=positions[None])
            return cos[0], sin[0]
        if self.cos is None or end > len(self.cos) or self.cos.dtype != like.dtype or self.cos.device != like.device:
            size = max(256, 2 * end, 0 if self.cos is None else len(self.cos))
            span = torch.arange(size, device=like.device)[None]
            cos, sin = self.rotary_emb(like[None, :1], position_ids=span)
            self.cos, self.sin = cos[0], sin[0]
        return self.cos[positions], self.sin[positions]


def out_width(linear: nn.Module) -> int:
    """A projection's output width (DeepSpeed's tensor-parallel ``LinearLayer`` has no ``out_features``)."""
    return getattr(linear, "out_features", None) or linear.weight.shape[0]


class LayerPlan:
    """A decoder layer's callables, looked up once (see the module docstring)."""

    def __init__(self, layer: nn.Module, head_dim: int):
        attn, mlp = layer.self_attn, layer.mlp
        self.head_dim, self.layer_idx, self.scaling = head_dim, attn.layer_idx, attn.scaling
        self.input_norm, self.post_norm = Norm(layer.input_layernorm), Norm(layer.post_attention_layernorm)
        fused = getattr(attn, "via_qkv", None)
        self.qkv = cheapest(fused) if fused is not None else None
        parts = getattr(attn, "via_qkv_parts", 0)
        self.widths = [out_width(proj) for proj in (attn.q_proj, attn.k_proj, attn.v_proj)[:parts]]
        self.q, self.k = cheapest(attn.q_proj), cheapest(attn.k_proj)
        self.v = None if parts == 3 else cheapest(attn.v_proj)
        self.q_norm, self.k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)  # qwen3
        self.o = cheapest(attn.o_proj)
        swiglu = getattr(mlp, "via_swiglu", None)
        self.swiglu = cheapest(swiglu) if swiglu is not None else None
        self.gate, self.up, self.act = cheapest(mlp.gate_proj), cheapest(mlp.up_proj), mlp.act_fn
        self.down = cheapest(mlp.down_proj)

    def __call__(self, hidden: torch.Tensor, residual: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
                 packed) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer over the packed rows ``hidden`` [N, H] (the residual stream, once ``residual``, the previous
        layer's output, is added: in place, by the input norm); returns the stream and this layer's output."""
        n, d, fused = hidden.shape[0], self.head_dim, packed.fused
        x = self.input_norm(hidden, fused, residual)
        if self.qkv is not None:
            q, k, *rest = self.qkv(x).split_with_sizes(self.widths, dim=-1)
            v = rest[0] if rest else self.v(x)
        else:
            q, k, v = self.q(x), self.k(x), self.v(x)
        q, k, v = q.view(n, -1, d), k.view(n, -1, d), v.view(n, -1, d)  # [N, H, D]
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        attended = self.o(packed.attend(self.layer_idx, q, k, v, cos, sin, self.scaling))
        x = self.post_norm(hidden, fused, attended)
        return hidden, self.down(self.swiglu(x) if self.swiglu is not None else self.act(self.gate(x)) * self.up(x))

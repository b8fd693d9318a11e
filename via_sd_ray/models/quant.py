"""Weight-only quantization of a model's linear layers: int8 per output channel, or int4 in
groups of 32 input channels (asymmetric: ``w = scale * code + low`` per group).

Decoding one token on a CPU is bound by reading the weights, so smaller weights make a
forward pass faster while the activations stay in the model's dtype. int4 layers are built from
float weights (each group's min and max span the codes) or from the codes a GGUF checkpoint holds
(``models/gguf_blocks.py``: Q4_K / Q4_0 / Q4_1 blocks are such groups, so those layers are the
checkpoint's own weights). ``config.ModelConfig.precision`` chooses; int4 is the drafter's default
(a drafter's errors cost speed, never correctness).

On a CPU, int4 layers (and a GGUF checkpoint's Q5 / Q6_K layers, at 6 bits a code) run on the grouped kernel
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
    checkpoint already holds (``from_codes``: a GGUF file's Q4 blocks at 4 bits, its Q5 / Q6_K blocks at 6,
    models/gguf_blocks.py). ``int8``: its input rows rounded to int8 (``round_activations``, ``qmm.quantize``)."""

    int8 = False

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, low: torch.Tensor, bias: torch.Tensor | None,
                 bits: int = 4, group: int = 32, kquant: tuple[torch.Tensor, ...] | None = None):
        super().__init__()
        assert codes.device.type == "cpu", "other devices quantize through torchao (quantize)"
        self.out_features, self.in_features = codes.shape
        self.bits, self.group = bits, group
        packed, meta = qmm.pack(codes, scale, low, bits, group, kquant)
        self.register_buffer("codes", packed)
        self.register_buffer("meta", meta)
        self.register_buffer("bias", None if bias is None else bias.detach().float())  # added by the kernel

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scale: torch.Tensor, low: torch.Tensor, bias: torch.Tensor | None,
                   bits: int = 4, group: int = 32, kquant: tuple[torch.Tensor, ...] | None = None) -> PackedLinear:
        """``codes`` [out, in] below 2**bits, ``scale`` and ``low`` [out, in / group]: ``w = scale * code + low``
        (``kquant``: the same scales as a GGUF K-quant's two levels, kept as they are: ``qmm.pack``)."""
        return cls(codes, scale, low, bias, bits, group, kquant)

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
        return qmm.matmul(x, self.codes, self.meta, self.out_features, self.bits, self.group, self.bias, int8=self.int8)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, group={self.group}"

    def same_format(self, other: nn.Module) -> bool:
        return (isinstance(other, PackedLinear) and (other.bits, other.group, other.in_features, other.meta.dtype)
                == (self.bits, self.group, self.in_features, self.meta.dtype))

    @classmethod
    def concat(cls, parts: list[PackedLinear]) -> PackedLinear:
        """One layer computing ``parts`` (same format; all but the last a multiple of 32 rows) in one call: their
        outputs side by side. The parts then hold views of its weights: nothing is stored twice."""
        assert all(parts[0].same_format(p) for p in parts) and all(p.out_features % qmm.BLOCK == 0 for p in parts[:-1])
        fused = cls.__new__(cls)
        nn.Module.__init__(fused)
        fused.bits, fused.group, fused.in_features = parts[0].bits, parts[0].group, parts[0].in_features
        fused.int8 = parts[0].int8
        fused.out_features = sum(p.out_features for p in parts)
        fused.register_buffer("codes", torch.cat([p.codes for p in parts]))
        fused.register_buffer("meta", torch.cat([p.meta for p in parts]))
        biases = [p.bias if p.bias is not None else torch.zeros(p.out_features) for p in parts]
        fused.register_buffer("bias", None if all(p.bias is None for p in parts) else torch.cat(biases))
        start = 0
        for part in parts:
            blocks = part.codes.shape[0]
            part.codes, part.meta = fused.codes[start : start + blocks], fused.meta[start : start + blocks]
            if part.bias is not None:
                at = start * qmm.BLOCK
                part.bias = fused.bias[at : at + part.out_features]
            start += blocks
        return fused


class SwiGLU(nn.Module):
    """silu(gate(x)) * up(x) of two packed layers in one kernel call (``qmm.swiglu_layout``): their tiles
    interleaved in one weight, the product formed as the results are written."""

    def __init__(self, gate: PackedLinear, up: PackedLinear):
        super().__init__()
        assert gate.same_format(up) and gate.out_features == up.out_features and gate.out_features % qmm.TILE == 0
        assert gate.bias is None and up.bias is None
        self.bits, self.group, self.in_features = gate.bits, gate.group, gate.in_features
        self.out_features, self.int8 = gate.out_features, gate.int8
        codes, meta = qmm.swiglu_layout((gate.codes, gate.meta), (up.codes, up.meta), gate.out_features)
        self.register_buffer("codes", codes)
        self.register_buffer("meta", meta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return qmm.matmul(x, self.codes, self.meta, 2 * self.out_features, self.bits, self.group, swiglu=True,
                          int8=self.int8)

    def part(self, x: torch.Tensor, index: int) -> torch.Tensor:
        """The gate (0) or up (1) projection alone: for code that calls the model's own MLP."""
        both = qmm.matmul(x, self.codes, self.meta, 2 * self.out_features, self.bits, self.group, int8=self.int8)
        return both.unflatten(-1, (-1, 2, qmm.TILE)).select(-2, index).flatten(-2)


class SwiGLUPart(nn.Module):
    """A model's gate_proj / up_proj once both live in a ``SwiGLU`` (transformers' MLP forward calls them)."""

    def __init__(self, swiglu: SwiGLU, index: int):
        super().__init__()
        self.__dict__["swiglu"] = swiglu  # owned by the MLP, not registered twice
        self.index, self.in_features, self.out_features = index, swiglu.in_features, swiglu.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.swiglu.part(x, self.index)


class FusedLinear(nn.Module):
    """Several float ``nn.Linear`` layers with one input computed by one matmul: their weights concatenated,
    the layers' own weights then views of it (nothing stored twice)."""

    def __init__(self, parts: list[nn.Linear]):
        super().__init__()
        self.weight = nn.Parameter(torch.cat([p.weight.detach() for p in parts]), requires_grad=False)
        with_bias = [p.bias is not None for p in parts]
        self.bias = None
        if any(with_bias):
            self.bias = nn.Parameter(torch.cat([p.bias.detach() if p.bias is not None else p.weight.new_zeros(
                p.out_features) for p in parts]), requires_grad=False)
        self.in_features, self.out_features = parts[0].in_features, self.weight.shape[0]
        start = 0
        for part in parts:
            end = start + part.out_features
            part.weight = nn.Parameter(self.weight[start:end], requires_grad=False)
            if part.bias is not None:
                part.bias = nn.Parameter(self.bias[start:end], requires_grad=False)
            start = end

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight, self.bias)


class FusedSwiGLU(FusedLinear):
    """silu(gate(x)) * up(x) of two float layers: one matmul of their concatenated weights."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activate(super().forward(x))

    @staticmethod
    def activate(both: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up of the concatenated projections ``both`` [..., 2 * I]."""
        half = both.shape[-1] // 2
        return nn.functional.silu(both[..., :half]).mul_(both[..., half:])


def round_activations(model: nn.Module, on: bool = True) -> int:
    """Every packed layer of ``model`` (``PackedLinear``, before ``fuse_projections``, which keeps the choice,
    or after) takes its input rounded to int8 per group (``qmm.matmul(..., int8=True)``, AVX512-VNNI or AVX2), or
    with ``on`` False in the model's dtype again. Returns how many."""
    layers = [m for m in model.modules() if isinstance(m, (PackedLinear, SwiGLU))]
    for layer in layers:
        layer.int8 = on
    return len(layers)


def _plain(module: nn.Module) -> bool:
    return type(module) is nn.Linear


def fuse_projections(model: nn.Module) -> int:
    """For every decoder layer: its q / k / v projections of one format (from q on) computed by one call
    (``self_attn.via_qkv``, covering ``via_qkv_parts`` of them), and gate / up with SiLU by one
    (``mlp.via_swiglu``), as vLLM's merged QKV and gate-up layers do: one read of the layer input, fewer
    launches and ~20 fewer small ops a layer. Packed layers fuse in the kernel (SwiGLU in its epilogue),
    float ``nn.Linear`` layers by concatenated weights; other layer types (tensor-parallel, oneDNN) are left
    as they are. Returns how many layers gained a fused call."""
    if getattr(model.config, "hidden_act", None) != "silu":
        return 0
    fused = 0
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        if hasattr(attn, "via_qkv") or hasattr(mlp, "via_swiglu"):  # fused before (another stack of the model)
            fused += 1
            continue
        first = attn.q_proj
        if isinstance(first, PackedLinear):
            parts = [first]
            for nxt in (attn.k_proj, attn.v_proj):
                if first.same_format(nxt) and parts[-1].out_features % qmm.BLOCK == 0:
                    parts.append(nxt)
                else:
                    break
            if len(parts) > 1:
                attn.via_qkv, attn.via_qkv_parts = PackedLinear.concat(parts), len(parts)
        elif all(_plain(m) and m.weight.dtype == first.weight.dtype for m in (first, attn.k_proj, attn.v_proj)):
            attn.via_qkv, attn.via_qkv_parts = FusedLinear([first, attn.k_proj, attn.v_proj]), 3
        gate, up = mlp.gate_proj, mlp.up_proj
        if (isinstance(gate, PackedLinear) and gate.same_format(up) and gate.bias is None and up.bias is None
                and gate.out_features == up.out_features and gate.out_features % qmm.TILE == 0):
            mlp.via_swiglu = SwiGLU(gate, up)
            mlp.gate_proj, mlp.up_proj = SwiGLUPart(mlp.via_swiglu, 0), SwiGLUPart(mlp.via_swiglu, 1)
        elif (_plain(gate) and _plain(up) and gate.bias is None and up.bias is None
              and gate.weight.dtype == up.weight.dtype):
            mlp.via_swiglu = FusedSwiGLU([gate, up])
        fused += hasattr(attn, "via_qkv") or hasattr(mlp, "via_swiglu")
    return fused


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

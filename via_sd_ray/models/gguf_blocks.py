"""A GGUF checkpoint's quantized weights, served at their own precision: blocks read as codes.

Every group of these formats is affine in its integer code ``q``:

- Q4_K (256-weight super-blocks of 8 groups of 32): ``w = d * sc_j * q - dmin * m_j``, with fp16 ``d`` and
  ``dmin`` per super-block and 6-bit ``sc_j``, ``m_j`` per group; 4-bit q;
- Q4_0: ``w = d * (q - 8)``; Q4_1: ``w = d * q + m`` (fp16 ``d``, ``m`` per group of 32; 4-bit q);
- Q5_0: ``w = d * (q - 16)``; Q5_1: ``w = d * q + m`` (5-bit q, groups of 32);
- Q6_K (256-weight super-blocks of 16 groups of 16): ``w = d * sc_j * (q - 32)``, int8 ``sc_j``; 6-bit q.

So ``w = scale * q + low`` per group, which the layout of ``quant.PackedLinear`` holds as it is: 4-bit codes
at 4 bits, 5- and 6-bit codes at 6 bits; the K-quants' scales in their own two levels (int8 multipliers
per group of fp16 factors per super-block, ``qmm.pack``'s ``kquant``), the others' as an fp16 scale and
offset per group. Codes and scales are the checkpoint's own, exactly (the bf16 checkpoint the registry
ships rounds every weight by up to 2^-9). Tensors in other formats (Q8_0, F16, F32) keep the float
weights the model was loaded with.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)

GROUP = 32  # weights per affine group in the 4- and 5-bit formats (Q6_K: 16)
SUPER = 256  # K-quant super-block
# GGUF tensor type ids (ggml.h)
Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q6_K = 2, 3, 6, 7, 12, 14
BLOCK_BYTES = {Q4_0: 18, Q4_1: 20, Q5_0: 22, Q5_1: 24, Q4_K: 144, Q6_K: 210}
BLOCK_WEIGHTS = {Q4_0: GROUP, Q4_1: GROUP, Q5_0: GROUP, Q5_1: GROUP, Q4_K: SUPER, Q6_K: SUPER}
# (bits per code in the kernel's layout, weights per group): 4-bit codes at 4 bits, 5- and 6-bit ones at 6
LAYOUT = {Q4_0: (4, 32), Q4_1: (4, 32), Q4_K: (4, 32), Q5_0: (6, 32), Q5_1: (6, 32), Q6_K: (6, 16)}
# GGUF name of each decoder-layer linear, as llama.cpp writes llama / qwen2 checkpoints
LAYER_LINEARS = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                 "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                 "mlp.down_proj": "ffn_down"}


@dataclass
class QTensor:
    """A weight ``[out, in]`` as ``scale * codes + low`` per group of ``group`` inputs."""

    codes: torch.Tensor  # [out, in] uint8 below 2**bits
    scale: torch.Tensor  # [out, in / group] float32
    low: torch.Tensor  # [out, in / group] float32
    bits: int = 4  # the kernel's code width: 4, or 6 for 5- and 6-bit codes
    group: int = GROUP
    # K-quants: scale = d * a, low = dmin * b as the file holds them (a, b [out, in / group] int; d, dmin
    # [out, in / 256] fp16 values), kept in that form by the kernel (quant.PackedLinear.from_codes)
    kquant: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def dequantize(self) -> torch.Tensor:
        out, inputs = self.codes.shape
        grouped = self.codes.view(out, inputs // self.group, self.group).float()
        return (grouped * self.scale[..., None] + self.low[..., None]).view(out, inputs)

    def rows(self, order: torch.Tensor) -> QTensor:
        kquant = None if self.kquant is None else tuple(t[order] for t in self.kquant)
        return QTensor(self.codes[order], self.scale[order], self.low[order], self.bits, self.group, kquant)


def _f16(raw: np.ndarray) -> torch.Tensor:
    """Little-endian fp16 from a [..., 2] uint8 array, as float32."""
    return torch.from_numpy(np.ascontiguousarray(raw).view(np.float16).astype(np.float32)).squeeze(-1)


def _nibbles(raw: np.ndarray) -> torch.Tensor:
    """[..., n] bytes -> [..., 2, n] codes: the low nibbles, then the high ones."""
    raw = torch.from_numpy(np.ascontiguousarray(raw))
    return torch.stack([raw & 0x0F, raw >> 4], dim=-2)


def _fifth_bits(raw: np.ndarray) -> torch.Tensor:
    """[n, 4] bytes (a little-endian uint32 per block) -> [n, 32]: bit i of each, the 5th bit of weight i."""
    word = torch.from_numpy(np.ascontiguousarray(raw).view(np.uint32).astype(np.int64))  # [n, 1]
    return ((word >> torch.arange(32)) & 1).to(torch.uint8)


def decode_blocks(kind: int, blocks: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple | None]:
    """``blocks`` [n, block bytes] uint8 of one GGUF type -> codes [n, weights], scale and low
    [n, weights / group], in the order of the weights, and for K-quants their two levels ``(a, b, d, dmin)``
    ([n, groups] and [n, 1]: scale = d * a, low = dmin * b)."""
    n = blocks.shape[0]
    if kind == Q4_0:
        d = _f16(blocks[:, 0:2])
        return _nibbles(blocks[:, 2:]).reshape(n, GROUP), d[:, None], (-8.0 * d)[:, None], None
    if kind == Q4_1:
        d, m = _f16(blocks[:, 0:2]), _f16(blocks[:, 2:4])
        return _nibbles(blocks[:, 4:]).reshape(n, GROUP), d[:, None], m[:, None], None
    if kind == Q4_K:
        d, dmin = _f16(blocks[:, 0:2]), _f16(blocks[:, 2:4])
        packed = torch.from_numpy(np.ascontiguousarray(blocks[:, 4:16])).to(torch.int32)  # [n, 12]
        # 6-bit scale and min of each of the 8 groups: groups 0-3 in the low 6 bits of bytes 0-3
        # (scales) and 4-7 (mins); groups 4-7 in the nibbles of bytes 8-11, their top 2 bits in the
        # high bits of bytes 0-3 (scales) and 4-7 (mins)
        first, second, third = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
        sc = torch.cat([first & 63, (third & 15) | ((first >> 6) << 4)], dim=1)
        mn = torch.cat([second & 63, (third >> 4) | ((second >> 6) << 4)], dim=1)
        # codes: 4 chunks of 32 bytes; a chunk's low nibbles are one group, its high nibbles the next
        codes = _nibbles(blocks[:, 16:].reshape(n, 4, 32)).reshape(n, SUPER)
        kquant = (sc, mn, d[:, None], -dmin[:, None])
        return codes, d[:, None] * sc.float(), -(dmin[:, None] * mn.float()), kquant
    if kind in (Q5_0, Q5_1):
        d = _f16(blocks[:, 0:2])
        start = 2 if kind == Q5_0 else 4
        codes = _nibbles(blocks[:, start + 4:]).reshape(n, GROUP) | (_fifth_bits(blocks[:, start:start + 4]) << 4)
        low = -16.0 * d if kind == Q5_0 else _f16(blocks[:, 2:4])
        return codes, d[:, None], low[:, None], None
    if kind == Q6_K:
        # low 4 bits: 2 halves x (64 bytes: low nibbles weights 0-63, high nibbles 64-127 of the half);
        # high 2 bits: 2 halves x 32 bytes, bit pairs 0-1, 2-3, 4-5, 6-7 for weights +0, +32, +64, +96
        ql = _nibbles(blocks[:, :128].reshape(n, 2, 64)).reshape(n, 2, 4, 32)
        qh = torch.from_numpy(np.ascontiguousarray(blocks[:, 128:192])).reshape(n, 2, 1, 32)
        qh = (qh >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8).view(1, 1, 4, 1)) & 3
        codes = (ql | (qh << 4)).reshape(n, SUPER)
        sc = torch.from_numpy(np.ascontiguousarray(blocks[:, 192:208]).view(np.int8).astype(np.float32))
        d = _f16(blocks[:, 208:210])[:, None]
        scale = d * sc  # [n, 16]
        return codes, scale, -32.0 * scale, (sc, sc, d, -32.0 * d)
    raise ValueError(f"GGUF tensor type {kind}: expected one of Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q6_K")


def read_blocks(kind: int, data: np.ndarray, shape: tuple[int, int]) -> QTensor:
    """A GGUF tensor's raw blocks (``data``: uint8, row-major, ``shape`` = [out, in]) as a QTensor."""
    out, inputs = shape
    if inputs % BLOCK_WEIGHTS[kind]:
        raise ValueError(f"GGUF tensor of {inputs} inputs: expected a multiple of {BLOCK_WEIGHTS[kind]}")
    blocks = np.asarray(data, dtype=np.uint8).reshape(-1, BLOCK_BYTES[kind])
    codes, scale, low, kquant = decode_blocks(kind, blocks)
    bits, group = LAYOUT[kind]
    if kquant is not None:
        a, b, d, dmin = kquant
        kquant = (a.reshape(out, -1), b.reshape(out, -1), d.reshape(out, -1), dmin.reshape(out, -1))
    return QTensor(codes.reshape(out, inputs).to(torch.uint8), scale.reshape(out, inputs // group),
                   low.reshape(out, inputs // group), bits, group, kquant)


def unpermute_rows(heads: int, rows: int) -> torch.Tensor:
    """The row order that undoes llama.cpp's q / k permutation of llama checkpoints (its rotary
    layout: each head's rows interleaved by halves), as transformers' GGUF loader undoes it."""
    half = rows // heads // 2
    return torch.arange(rows).view(heads, half, 2).transpose(1, 2).reshape(rows)


def block_tensors(path: str | Path, config, layers: list[int] | None = None,
                  kinds: frozenset[int] = frozenset(BLOCK_BYTES)) -> Iterator[tuple[str, QTensor]]:
    """The linear weights of GGUF file ``path`` stored in one of ``kinds``, by the transformers module name
    (``config``: the model's config, for the architecture and head counts; ``layers``: the file's layers the
    model holds, re-indexed from 0, as a slim-verifier-only process loads them). One at a time: the loader
    packs each before the next is read (decoded, the codes take a byte per weight)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    by_name = {t.name: t for t in reader.tensors}
    llama = config.model_type == "llama"
    for index, layer in enumerate(layers if layers is not None else range(config.num_hidden_layers)):
        for module, short in LAYER_LINEARS.items():
            weights = _read(by_name.get(f"blk.{layer}.{short}.weight"), kinds)
            if weights is None:
                continue
            if llama and short in ("attn_q", "attn_k"):
                heads = config.num_attention_heads if short == "attn_q" else config.num_key_value_heads
                weights = weights.rows(unpermute_rows(heads, weights.codes.shape[0]))
            yield f"model.layers.{index}.{module}", weights
    head = _read(by_name.get("output.weight"), kinds)
    if head is not None:
        yield "lm_head", head


def _read(tensor, kinds: frozenset[int]) -> QTensor | None:
    """A GGUFReader tensor as a QTensor, or None when it is missing or not in one of ``kinds``."""
    if tensor is None or int(tensor.tensor_type) not in kinds:
        return None
    inputs, out = (int(x) for x in tensor.shape)  # GGUF lists the fastest dimension first
    return read_blocks(int(tensor.tensor_type), tensor.data, (out, inputs))


FOUR_BIT = frozenset({Q4_0, Q4_1, Q4_K})


def apply_gguf_blocks(model: nn.Module, path: str | Path, layers: list[int] | None = None,
                      kinds: frozenset[int] | None = None) -> dict[str, int]:
    """Replace every ``nn.Linear`` of ``model`` whose GGUF weight is stored in one of ``kinds`` (default: every
    format read here; ``FOUR_BIT``: the 4-bit ones) by a packed layer holding the file's own codes; the rest
    keep their float weights. Returns counts of layers by the kernel's code width and of those kept."""
    from via_sd_ray.models.quant import PackedLinear

    counts = {"int4": 0, "int6": 0}
    for name, weights in block_tensors(path, model.config, layers, kinds or frozenset(BLOCK_BYTES)):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        linear = getattr(parent, child)
        if not isinstance(linear, nn.Linear) or tuple(linear.weight.shape) != tuple(weights.codes.shape):
            raise ValueError(f"{path}: {name} is {tuple(weights.codes.shape)} in the GGUF file, "
                             f"expected the model's {tuple(getattr(linear, 'weight', torch.empty(0)).shape)}")
        setattr(parent, child, PackedLinear.from_codes(weights.codes, weights.scale, weights.low, linear.bias,
                                                       weights.bits, weights.group, weights.kquant))
        counts[f"int{weights.bits}"] += 1
    counts["float"] = sum(isinstance(m, nn.Linear) for m in model.modules())
    log.info("%s: %d linear layers at 4-bit codes, %d at 5/6-bit codes, %d kept in float (other GGUF types)",
             Path(path).name, counts["int4"], counts["int6"], counts["float"])
    return counts

"""A GGUF checkpoint's 4-bit weights, served at 4 bits: Q4_K / Q4_0 / Q4_1 blocks read as int4 codes.

Every 32-weight group of these formats is affine in its 4-bit code ``q``:

- Q4_K (256-weight super-blocks of 8 groups): ``w = d * sc_j * q - dmin * m_j``, with fp16 ``d`` and
  ``dmin`` per super-block and 6-bit ``sc_j``, ``m_j`` per group;
- Q4_0: ``w = d * (q - 8)``; Q4_1: ``w = d * q + m`` (fp16 ``d``, ``m`` per group).

So ``w = scale * q + low`` per group, which the int4 layout of ``quant.Int4WeightOnlyLinear`` (groups of
32 along the input, a scale and an offset per group and output row) holds as it is: the codes are the
checkpoint's own, and only the per-group scale and offset are rounded (to the kernel's bf16). The
bf16 checkpoint the registry ships is itself ``bf16(w)``, so both are the same weights up to that
rounding. Tensors in other formats (Q6_K, Q8_0, F16 in the Q4_K_M mix: embeddings, some attn_v /
ffn_down) keep the float weights the model was loaded with.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)

GROUP = 32  # weights per affine group in every format read here
SUPER = 256  # Q4_K super-block
# GGUF tensor type ids (ggml.h)
Q4_0, Q4_1, Q4_K = 2, 3, 12
BLOCK_BYTES = {Q4_0: 18, Q4_1: 20, Q4_K: 144}
BLOCK_WEIGHTS = {Q4_0: GROUP, Q4_1: GROUP, Q4_K: SUPER}
# GGUF name of each decoder-layer linear, as llama.cpp writes llama / qwen2 checkpoints
LAYER_LINEARS = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                 "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                 "mlp.down_proj": "ffn_down"}


@dataclass
class Q4Tensor:
    """A weight ``[out, in]`` as ``scale * codes + low`` per group of 32 inputs."""

    codes: torch.Tensor  # [out, in] uint8 in 0..15
    scale: torch.Tensor  # [out, in / 32] float32
    low: torch.Tensor  # [out, in / 32] float32

    def dequantize(self) -> torch.Tensor:
        out, inputs = self.codes.shape
        grouped = self.codes.view(out, inputs // GROUP, GROUP).float()
        return (grouped * self.scale[..., None] + self.low[..., None]).view(out, inputs)

    def rows(self, order: torch.Tensor) -> Q4Tensor:
        return Q4Tensor(self.codes[order], self.scale[order], self.low[order])


def _f16(raw: np.ndarray) -> torch.Tensor:
    """Little-endian fp16 from a [..., 2] uint8 array, as float32."""
    return torch.from_numpy(np.ascontiguousarray(raw).view(np.float16).astype(np.float32)).squeeze(-1)


def _nibbles(raw: np.ndarray) -> torch.Tensor:
    """[..., n] bytes -> [..., 2, n] codes: the low nibbles, then the high ones."""
    raw = torch.from_numpy(np.ascontiguousarray(raw))
    return torch.stack([raw & 0x0F, raw >> 4], dim=-2)


def decode_blocks(kind: int, blocks: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``blocks`` [n, block bytes] uint8 of one GGUF type -> codes [n, weights], scale and low
    [n, weights / 32], in the order of the weights."""
    n = blocks.shape[0]
    if kind == Q4_0:
        d = _f16(blocks[:, 0:2])
        return _nibbles(blocks[:, 2:]).reshape(n, GROUP), d[:, None], (-8.0 * d)[:, None]
    if kind == Q4_1:
        d, m = _f16(blocks[:, 0:2]), _f16(blocks[:, 2:4])
        return _nibbles(blocks[:, 4:]).reshape(n, GROUP), d[:, None], m[:, None]
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
        return codes, d[:, None] * sc.float(), -(dmin[:, None] * mn.float())
    raise ValueError(f"GGUF tensor type {kind}: expected Q4_0, Q4_1 or Q4_K")


def read_q4(kind: int, data: np.ndarray, shape: tuple[int, int]) -> Q4Tensor:
    """A GGUF tensor's raw blocks (``data``: uint8, row-major, ``shape`` = [out, in]) as a Q4Tensor."""
    out, inputs = shape
    if inputs % BLOCK_WEIGHTS[kind]:
        raise ValueError(f"GGUF tensor of {inputs} inputs: expected a multiple of {BLOCK_WEIGHTS[kind]}")
    blocks = np.asarray(data, dtype=np.uint8).reshape(-1, BLOCK_BYTES[kind])
    codes, scale, low = decode_blocks(kind, blocks)
    return Q4Tensor(codes.reshape(out, inputs).to(torch.uint8), scale.reshape(out, inputs // GROUP),
                    low.reshape(out, inputs // GROUP))


def unpermute_rows(heads: int, rows: int) -> torch.Tensor:
    """The row order that undoes llama.cpp's q / k permutation of llama checkpoints (its rotary
    layout: each head's rows interleaved by halves), as transformers' GGUF loader undoes it."""
    half = rows // heads // 2
    return torch.arange(rows).view(heads, half, 2).transpose(1, 2).reshape(rows)


def q4_tensors(path: str | Path, config, layers: list[int] | None = None) -> dict[str, Q4Tensor]:
    """The 4-bit linear weights of GGUF file ``path``, by the transformers module name (``config``:
    the model's config, for the architecture and head counts; ``layers``: the file's layers the model
    holds, re-indexed from 0, as a slim-verifier-only process loads them)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    by_name = {t.name: t for t in reader.tensors}
    llama = config.model_type == "llama"
    found = {}
    for index, layer in enumerate(layers if layers is not None else range(config.num_hidden_layers)):
        for module, short in LAYER_LINEARS.items():
            weights = _read(by_name.get(f"blk.{layer}.{short}.weight"))
            if weights is None:
                continue
            if llama and short in ("attn_q", "attn_k"):
                heads = config.num_attention_heads if short == "attn_q" else config.num_key_value_heads
                weights = weights.rows(unpermute_rows(heads, weights.codes.shape[0]))
            found[f"model.layers.{index}.{module}"] = weights
    head = _read(by_name.get("output.weight"))
    if head is not None:
        found["lm_head"] = head
    return found


def _read(tensor) -> Q4Tensor | None:
    """A GGUFReader tensor as a Q4Tensor, or None when it is missing or not in a 4-bit format read here."""
    if tensor is None or int(tensor.tensor_type) not in BLOCK_BYTES:
        return None
    inputs, out = (int(x) for x in tensor.shape)  # GGUF lists the fastest dimension first
    return read_q4(int(tensor.tensor_type), tensor.data, (out, inputs))


def apply_gguf_int4(model: nn.Module, path: str | Path, layers: list[int] | None = None) -> dict[str, int]:
    """Replace every ``nn.Linear`` of ``model`` whose GGUF weight is 4-bit by an int4 layer holding the
    file's own codes; the rest keep their float weights. Returns counts of replaced and kept layers."""
    from via_sd_ray.models.quant import Int4WeightOnlyLinear

    found = q4_tensors(path, model.config, layers)
    replaced = 0
    for name, weights in found.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        linear = getattr(parent, child)
        if not isinstance(linear, nn.Linear) or tuple(linear.weight.shape) != tuple(weights.codes.shape):
            raise ValueError(f"{path}: {name} is {tuple(weights.codes.shape)} in the GGUF file, "
                             f"expected the model's {tuple(getattr(linear, 'weight', torch.empty(0)).shape)}")
        setattr(parent, child, Int4WeightOnlyLinear.from_codes(weights.codes, weights.scale, weights.low,
                                                              linear.bias, linear.weight.dtype))
        replaced += 1
    kept = sum(isinstance(m, nn.Linear) for m in model.modules())
    log.info("%s: %d linear layers at the file's 4 bits, %d kept in float (other GGUF types)", Path(path).name,
             replaced, kept)
    return {"int4": replaced, "float": kept}

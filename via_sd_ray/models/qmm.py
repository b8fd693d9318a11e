"""Grouped low-bit weight matmul on CPUs (``csrc/qmm.cpp``), built for this CPU on first use.

A weight [N, K] is held as codes with a scale and a low per group of G inputs and output row,
``w = scale * code + low``: 4-bit codes (GGUF Q4_K / Q4_0 / Q4_1 blocks, or int4 quantized from float
weights) in groups of 32, or 6-bit codes (GGUF Q6_K in groups of 16; Q5_0 / Q5_1 in groups of 32).
``matmul`` reads every weight once for all M rows of its input (a verify block, a batch of decode rows), so
a multi-token pass costs little more than a one-token one; torch's own CPU int4 kernel is a matrix-vector
kernel whose cost grows with M, and no torchao layout runs int4 weight-only on x86 CPUs (README, precision).
Activations stay in the model's dtype: bf16 products accumulate in float32 (``vdpbf16ps``, AVX512-BF16),
float32 activations in float32 (AVX2 FMA); or, with ``int8=True`` (``activations: int8``), each row rounded to
int8 per group (per super-block of 256 inputs against a GGUF K-quant's weights, as llama.cpp pairs its Q8_K
with them) and multiplied by the codes in integers (``vpdpbusd``, AVX512-VNNI; ``vpmaddubsw``, AVX2: the same
bits; ``quantize``).

The kernel is compiled with ``-march=native`` by ``torch.utils.cpp_extension`` (about 15 s, once per
machine: cached under ``TORCH_EXTENSIONS_DIR``, named by the CPU's features and the source, so a cache
shared between machines or package versions never serves one another's code). It needs a C++ compiler and
ninja; where it cannot be built, ``available()`` says why, ``precision: auto`` falls back to bf16 and an
explicit int4 / gguf is a config error.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from pathlib import Path

import torch

from via_sd_ray.core.sampling import Proposal

log = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "qmm.cpp"
TILE, BLOCK = 16, 32  # output rows per vector tile, per packed block (two tiles)
FORMATS = ((4, 32), (4, 16), (6, 32), (6, 16))  # (bits per code, inputs per group) the kernel takes

_lock = threading.Lock()
_state: dict[str, str | None] = {}


def _build_tag() -> str:
    """A short digest of this CPU's vector features (the build is -march=native) and of the source: two
    versions of the package on one machine never load (or rebuild, under each other) one build."""
    from via_sd_ray.models.cpuinfo import cpu_flags

    vector = sorted(f for f in cpu_flags() if f.startswith(("avx", "amx", "fma", "f16c", "sse", "bmi")))
    return hashlib.sha1(" ".join(vector).encode() + SOURCE.read_bytes()).hexdigest()[:12]


def available() -> str | None:
    """None when the kernel is loaded (built now if needed), else why it cannot be."""
    with _lock:
        if "error" not in _state:
            _state["error"] = _build()
        return _state["error"]


def require() -> None:
    """Load the kernel, or raise a ValueError saying why it cannot be built."""
    reason = available()
    if reason is not None:
        raise ValueError(f"the via_sd qmm kernel (int4 / gguf precision on CPUs) could not be built here: {reason}; "
                         "install a C++ compiler and ninja, or use precision bf16 or int8")


def compile_source(name: str, source: Path) -> None:
    """Build ``source`` (this kernel or another version of it) for this CPU and load its ops, as ``name``."""
    from torch.utils import cpp_extension

    cpp_extension.load(name=name, sources=[str(source)], extra_cflags=["-O3", "-march=native", "-fopenmp"],
                       extra_ldflags=["-fopenmp"], is_python_module=False, verbose=False)


def _build() -> str | None:
    if not hasattr(torch.ops, "via_sd") or not hasattr(torch.ops.via_sd, "qmm"):
        try:
            compile_source(f"via_sd_qmm_{_build_tag()}", SOURCE)
        except Exception as exc:  # no compiler, no ninja, a failed build: the reason goes to the user
            log.warning("via_sd qmm kernel unavailable: %s", exc)
            return f"{type(exc).__name__}: {exc}".splitlines()[0]
    torch.library.register_fake("via_sd::qmm")(_fake)  # shapes for torch.compile
    torch.library.register_fake("via_sd::rope_write")(_fake_rope)
    torch.library.register_fake("via_sd::rms_norm")(lambda x, weight, eps, residual=None: torch.empty_like(x))
    torch.library.register_fake("via_sd::attend_short")(
        lambda grouped, cache_k, cache_v, start, t: grouped.new_empty((t, grouped.shape[0] * grouped.shape[1] // t
                                                                       * grouped.shape[2])))
    log.info("via_sd qmm kernel loaded (%s for bf16, %s for float32)", isa(torch.bfloat16), isa(torch.float32))
    return None


def _fake(x, codes, meta, n, bits, group, bias=None, swiglu=False, int8=False):
    return x.new_empty((x.shape[0], n // 2 if swiglu else n))


def _fake_rope(q, k, v, cache_k, cache_v, start, cos, sin, scale):
    return q.new_empty((k.shape[1], q.shape[1] // k.shape[1] * q.shape[0], q.shape[2]))


def isa(dtype: torch.dtype, int8: bool = False) -> str:
    """Which inner kernel serves activations of ``dtype`` (rounded to int8 with ``int8``) here: avx512bf16,
    avx512vnni, avx2 or scalar."""
    return torch.ops.via_sd.qmm_isa(torch.empty(0, dtype=dtype), int8)


def int8_available() -> str | None:
    """None when int8 activations run on a vector kernel here (AVX512-VNNI or AVX2), else why not."""
    reason = available()
    if reason is None and isa(torch.float32, int8=True) == "scalar":
        reason = "this CPU has neither AVX512-VNNI nor AVX2 (int8 activations would run on the scalar reference)"
    return reason


def pack(codes: torch.Tensor, scale: torch.Tensor, low: torch.Tensor, bits: int, group: int,
         kquant: tuple[torch.Tensor, ...] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``codes`` [N, K] (integers < 2**bits), ``scale`` and ``low`` [N, K / group] -> the kernel's
    layout: codes uint8 [blocks, groups, 2, 16 * group * bits / 8] and meta fp16 [blocks, groups, 2, 2, 16]
    (rows padded to a multiple of 32 with zero weights). See csrc/qmm.cpp for the byte order.

    ``kquant``: the scales as a GGUF K-quant holds them, ``(a, b, d, dmin)`` with ``a``, ``b`` [N, K / group]
    integers in int8's range and ``d``, ``dmin`` [N, K / 256] fp16 values, ``scale = d * a``, ``low = dmin * b``:
    kept as they are (meta uint8 [blocks, bytes]: 0.6 bits a weight for Q4_K instead of 1, exact)."""
    require()
    if (bits, group) not in FORMATS:
        raise ValueError(f"qmm: expected (bits, group) in {FORMATS}, received {(bits, group)}")
    rows, inputs = codes.shape
    if inputs % group or scale.shape != (rows, inputs // group) or low.shape != scale.shape:
        raise ValueError(f"qmm: expected codes [N, K] with K a multiple of {group} and scale, low [N, K / {group}], "
                         f"received {tuple(codes.shape)}, {tuple(scale.shape)}, {tuple(low.shape)}")
    if int(codes.max()) >= 2**bits or int(codes.min()) < 0:
        raise ValueError(f"qmm: expected {bits}-bit codes below {2**bits}, received "
                         f"{int(codes.min())}..{int(codes.max())}")
    blocks, groups = -(-rows // BLOCK), inputs // group
    pad = blocks * BLOCK - rows
    codes = torch.cat([codes.to(torch.uint8), codes.new_zeros((pad, inputs), dtype=torch.uint8)])
    tiles = blocks * 2
    c = codes.view(tiles, TILE, groups, group)
    # per unit of 32 bytes: the pair u in the low nibbles, the pair u + group / 4 in the high ones
    units = group // 4
    low4 = (c & 15).view(tiles, TILE, groups, 2, units, 2).permute(0, 2, 4, 1, 5, 3)  # [t, g, unit, row, half, high]
    planes = [(low4[..., 0] | (low4[..., 1] << 4)).reshape(tiles, groups, -1)]
    if bits == 6:  # then the top 2 bits: pair p at unit p % (group / 8), bits 2 * (p // (group / 8))
        top = (c >> 4).view(tiles, TILE, groups, 4, group // 8, 2).permute(0, 2, 4, 1, 5, 3)  # [.., row, half, slot]
        top = top[..., 0] | (top[..., 1] << 2) | (top[..., 2] << 4) | (top[..., 3] << 6)
        planes.append(top.reshape(tiles, groups, -1))
    c = torch.cat(planes, dim=-1).view(blocks, 2, groups, -1).transpose(1, 2)
    return interleave(c), _pack_meta(scale, low, kquant, blocks, group)


def _by_tile(values: torch.Tensor, blocks: int) -> torch.Tensor:
    """[N, n, 2] per row -> [blocks, n, 2 tiles, 2, 16], rows padded with zeros."""
    rows, n, _ = values.shape
    values = torch.cat([values, values.new_zeros((blocks * BLOCK - rows, n, 2))])
    return values.view(blocks, 2, TILE, n, 2).permute(0, 3, 1, 4, 2).contiguous()


def _pack_meta(scale, low, kquant, blocks: int, group: int) -> torch.Tensor:
    if kquant is None:
        meta = torch.stack([scale, low], dim=-1).to(torch.float16)  # [N, groups, 2]
        if not torch.isfinite(meta).all():
            raise ValueError("qmm: a group's scale or low does not fit in fp16")
        return _by_tile(meta, blocks)
    a, b, d, dmin = kquant
    rows, groups = a.shape
    if groups * group % 256 or d.shape != (rows, groups * group // 256) or dmin.shape != d.shape or b.shape != a.shape:
        raise ValueError(f"qmm: expected K-quant multipliers [N, K / {group}] and factors [N, K / 256] (K a multiple "
                         f"of 256), received {tuple(a.shape)}, {tuple(b.shape)}, {tuple(d.shape)}, {tuple(dmin.shape)}")
    multipliers = torch.stack([a, b], dim=-1)
    if int(multipliers.min()) < -128 or int(multipliers.max()) > 127:
        raise ValueError("qmm: expected K-quant multipliers in int8's range")
    factors = torch.stack([d, dmin], dim=-1).to(torch.float16)
    if not torch.isfinite(factors).all():
        raise ValueError("qmm: a K-quant factor does not fit in fp16")
    return _join_meta([_by_tile(multipliers.to(torch.int8), blocks), _by_tile(factors, blocks)])


def _meta_parts(meta: torch.Tensor, groups: int) -> list[torch.Tensor]:
    """A packed meta as [blocks, n, 2 tiles, 2, 16] tensors: itself (fp16), or a K-quant's int8 multipliers (n =
    groups) and fp16 factors (n = super-blocks)."""
    if meta.dtype == torch.float16:
        return [meta]
    blocks, split = meta.shape[0], groups * 64
    return [meta[:, :split].contiguous().view(torch.int8).view(blocks, groups, 2, 2, TILE),
            meta[:, split:].contiguous().view(torch.float16).view(blocks, -1, 2, 2, TILE)]


def _join_meta(parts: list[torch.Tensor]) -> torch.Tensor:
    if len(parts) == 1:
        return parts[0].contiguous()
    blocks = parts[0].shape[0]
    return torch.cat([p.contiguous().view(blocks, -1).view(torch.uint8) for p in parts], dim=1)


def interleave(codes: torch.Tensor) -> torch.Tensor:
    """Codes [blocks, groups, 2, bytes] with each tile's bytes in one run -> the kernel's order: per 32-byte
    unit, the two tiles' bytes alternating by 8 (see csrc/qmm.cpp). ``deinterleave`` undoes it."""
    b, g, _, n = codes.shape
    return codes.reshape(b, g, 2, n // 32, 4, 8).permute(0, 1, 3, 4, 2, 5).reshape(b, g, 2, n).contiguous()


def deinterleave(codes: torch.Tensor) -> torch.Tensor:
    b, g, _, n = codes.shape
    return codes.reshape(b, g, n // 32, 4, 2, 8).permute(0, 1, 4, 2, 3, 5).reshape(b, g, 2, n).contiguous()


def matmul(x: torch.Tensor, codes: torch.Tensor, meta: torch.Tensor, n: int, bits: int, group: int,
           bias: torch.Tensor | None = None, swiglu: bool = False, int8: bool = False) -> torch.Tensor:
    """``x`` [..., K] times the packed weight [n, K] transposed, plus ``bias`` [n]: [..., n], in ``x``'s dtype.
    ``swiglu``: the weight's blocks hold 16 gate rows, then the 16 matching up rows (``swiglu_layout``); the
    result is silu(gate) * up, [..., n / 2]. ``int8``: each row of ``x`` rounded to int8 per group first
    (``quantize``), the products summed exactly in int32 (AVX512-VNNI)."""
    flat = x.reshape(-1, x.shape[-1])
    out = torch.ops.via_sd.qmm(flat, codes, meta, n, bits, group, bias, swiglu, int8)
    return out.view(*x.shape[:-1], out.shape[-1])


def quantize(x: torch.Tensor, group: int, reference: bool = False, kquant: bool = False) -> tuple[torch.Tensor, ...]:
    """``x`` [M, K] rounded to int8 as ``matmul(..., int8=True)`` does: per group of inputs, q int8 [M, K] =
    rint(x * 127 / amax), the scale amax / 127 and scale * sum(q), each [M, K / group]; against K-quant weights
    (``kquant``), per super-block of 256 inputs: q, the scale [M, K / 256] and each group's sum(q) (int32)."""
    return torch.ops.via_sd.qmm_quantize(x, group, reference, kquant)


def rope_write(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor,
               start: int, cos: torch.Tensor, sin: torch.Tensor, scale: float) -> torch.Tensor:
    """Rotary embedding of one sequence's new ``q`` [T, Hq, D] and ``k`` [T, Hkv, D], ``k`` and ``v`` written
    into ``cache_k`` / ``cache_v`` [Hkv, C, D] at ``start``..; returns q rotated times ``scale`` as
    [Hkv, Hq / Hkv * T, D] (see csrc/qmm.cpp)."""
    return torch.ops.via_sd.rope_write(q, k, v, cache_k, cache_v, start, cos, sin, scale)


def attend_short(grouped: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, start: int,
                 tokens: int) -> torch.Tensor:
    """Attention of ``rope_write``'s queries over the cache, ``tokens`` new ones from ``start`` on (each sees the
    keys up to its own position): [T, Hq * D]."""
    return torch.ops.via_sd.attend_short(grouped, cache_k, cache_v, start, tokens)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None) -> torch.Tensor:
    """transformers' RMSNorm of ``x`` [N, H] in one op; with ``residual``, of ``x += residual`` (in place)."""
    return torch.ops.via_sd.rms_norm(x, weight, eps, residual)


def residual_draws(at: torch.Tensor, p: torch.Tensor, q: torch.Tensor | Proposal | None,
                   u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``core.verify``'s rejection-sampling draws in one C++ op (see csrc/qmm.cpp): the same tokens, bit for bit,
    from one pass a row instead of ~20 torch ops over [K + 1, V] (on a CPU, ~3 ms of a sampled verify call with
    a 152k vocabulary, ~0.1 ms of a tiny model's)."""
    probs, ids = (q.probs, q.ids) if isinstance(q, Proposal) else (q, None)
    tokens, p_tok, q_tok = torch.ops.via_sd.residual_draws(p, at, probs, ids, u)
    return tokens, p_tok, None if q is None else q_tok


def tiles(codes: torch.Tensor, meta: torch.Tensor, rows: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A packed weight's first ``rows`` / 16 tiles: codes [tiles, groups, bytes], meta parts [tiles, n, 2, 16]."""
    count = rows // TILE
    codes = deinterleave(codes).transpose(1, 2).reshape(-1, codes.shape[1], codes.shape[3])[:count]
    parts = [part.transpose(1, 2).reshape(-1, part.shape[1], 2, TILE)[:count]
             for part in _meta_parts(meta, codes.shape[1])]
    return codes, parts


def swiglu_layout(gate: tuple[torch.Tensor, torch.Tensor], up: tuple[torch.Tensor, torch.Tensor],
                  rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One packed weight of two (``rows`` each, a multiple of 16) whose block j holds tile j of ``gate`` then tile
    j of ``up``: what ``matmul(..., swiglu=True)`` takes."""
    (gate_codes, gate_meta), (up_codes, up_meta) = tiles(*gate, rows), tiles(*up, rows)
    return (interleave(torch.stack([gate_codes, up_codes], dim=2)),
            _join_meta([torch.stack([g, u], dim=2) for g, u in zip(gate_meta, up_meta)]))

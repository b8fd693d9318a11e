"""The grouped low-bit CPU kernel and the fused ops beside it (models/qmm.py, csrc/qmm.cpp): every ISA path
equals the de-quantized weight's matmul and the scalar reference, at every row count and ragged output
size; the epilogues (bias, SwiGLU) and fused layers equal their unfused forms; rope_write and rms_norm equal
the tensor ops they replace; a fused int4 model decodes as the unfused one."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from via_sd_ray.models import qmm
from via_sd_ray.models.quant import PackedLinear, SwiGLU, fuse_projections, quantize
from via_sd_ray.models.tiny import tiny_model

pytestmark = pytest.mark.skipif(qmm.available() is not None, reason=f"qmm kernel unavailable: {qmm.available()}")


def random_packed(rows: int, inputs: int, bits: int, group: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    top = 16 if bits == 4 else 64
    codes = torch.randint(0, top, (rows, inputs), generator=gen, dtype=torch.uint8)
    scale = torch.rand(rows, inputs // group, generator=gen) * 0.02
    low = -torch.rand(rows, inputs // group, generator=gen) * 0.1
    weight = (codes.view(rows, -1, group).float() * scale.half().float()[..., None]
              + low.half().float()[..., None]).view(rows, inputs)  # what the kernel holds: fp16 scales
    return qmm.pack(codes, scale, low, bits, group), weight


@pytest.mark.parametrize("bits, group", qmm.FORMATS)
@pytest.mark.parametrize("rows", [32, 40, 80])
def test_every_path_equals_the_dequantized_matmul(bits, group, rows):
    (codes, meta), weight = random_packed(rows, 256, bits, group)
    for m in (1, 2, 3, 4, 5, 7, 9, 13):
        x = torch.randn(m, 256)
        want = x.double() @ weight.double().T
        for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 2e-2), (torch.float64, 1e-4)):
            got = qmm.matmul(x.to(dtype), codes, meta, rows, bits, group)
            assert got.dtype == dtype and got.shape == (m, rows)
            assert float((got.double() - want).abs().max()) <= tol * float(want.abs().max()), (dtype, m)
        reference = torch.ops.via_sd.qmm_reference(x, codes, meta, rows, bits, group)
        assert torch.allclose(reference.double(), want, atol=1e-4 * float(want.abs().max()))


def random_kquant(rows: int, inputs: int, bits: int, group: int, seed: int = 0):
    """Random codes with K-quant scales (int8 multipliers of fp16 factors per 256 inputs) and the same scales as
    one fp16 scale and low per group where those hold them exactly."""
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (rows, inputs), generator=gen, dtype=torch.uint8)
    a = torch.randint(0, 64, (rows, inputs // group), generator=gen)
    b = torch.randint(-40, 64, (rows, inputs // group), generator=gen)
    d = (torch.randint(1, 32, (rows, inputs // 256), generator=gen) / 4096).half().float()  # d * a: 11 bits
    dmin = -(torch.randint(1, 32, (rows, inputs // 256), generator=gen) / 2048).half().float()
    per = 256 // group
    scale, low = d.repeat_interleave(per, 1) * a, dmin.repeat_interleave(per, 1) * b
    weight = (codes.view(rows, -1, group).float() * scale[..., None] + low[..., None]).view(rows, inputs)
    return codes, scale, low, (a, b, d, dmin), weight


@pytest.mark.parametrize("bits, group", [(4, 32), (6, 16)])
def test_k_quant_scales_are_kept_exactly_and_compute_as_the_fp16_ones(bits, group):
    codes, scale, low, kquant, weight = random_kquant(48, 512, bits, group)
    packed = qmm.pack(codes, scale, low, bits, group, kquant)
    plain = qmm.pack(codes, scale, low, bits, group)  # these scales are exact in fp16 too
    assert packed[1].dtype == torch.uint8 and packed[1].numel() < plain[1].numel() * 2  # fewer bytes
    for m in (1, 5, 9):
        x = torch.randn(m, 512)
        want = x.double() @ weight.double().T
        for dtype in (torch.float32, torch.bfloat16, torch.float64):
            got = qmm.matmul(x.to(dtype), *packed, 48, bits, group)
            assert torch.equal(got, qmm.matmul(x.to(dtype), *plain, 48, bits, group)), (dtype, m)
        got = qmm.matmul(x, *packed, 48, bits, group).double()
        assert torch.allclose(got, want, atol=1e-4 * float(want.abs().max()))
    gate = PackedLinear.from_codes(codes[:32], scale[:32], low[:32], None, bits, group, tuple(t[:32] for t in kquant))
    up = PackedLinear.from_codes(codes[16:], scale[16:], low[16:], None, bits, group, tuple(t[16:] for t in kquant))
    x = torch.randn(3, 512, dtype=torch.bfloat16)
    assert torch.equal(SwiGLU(gate, up).part(x, 1), up(x)) and torch.equal(SwiGLU(gate, up).part(x, 0), gate(x))
    fused = PackedLinear.concat([gate, up])
    assert torch.equal(fused(x), torch.cat([gate(x), up(x)], dim=-1))
    with pytest.raises(ValueError, match="int8's range"):
        qmm.pack(codes, scale, low, bits, group, (kquant[0] * 4, *kquant[1:]))


def test_the_kernels_isa_is_reported():
    assert qmm.isa(torch.float32) in ("avx2", "scalar")
    assert qmm.isa(torch.bfloat16) in ("avx512bf16", "avx2", "scalar")
    assert qmm.isa(torch.bfloat16, int8=True) in ("avx512vnni", "avx2", "scalar")
    assert (qmm.int8_available() is None) == (qmm.isa(torch.float32, int8=True) != "scalar")


@pytest.mark.parametrize("bits, group", [(4, 32), (6, 16)])
def test_k_quant_super_blocks_at_their_largest_sums_neither_overflow_nor_round(bits, group):
    """int8 activations against K-quants at the extremes of every factor: the largest codes, inputs all +-127 of
    one sign per row, multipliers at int8's ends. A super-block's sum of a_g * dot_g then passes 2^24 (where a
    float32 running sum starts to round) and comes near what int16 pairs and int32 sums hold; the vector kernel
    still equals the scalar reference bit for bit, and both the float64 product of the same integers."""
    gen = torch.Generator().manual_seed(3)
    rows, inputs = 64, 512
    top = 2**bits - 1
    codes = top - torch.randint(0, 2, (rows, inputs), generator=gen, dtype=torch.uint8)  # odd and even sums
    amax = 63 if bits == 4 else 127  # Q4_K's 6-bit multipliers, Q6_K's int8 ones
    a = amax - torch.randint(0, 2, (rows, inputs // group), generator=gen)
    if bits == 6:
        a[rows // 2 :] = -128
    b = torch.randint(0, 64, (rows, inputs // group), generator=gen) if bits == 4 else torch.zeros_like(a)
    d = torch.full((rows, inputs // 256), 2.0**-10).half().float()
    dmin = torch.full((rows, inputs // 256), -(2.0**-9)).half().float()
    per = 256 // group
    scale, low = d.repeat_interleave(per, 1) * a, dmin.repeat_interleave(per, 1) * b
    packed = qmm.pack(codes, scale, low, bits, group, (a, b, d, dmin))
    for m in (1, 5, 6, 13):
        x = torch.ones(m, inputs) * torch.tensor([1.0, -1.0])[torch.arange(m) % 2][:, None]
        x[:, ::7] *= 0.999  # still 127 once rounded: every q is +-127
        q, s, _ = qmm.quantize(x, group, kquant=True)
        assert int(q.abs().min()) == 127
        got = qmm.matmul(x, *packed, rows, bits, group, int8=True)
        assert torch.equal(got, torch.ops.via_sd.qmm_reference(x, *packed, rows, bits, group, None, False, True)), m
        dots = (codes.view(rows, -1, group).long()[None] * q.view(m, 1, -1, group).long()).sum(-1)  # [m, rows, groups]
        sums = (dots * a[None]).view(m, rows, -1, per).sum(-1)  # [m, rows, supers]: the exact integers
        assert int(sums.abs().max()) > 2**24
        lows = (b[None] * q.view(m, 1, -1, group).long().sum(-1)).view(m, rows, -1, per).sum(-1)
        exact = ((sums * d[None] + lows * dmin[None]).double() * s.double()[:, None, :]).sum(-1)
        assert torch.allclose(got.double(), exact, rtol=1e-6, atol=0), m


@pytest.mark.parametrize("bits, group", qmm.FORMATS)
@pytest.mark.parametrize("kquant", [False, True])
def test_int8_activations_are_rounded_per_group_and_summed_exactly(bits, group, kquant):
    """int8 activations: x rounded per group to q = rint(x * 127 / amax), or against K-quant weights per
    super-block of 256 inputs (llama.cpp's Q8_K), the codes times q summed in integers. The vector kernel equals
    the scalar reference bit for bit, and both equal the float64 product of the rounded x and the weight to
    float32 rounding; the rounding moves each input by at most half a step."""
    if kquant and group not in (16, 32):
        pytest.skip("K-quants have groups of 16 or 32")
    if kquant:
        codes, scale, low, kq, weight = random_kquant(48, 512, bits, group)
        packed = qmm.pack(codes, scale, low, bits, group, kq)
    else:
        packed, weight = random_packed(48, 512, bits, group)
    span = 256 if kquant else group
    for m in (1, 3, 5, 6, 8, 13, 40):
        x = torch.randn(m, 512) * torch.rand(m, 1) * 4  # rows of different magnitudes
        x[0, :span] = 0  # an all-zero span: scale 0, no division by zero
        for dtype in (torch.float32, torch.bfloat16):
            xd = x.to(dtype)
            q, s, third = qmm.quantize(xd, group, kquant=kquant)
            assert q.dtype == torch.int8 and int(q.abs().max()) <= 127
            reference = qmm.quantize(xd, group, reference=True, kquant=kquant)
            assert all(torch.equal(a, b) for a, b in zip((q, s, third), reference))
            spans = xd.float().view(m, -1, span)
            amax = spans.abs().amax(-1, keepdim=True)
            want_q = torch.where(amax > 0, torch.round(spans * (torch.full_like(amax, 127) / amax)), 0)
            assert torch.equal(q.view(m, -1, span).float(), want_q) and torch.equal(s, (amax / 127).squeeze(-1))
            sums = q.view(m, -1, group).sum(-1, dtype=torch.int32)
            want = sums if kquant else s.repeat_interleave(span // group, 1) * sums.float()
            assert torch.equal(third, want)
            got = qmm.matmul(xd, *packed, 48, bits, group, int8=True)
            assert got.dtype == dtype
            assert torch.equal(got, torch.ops.via_sd.qmm_reference(xd, *packed, 48, bits, group, None, False, True))
            rounded = (q.view(m, -1, span).double() * s.double()[..., None]).view(m, 512)
            exact = rounded @ weight.double().T
            tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
            assert float((got.double() - exact).abs().max()) <= tol * float(exact.abs().max()), (dtype, m)
            unrounded = xd.double() @ weight.double().T  # each input moved by at most half its span's step
            bound = (s.double().repeat_interleave(span, 1) / 2) @ weight.double().abs().T
            assert bool(((exact - unrounded).abs() <= bound * (1 + 1e-9)).all()), (dtype, m)


def test_bias_and_swiglu_epilogues_equal_their_unfused_forms():
    torch.manual_seed(0)
    gate_linear, up_linear = nn.Linear(128, 48, bias=False), nn.Linear(128, 48, bias=False)
    gate, up = PackedLinear.from_float(gate_linear), PackedLinear.from_float(up_linear)
    fused = SwiGLU(gate, up)
    biased = PackedLinear.from_float(nn.Linear(128, 40))
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(5, 128, dtype=dtype)
        want = (nn.functional.silu(gate(x).float()) * up(x).float())
        assert torch.allclose(fused(x).float(), want, atol=2e-2 if dtype == torch.bfloat16 else 1e-5)
        assert torch.allclose(fused.part(x, 0).float(), gate(x).float(), atol=1e-5)
        without = qmm.matmul(x, biased.codes, biased.meta, 40, 4, 32)
        assert torch.allclose(biased(x).float(), without.float() + biased.bias, atol=2e-2)


def test_swiglu_epilogue_is_silu_to_float32_rounding_and_the_same_in_every_path():
    """The fused SwiGLU's own exp (one polynomial, scalar and vector forms alike) against float64 silu, and the
    int8 kernel against its scalar reference bit for bit (the same sums), with bf16 and float32 results."""
    torch.manual_seed(0)
    gate, up = (PackedLinear.from_float(nn.Linear(256, 64, bias=False)) for _ in range(2))
    fused = SwiGLU(gate, up)
    x = torch.randn(20, 256) * 4  # gates out to |g| ~ 30: exp's whole range in use
    g, u = gate(x).double(), up(x).double()
    exact = g * torch.sigmoid(g) * u
    got = fused(x).double()
    assert float(((got - exact).abs() / (exact.abs() + 1e-30)).max()) < 1e-5
    for dtype in (torch.bfloat16, torch.float32):
        xd = x.to(dtype)
        kernel = qmm.matmul(xd, fused.codes, fused.meta, 128, 4, 32, swiglu=True, int8=True)
        reference = torch.ops.via_sd.qmm_reference(xd, fused.codes, fused.meta, 128, 4, 32, None, True, True)
        assert torch.equal(kernel, reference.to(kernel.dtype)), dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attend_short_equals_causal_attention_in_float64(dtype):
    """The C++ attention of a few queries (AVX512, AVX2 or scalar, whichever this CPU runs) against float64
    softmax attention: head sizes that fill the vectors or not, key counts off the vector width, GQA with up to
    7 query heads a kv head (AVX2 takes a token's heads of one kv head together, 6 at a time at most). Each token's
    rows equal, bit for bit, that token attended alone (a verify block computes what one-token steps do)."""
    gen = torch.Generator().manual_seed(0)
    for d, kv_heads, g, t, start in ((16, 1, 2, 1, 0), (48, 2, 3, 3, 5), (128, 2, 6, 4, 37), (24, 1, 1, 2, 9),
                                     (64, 2, 7, 5, 40), (32, 1, 13, 2, 3)):
        cache_k = torch.randn(kv_heads, 64, d, generator=gen).to(dtype)
        cache_v = torch.randn(kv_heads, 64, d, generator=gen).to(dtype)
        grouped = (torch.randn(kv_heads, g * t, d, generator=gen) * d**-0.5).to(dtype)
        got = torch.ops.via_sd.attend_short(grouped, cache_k, cache_v, start, t)
        q = grouped.double().view(kv_heads, g, t, d)
        scores = torch.einsum("hgtd,hsd->hgts", q, cache_k.double()[:, : start + t])
        seen = torch.arange(start + t)[None, :] <= start + torch.arange(t)[:, None]  # [t, s]
        weights = scores.masked_fill(~seen, float("-inf")).softmax(-1)
        want = torch.einsum("hgts,hsd->thgd", weights, cache_v.double()[:, : start + t]).reshape(t, -1)
        tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
        assert float((got.double() - want).abs().max()) <= tol, (d, kv_heads, g, t, start)
        for i in range(t):
            alone = grouped.view(kv_heads, g, t, d)[:, :, i].contiguous()
            assert torch.equal(got[i : i + 1], torch.ops.via_sd.attend_short(alone, cache_k, cache_v, start + i, 1))


def test_rope_write_equals_the_tensor_ops_it_replaces():
    from via_sd_ray.models.layers import rotate as _rotate

    torch.manual_seed(0)
    t, heads, kv_heads, d, start = 3, 6, 2, 16, 5
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        qkv = torch.randn(t, (heads + 2 * kv_heads) * d, dtype=dtype)
        q, k, v = (part.view(t, -1, d) for part in qkv.split([heads * d, kv_heads * d, kv_heads * d], -1))
        cos, sin = torch.randn(t, d, dtype=dtype), torch.randn(t, d, dtype=dtype)
        cache = torch.zeros(2, kv_heads, 16, d, dtype=dtype)
        grouped = qmm.rope_write(q, k, v, cache[0], cache[1], start, cos, sin, 0.5)
        tol = 2e-2 if dtype == torch.bfloat16 else 1e-6
        want_k = _rotate(k.transpose(0, 1).double(), cos.double(), sin.double())  # [Hkv, T, D]
        assert torch.allclose(cache[0, :, start : start + t].double(), want_k, atol=tol * 10)
        assert torch.equal(cache[1, :, start : start + t], v.transpose(0, 1))
        assert cache[:, :, :start].abs().max() == 0 and cache[:, :, start + t :].abs().max() == 0
        want_q = _rotate(q.transpose(0, 1).double(), cos.double(), sin.double()) * 0.5  # [Hq, T, D]
        assert torch.allclose(grouped.double(), want_q.reshape(kv_heads, -1, d), atol=tol * 10)


def test_rms_norm_equals_the_module_and_adds_the_residual_in_place():
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

    torch.manual_seed(0)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        norm = Qwen2RMSNorm(64, eps=1e-6).to(dtype)
        norm.weight.data.normal_()
        x, residual = torch.randn(3, 64, dtype=dtype), torch.randn(3, 64, dtype=dtype)
        stream = x.clone()
        got = qmm.rms_norm(stream, norm.weight, 1e-6, residual)
        assert torch.allclose(stream.float(), (x + residual).float(), atol=tol)
        assert torch.allclose(got.float(), norm(x + residual).float(), atol=tol * 4)


@pytest.mark.parametrize("proposal", ["sparse", "dense", "one-hot"])
def test_residual_draws_are_the_torch_rejection_draws_bit_for_bit(proposal):
    """The fused op draws the same recovered and bonus tokens as ``core.verify.rejection_draws`` for the same
    uniforms, including rows where p == q leaves no residual (recovered from p) and uniforms near 0 and 1."""
    from via_sd_ray.core.sampling import top_k_proposal
    from via_sd_ray.core.verify import rejection_draws

    gen = torch.Generator().manual_seed(3)
    for trial in range(60):
        k, vocab = trial % 6, 37 + trial
        p = torch.softmax(torch.randn(k + 1, vocab, generator=gen) * 3, dim=-1)
        q = None
        if proposal == "sparse":
            q = top_k_proposal(torch.softmax(torch.randn(k, vocab, generator=gen) * 3, dim=-1), 8)
            if k > 1:  # a row where the target is the proposal: its residual is all zero
                p[1] = q.dense(vocab)[1]
            at = torch.stack([row[torch.randint(0, 8, (1,), generator=gen)] for row in q.ids]) if k else None
        else:
            if proposal == "dense":
                q = torch.softmax(torch.randn(k, vocab, generator=gen) * 3, dim=-1)
                if k > 1:
                    p[1] = q[1]
            at = torch.randint(0, vocab, (k, 1), generator=gen)
        if at is None:
            at = torch.empty((0, 1), dtype=torch.long)
        u = torch.rand(k + 1, generator=gen, dtype=torch.float64)
        u[0] = [0.0, 1 - 2**-53, 0.5][trial % 3]
        want = rejection_draws(at, p, q, u)
        got = qmm.residual_draws(at, p, q, u)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        assert (got[2] is None) == (want[2] is None) and (got[2] is None or torch.equal(got[2], want[2]))


def test_a_fused_int4_model_decodes_as_the_unfused_one():
    """fuse_projections changes which calls compute a layer, not what they compute: the same packed weights
    give the same logits, the q / k / v layers keep working (their weights are views of the fused one), and
    transformers' own forward still runs (gate / up through the fused SwiGLU)."""
    from via_sd_ray.models.decoder import DecoderStack

    plain = quantize(tiny_model("verifier"), "int4-weight-only")
    fused = quantize(tiny_model("verifier"), "int4-weight-only")
    assert fuse_projections(fused) == fused.config.num_hidden_layers
    layer = fused.model.layers[0]
    assert layer.self_attn.via_qkv_parts == 3 and layer.mlp.via_swiglu is not None
    assert layer.self_attn.q_proj.codes.data_ptr() == layer.self_attn.via_qkv.codes.data_ptr()  # a view
    ids = [5, 77, 120, 33, 9, 14]
    a, b = DecoderStack(plain, fuse=False), DecoderStack(fused)
    got = b(ids, b.new_cache(), len(ids))
    want = a(ids, a.new_cache(), len(ids))
    assert torch.allclose(got, want, atol=1e-4)
    with torch.inference_mode():
        assert torch.allclose(fused(torch.tensor([ids])).logits[0], plain(torch.tensor([ids])).logits[0], atol=1e-4)


def test_the_python_fallback_of_short_rows_equals_the_fused_ops():
    """Where the C++ ops cannot be built (or off the CPU) short rows rotate, write and attend in tensor ops."""
    from via_sd_ray.models.decoder import DecoderStack

    stack = DecoderStack(tiny_model("verifier"), fuse=False)
    ids = list(range(3, 40))
    caches = {}
    for fused_ops in (True, False):
        stack.fused_cpu_ops = fused_ops
        cache = stack.new_cache()
        out = [stack(ids[:30], cache, 1)] + [stack(ids[i : i + 1], cache, 1) for i in range(30, 33)]
        out.append(stack(ids[33:37], cache, 4))
        caches[fused_ops] = (torch.cat(out), cache.data.clone())
    assert torch.allclose(caches[True][0], caches[False][0], atol=1e-3)  # logits up to ~20: float32 noise
    assert torch.allclose(caches[True][1][..., :37, :], caches[False][1][..., :37, :], atol=1e-4)


@pytest.mark.parametrize("bits, group", [(4, 32), (6, 16)])
@pytest.mark.parametrize("kquant", [False, True])
def test_a_rows_result_does_not_depend_on_the_rows_beside_it(bits, group, kquant):
    """Each row of x is summed in one fixed order whatever M and the register blocks are: a verify block's
    position computes bit for bit what a one-token step computes (what makes greedy sd equal ar below)."""
    if kquant:
        codes, scale, low, kq, _ = random_kquant(80, 256, bits, group)
        codes, meta = qmm.pack(codes, scale, low, bits, group, kq)
    else:
        (codes, meta), _ = random_packed(80, 256, bits, group)
    for dtype, int8 in ((torch.bfloat16, False), (torch.float32, False), (torch.bfloat16, True), (torch.float32, True)):
        x = torch.randn(20, 256).to(dtype)  # 20 rows: a long pass's register blocks (MT_LONG)
        whole = qmm.matmul(x, codes, meta, 80, bits, group, int8=int8)
        for m in range(20):
            assert torch.equal(whole[m : m + 1], qmm.matmul(x[m : m + 1], codes, meta, 80, bits, group, int8=int8))
        assert torch.equal(whole[2:7], qmm.matmul(x[2:7], codes, meta, 80, bits, group, int8=int8))


@pytest.mark.parametrize("activations", ["dtype", "int8"])
def test_greedy_sd_equals_ar_in_bf16_on_packed_models(build_tiny_engine, activations):
    """bf16 rounds a K-token verify pass differently from K one-token steps wherever a kernel's order depends on
    M (README, bf16 drift); on packed models every op of a decode-shaped pass is row-wise, so greedy sd and
    lossless via-sd keep the full model's tokens exactly in bf16 too, with int8 activations as well."""
    from via_sd_ray.core.policy import RouterPolicy
    from via_sd_ray.core.sampling import SamplingParams

    if activations == "int8" and qmm.int8_available() is not None:
        pytest.skip(qmm.int8_available())
    models = {role: {"source": f"tiny-random:{role}", "dtype": "bfloat16", "precision": "int4",
                     "activations": activations} for role in ("drafter", "verifier")}
    engine = build_tiny_engine(models=models)
    o_proj = engine.full.stack.layers[0].self_attn.o_proj
    assert isinstance(o_proj, PackedLinear) and o_proj.int8 == (activations == "int8")
    assert engine.full.stack.layers[0].mlp.via_swiglu.int8 == (activations == "int8")
    for text in ("a", "hello world", "def add(a, b):\n    return a + b\n"):
        ids = engine.encode(text)
        ar = engine.generate(ids, SamplingParams(max_tokens=24), RouterPolicy(mode="ar"))
        for block_size in (2, 4, 7):
            for policy in (RouterPolicy(mode="sd", block_size=block_size),
                           RouterPolicy(mode="via-sd", block_size=block_size, lossless=True)):
                assert engine.generate(ids, SamplingParams(max_tokens=24), policy).token_ids == ar.token_ids


def test_a_prompt_cut_anywhere_gives_the_same_cache_and_logits_in_bf16(build_tiny_engine):
    """Every row of a packed CPU pass attends query by query, so how a prompt is cut (a reused prefix, prefill
    chunks, rows batched beside others) changes no bit of its keys, values or logits: prefix reuse and
    batching never change a greedy token."""
    models = {role: {"source": f"tiny-random:{role}", "dtype": "bfloat16", "precision": "int4"}
              for role in ("drafter", "verifier")}
    stack = build_tiny_engine(models=models).full.stack
    assert stack.fused_cpu_ops
    prompt = [(11 * i) % 200 + 3 for i in range(90)]
    whole = stack.new_pool(3, 256)
    one = whole.cache(0)
    want = stack.forward(prompt, one, 1)
    for cut in (20, 57, 89):
        cache = whole.cache(1)
        stack.forward(prompt[:cut], cache, 0)
        other = whole.cache(2)  # another generation's rows in the same pass
        got, _ = stack.forward_batch([prompt[cut:], prompt[:40]], [cache, other], [1, 1])
        assert torch.equal(got, want), cut
        assert torch.equal(cache.data[..., : len(prompt), :], one.data[..., : len(prompt), :]), cut


@pytest.mark.parametrize("dtype, int8, v_apart", [(torch.float32, False, False), (torch.bfloat16, False, False),
                                                   (torch.bfloat16, True, False), (torch.float32, False, True),
                                                   (torch.bfloat16, True, True)])
def test_the_native_layer_loop_computes_what_the_layer_plans_compute(dtype, int8, v_apart):
    """``decoder_layers`` (csrc/qmm.cpp) runs a packed model's layers in one C++ op: bit for bit the logits and
    cache of the Python layer plans, over a prefill, decode steps, a verify block and two rows packed in one
    pass (attention row by row over each row's cache), with bf16 / float32 / int8 activations, and with v in
    another format than q and k (a projection of its own, as GGUF files' Q6_K v layers)."""
    from via_sd_ray.models.decoder import DecoderStack
    from via_sd_ray.models.quant import round_activations

    model = quantize(tiny_model("verifier").to(dtype), "int4-weight-only")
    if v_apart:
        for layer in model.model.layers:
            v = layer.self_attn.v_proj
            linear = nn.Linear(v.in_features, v.out_features, bias=v.bias is not None)
            linear.weight.data, linear.bias.data = v.weight, v.bias
            layer.self_attn.v_proj = PackedLinear.from_float(linear, group=16)
    round_activations(model, int8)
    stack = DecoderStack(model)
    ids = list(range(3, 40))
    runs = {}
    for native in (True, False):
        stack(ids[:2], stack.new_cache(), 1)  # builds the plans (and the native arguments)
        assert stack.native is not None
        assert model.model.layers[0].self_attn.via_qkv_parts == (2 if v_apart else 3)
        saved = stack.native
        if not native:
            stack.native = None  # the Python layer plans
        cache, other = stack.new_cache(), stack.new_cache()
        out = [stack(ids[:30], cache, 1)] + [stack(ids[i : i + 1], cache, 1) for i in range(30, 33)]
        out.append(stack(ids[33:37], cache, 4))
        out += stack.forward_batch([[7, 8], ids[:5]], [cache, other], [2, 5])
        runs[native] = (torch.cat(out), cache.data[..., :39, :].clone(), other.data[..., :5, :].clone())
        stack.native = saved
    assert all(torch.equal(a, b) for a, b in zip(runs[True], runs[False]))

// Grouped low-bit weight matmul on CPUs: y[M, N] = x[M, K] . W[N, K]^T, where each group of G inputs
// of each output row holds w = scale * code + low (4-bit codes packed two to a byte; 5- and 6-bit codes
// as a 4-bit plane and a 2-bit plane, 6 bits a code). One pass over the packed weights serves all M rows
// of x, so a verify block or a batch of decode rows reads each weight once. The activations stay in the
// model's dtype (bf16 products accumulate in float32), or, asked for (``int8``), are rounded to int8 per
// group (per super-block against K-quant weights) and multiplied in integers (``block_int8``,
// ``block_int8_kquant``; AVX512-VNNI).
//
// Packed layout (built by via_sd_ray/models/qmm.py:pack), per block of 32 output rows (two tiles of 16)
// and group, so that a thread streams its blocks' weights in one run:
//   codes  uint8  [blocks, groups, 2 * 16 * G * BITS / 8] (viewed as [blocks, groups, 2, 16 * G * BITS / 8])
//          4 bits: G/4 units of 64 bytes, each two tiles' 32: byte j of a tile's unit u holds its row j/2's
//          input 2u + j%2 in the low nibble and input 2(u + G/4) + j%2 in the high one (a unit's low
//          nibbles are the pair of inputs u, its high nibbles the pair u + G/4, 16 rows x 2 inputs each).
//          The two tiles' bytes alternate by 8: byte j of tile t is at 16 * (j / 8) + 8 * t + j % 8.
//          6 bits: the low 4 bits of each code as the 4-bit layout, then G/8 units of 64 bytes of their
//          top 2 bits, tiles alternating the same way: pair p's at unit p % (G/8), bits 2 * (p / (G/8)).
//   meta   fp16   [blocks, groups, 2 tiles, 2, 16]: the group's scale, then its low, of the tile's rows;
//          or, for GGUF K-quants (their own two-level scales, exactly), uint8 [blocks, bytes]: per group
//          [2 tiles][a | b][16] int8, then per super-block of 256 inputs [2 tiles][d | dmin][16] fp16, with
//          scale = d * a and low = dmin * b (exact in float32).
// Interleaving a unit's 64 bytes with bytes 0x43 (vpunpcklbw / vpunpckhbw, within 16-byte lanes) makes
// tile 0's and tile 1's 32 words: 16 rows x 2 inputs, what vdpbf16ps multiplies with a broadcast pair of
// x, where a code q is the bf16 of 128 + q (0x4300 | q, exact for q < 128); the group's sum folds the 128
// back out: scale * S + (low - 128 * scale) * sum(x).

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define QMM_AVX2 1
#endif
#if defined(__AVX512F__) && defined(__AVX512BW__)
#define QMM_AVX512 1
#endif
#if defined(QMM_AVX512) && defined(__AVX512BF16__)
#define QMM_AVX512BF16 1
#endif
#if defined(QMM_AVX512) && defined(__AVX512VNNI__)
#define QMM_AVX512VNNI 1
#endif

namespace {

constexpr int TILE = 16;   // output rows per tile (one vector of float32 lanes)
constexpr int BLOCK = 32;  // output rows per block: two tiles
// rows of x per register block on AVX2 (16 vector registers), float32 x
constexpr int MT = 4;
// rows of int8 x per register block on AVX2: 5 or 6 rows in one pass, though some of their int16 sums leave the
// registers, beat 3 + 2 or 3 + 3, which unpack every code twice (the 1.5B's gate/up and down at 5 rows, Zen 3:
// 0.97 / 0.77 -> 0.87 / 0.62 ms, 6 rows ~10 %, 11 to 128 rows alike; 8 rows a block was no faster at 8 to 13
// rows and ~5 % slower at 128; 2 or 3 rows a block 5-30 % slower than 4)
constexpr int MT_INT8_AVX2 = 6;
constexpr int MT_BF16 = 8; // rows of x per register block (AVX512: 32 vector registers)
// rows of x per register block in a long pass (> 16 rows, a prefill chunk; AVX512): 6, whose running sums stay
// in registers, rather than 8, whose sums go through memory every group (the 1.5B's layers at 128 rows, Zen 4:
// ~5 % faster with int8 activations, ~20 % with bf16; a pass of 13 rows ~8 % slower with 6, so short passes
// keep 8)
constexpr int MT_LONG = 6;
// groups ahead whose codes a block kernel prefetches: a multi-row pass computes long enough per group for
// the hardware's own prefetching to fall behind (measured on the 1.5B, Zen 4: verify passes of 5 and 11
// tokens ~13 % faster, 4 batched rows ~18 % with int8 activations; a one-token step unchanged)
constexpr int PREFETCH = 8;
// and groups ahead whose codes it asks into L2, where the hardware's streams do not reach far enough either
// (measured the same way: a 5-token verify pass ~4 % faster with int8 activations; one row and 128 unchanged)
constexpr int PREFETCH_L2 = 24;

float half_to_float(uint16_t h) { return c10::detail::fp16_ieee_to_fp32_value(h); }

inline int64_t group_bytes(int64_t bits, int64_t group) { return TILE * group * bits / 8; }

// A block's group scales and lows (see the layout above): fp16 per group (``per_super`` 0), or int8
// multipliers per group of fp16 factors per super-block of ``per_super`` groups.
struct Meta {
  const uint8_t* base;
  int64_t groups;
  int64_t per_super;

  const uint16_t* plain(int64_t g, int t) const { return reinterpret_cast<const uint16_t*>(base) + g * 64 + t * 32; }
  const int8_t* multiplier(int64_t g, int t) const { return reinterpret_cast<const int8_t*>(base) + g * 64 + t * 32; }
  const uint16_t* factor(int64_t g, int t) const {
    return reinterpret_cast<const uint16_t*>(base + groups * 64) + (g / per_super) * 64 + t * 32;
  }
  // the scale and low of tile t's row r in group g
  void at(int64_t g, int t, int r, float& scale, float& low) const {
    if (per_super == 0) {
      scale = half_to_float(plain(g, t)[r]), low = half_to_float(plain(g, t)[16 + r]);
    } else {
      scale = half_to_float(factor(g, t)[r]) * multiplier(g, t)[r];
      low = half_to_float(factor(g, t)[16 + r]) * multiplier(g, t)[16 + r];
    }
  }
};

// Where byte j (0..31) of tile t sits in a 64-byte unit.
inline int unit_byte(int t, int j) { return 16 * (j / 8) + 8 * t + j % 8; }

// The code of tile t's row r at input offset k (within a group) from a packed group ``c`` (both tiles).
inline int code_at(const uint8_t* c, int64_t bits, int64_t group, int t, int r, int k) {
  int pair = k / 2, at = unit_byte(t, r * 2 + k % 2);
  int units = group / 4;
  int unit = pair % units, high = pair / units;
  uint8_t byte = c[unit * 64 + at];
  int code = high ? byte >> 4 : byte & 15;
  if (bits == 6) {
    int top_units = group / 8;
    uint8_t top = c[group * 16 + (pair % top_units) * 64 + at];
    code |= ((top >> (2 * (pair / top_units))) & 3) << 4;
  }
  return code;
}

// Portable reference: every ISA's result should equal it to float32 rounding.
// ``codes``, ``meta``: the block's; the result is tile t's.
void tile_scalar(const float* x, int64_t m_rows, int64_t K, const uint8_t* codes, int t, const Meta& meta,
                 int64_t bits, int64_t group, float* y) {
  int64_t groups = K / group, gbytes = group_bytes(bits, group);
  for (int64_t m = 0; m < m_rows; ++m) {
    for (int r = 0; r < TILE; ++r) {
      float total = 0.f;
      for (int64_t g = 0; g < groups; ++g) {
        const uint8_t* c = codes + g * 2 * gbytes;
        float scale, low;
        meta.at(g, t, r, scale, low);
        float dot = 0.f, sum = 0.f;
        for (int k = 0; k < group; ++k) {
          float xv = x[m * K + g * group + k];
          dot += code_at(c, bits, group, t, r, k) * xv;
          sum += xv;
        }
        total += scale * dot + low * sum;
      }
      y[m * BLOCK + r] = total;
    }
  }
}

#ifdef QMM_AVX2
// 2^n for integral n in -126..127 (float lanes), as an exponent field
inline __m256 two_to(__m256 n) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
}

// Rows 8 * half .. 8 * half + 7 of tile t's scale and low in group g.
inline void meta256(const Meta& meta, int64_t g, int t, int half, __m256& sc, __m256& lo) {
  auto f16 = [](const uint16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); };
  if (meta.per_super == 0) {
    sc = f16(meta.plain(g, t) + 8 * half), lo = f16(meta.plain(g, t) + 16 + 8 * half);
    return;
  }
  auto i8 = [](const int8_t* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  };
  const int8_t* a = meta.multiplier(g, t);
  const uint16_t* f = meta.factor(g, t);
  sc = _mm256_mul_ps(f16(f + 8 * half), i8(a + 8 * half)), lo = _mm256_mul_ps(f16(f + 16 + 8 * half), i8(a + 16 + 8 * half));
}

// Tile t's 32 bytes of a 64-byte unit.
inline __m256i tile_bytes(const uint8_t* unit, int t) {
  auto at = [&](int lane) { int64_t v; std::memcpy(&v, unit + 16 * lane + 8 * t, 8); return v; };
  return _mm256_set_epi64x(at(3), at(2), at(1), at(0));
}

// float32 x, AVX2 + FMA: 16 rows (tile t of the block ``codes``) as two vectors of 8, codes widened to float32.
template <int BITS, int G, int R>
void block_avx2(const float* x, int64_t K, const uint8_t* codes, int t, const Meta& meta, float* y,
                const float* xsum) {
  constexpr int64_t gbytes = TILE * G * BITS / 8;
  const int64_t groups = K / G;
  __m256 yacc[R][2];
  for (int m = 0; m < R; ++m) yacc[m][0] = yacc[m][1] = _mm256_setzero_ps();
  const __m256i even_mask = _mm256_set1_epi16(0x00FF);
  for (int64_t g = 0; g < groups; ++g) {
    const uint8_t* c = codes + g * 2 * gbytes;
    __m256 acc[R][2];
    for (int m = 0; m < R; ++m) acc[m][0] = acc[m][1] = _mm256_setzero_ps();
    constexpr int pairs = G / 2;
#pragma GCC unroll 16  // unrolled, p's branches and shifts are constants: ~4x faster (Zen 3, GCC 12)
    for (int p = 0; p < pairs; ++p) {
      // the 32 bytes of rows x (k, k+1) for this pair
      constexpr int units = G / 4;
      __m256i packed = tile_bytes(c + (p % units) * 64, t);
      __m256i raw = p < units ? _mm256_and_si256(packed, _mm256_set1_epi8(15))
                              : _mm256_and_si256(_mm256_srli_epi16(packed, 4), _mm256_set1_epi8(15));
      if (BITS == 6) {  // the top 2 bits, from the second plane
        constexpr int top_units = G / 8;
        __m256i top = tile_bytes(c + G * 16 + (p % top_units) * 64, t);
        top = _mm256_srl_epi16(top, _mm_cvtsi32_si128(2 * (p / top_units)));
        raw = _mm256_or_si256(raw, _mm256_slli_epi16(_mm256_and_si256(top, _mm256_set1_epi8(3)), 4));
      }
      // words: even bytes are input k of rows 0..15, odd bytes input k + 1
      __m256i even = _mm256_and_si256(raw, even_mask), odd = _mm256_srli_epi16(raw, 8);
      // 16 words -> two vectors of 8 floats (rows 0-7, 8-15)
      __m256 w0k = _mm256_cvtepi32_ps(_mm256_cvtepu16_epi32(_mm256_castsi256_si128(even)));
      __m256 w1k = _mm256_cvtepi32_ps(_mm256_cvtepu16_epi32(_mm256_extracti128_si256(even, 1)));
      __m256 w0k1 = _mm256_cvtepi32_ps(_mm256_cvtepu16_epi32(_mm256_castsi256_si128(odd)));
      __m256 w1k1 = _mm256_cvtepi32_ps(_mm256_cvtepu16_epi32(_mm256_extracti128_si256(odd, 1)));
      const int64_t k = g * G + 2 * p;
      for (int m = 0; m < R; ++m) {
        __m256 xk = _mm256_broadcast_ss(x + m * K + k), xk1 = _mm256_broadcast_ss(x + m * K + k + 1);
        acc[m][0] = _mm256_fmadd_ps(w0k, xk, acc[m][0]);
        acc[m][1] = _mm256_fmadd_ps(w1k, xk, acc[m][1]);
        acc[m][0] = _mm256_fmadd_ps(w0k1, xk1, acc[m][0]);
        acc[m][1] = _mm256_fmadd_ps(w1k1, xk1, acc[m][1]);
      }
    }
    __m256 sc0, sc1, lo0, lo1;
    meta256(meta, g, t, 0, sc0, lo0);
    meta256(meta, g, t, 1, sc1, lo1);
    for (int m = 0; m < R; ++m) {
      __m256 s = _mm256_broadcast_ss(xsum + m * groups + g);
      yacc[m][0] = _mm256_fmadd_ps(sc0, acc[m][0], _mm256_fmadd_ps(lo0, s, yacc[m][0]));
      yacc[m][1] = _mm256_fmadd_ps(sc1, acc[m][1], _mm256_fmadd_ps(lo1, s, yacc[m][1]));
    }
  }
  for (int m = 0; m < R; ++m) {
    _mm256_storeu_ps(y + m * BLOCK, yacc[m][0]);
    _mm256_storeu_ps(y + m * BLOCK + 8, yacc[m][1]);
  }
}
#endif

#ifdef QMM_AVX512
// A group's codes as bytes, unit u (both tiles, 64 at a time): ``lo`` the pair of inputs u, ``hi`` the pair
// u + G/4, each 16 rows x 2 inputs per tile, tiles alternating by 8 bytes.
template <int BITS, int G>
inline void unit_codes(const uint8_t* c, int u, __m512i& lo, __m512i& hi) {
  constexpr int top_units = G / 8;
  const __m512i nibble = _mm512_set1_epi8(0x0F), top = _mm512_set1_epi8(0x30);
  const __m512i v = _mm512_loadu_si512(c + u * 64);
  lo = _mm512_and_si512(v, nibble), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), nibble);
  if (BITS == 6) {
    // the top 2 bits of pair u sit at bits s = 2 * (u / top_units) of the top plane's byte, of pair u + G/4
    // at s + 4: moved to bits 4-5 and or-ed in (ternary logic A & B | C = 0xEA; 16-bit shifts leak bits
    // across bytes only outside the mask)
    const int s = 2 * (u / top_units);
    const __m512i t = _mm512_loadu_si512(c + G * 16 + (u % top_units) * 64);
    lo = _mm512_ternarylogic_epi32(_mm512_slli_epi16(t, 4 - s), top, lo, 0xEA);
    hi = _mm512_ternarylogic_epi32(_mm512_srli_epi16(t, s), top, hi, 0xEA);
  }
}

// Tile t's scale and low in group g.
inline void meta512(const Meta& meta, int64_t g, int t, __m512& sc, __m512& lo) {
  auto f16 = [](const uint16_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); };
  if (meta.per_super == 0) {
    sc = f16(meta.plain(g, t)), lo = f16(meta.plain(g, t) + 16);
    return;
  }
  auto i8 = [](const int8_t* p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  };
  const int8_t* a = meta.multiplier(g, t);
  const uint16_t* f = meta.factor(g, t);
  sc = _mm512_mul_ps(f16(f), i8(a)), lo = _mm512_mul_ps(f16(f + 16), i8(a + 16));
}
#endif

#ifdef QMM_AVX512
// The codes of the group PREFETCH groups past ``c`` (a group of BYTES, both tiles) asked into L1, and of the one
// PREFETCH_L2 past it into L2 (past the block's end: harmless, never faults).
template <int64_t BYTES>
inline void prefetch_ahead(const uint8_t* c) {
#pragma GCC unroll 16
  for (int64_t line = 0; line < BYTES; line += 64) {
    _mm_prefetch(reinterpret_cast<const char*>(c + PREFETCH * BYTES + line), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(c + PREFETCH_L2 * BYTES + line), _MM_HINT_T1);
  }
}
#endif

#ifdef QMM_AVX512BF16
// bf16 x, AVX512-BF16: 16 rows in one vector, each vdpbf16ps a pair of inputs. A block is two tiles (32
// rows), so each broadcast pair of x feeds two vdpbf16ps (a broadcast costs a vector uop on some cores,
// e.g. AMD Zen 4: one per vdpbf16ps halves its throughput). Every row of x is summed in the same order
// whatever R and M are (one accumulator per row and tile, the same sequence of instructions), so a row's
// result never depends on the rows beside it: a verify block computes each position exactly as a one-token
// step would (greedy sd equals ar bit for bit where the rest of the pass is row-wise too).

// The bf16 words of unit u of a group's codes ``c`` (both tiles): {low pair tile 0, tile 1, high pair tile 0,
// tile 1}, each 16 rows x 2 inputs. The codes are made in bytes, 64 at a time (both tiles), then widened.
template <int BITS, int G>
inline void unpack_unit(const uint8_t* c, int u, __m512i w[4]) {
  const __m512i bias = _mm512_set1_epi8(0x43);
  __m512i lo, hi;
  unit_codes<BITS, G>(c, u, lo, hi);
  w[0] = _mm512_unpacklo_epi8(lo, bias);
  w[1] = _mm512_unpackhi_epi8(lo, bias);
  w[2] = _mm512_unpacklo_epi8(hi, bias);
  w[3] = _mm512_unpackhi_epi8(hi, bias);
}

// R rows of x times one block, into y [R, 32]. Up to 6 rows the running sums stay in registers; above, in
// y (the group's 2R accumulators take the registers): the same operations in the same order either way.
template <int BITS, int G, int R>
void block_bf16(const uint16_t* x, int64_t K, const uint8_t* codes, const Meta& meta, float* y, const float* xsum) {
  constexpr int64_t gbytes = TILE * G * BITS / 8;  // one tile's codes of a group
  constexpr bool in_registers = R <= 6;
  const int64_t groups = K / G;
  const __m512 c128 = _mm512_set1_ps(128.f);
  __m512 yacc[in_registers ? R : 1][2];
#pragma GCC unroll 8
  for (int m = 0; m < R; ++m) {
    if (in_registers) yacc[m][0] = yacc[m][1] = _mm512_setzero_ps();
    else _mm512_storeu_ps(y + m * BLOCK, _mm512_setzero_ps()), _mm512_storeu_ps(y + m * BLOCK + TILE, _mm512_setzero_ps());
  }
  auto pair = [](const uint16_t* p) { int32_t v; std::memcpy(&v, p, 4); return (__m512bh)_mm512_set1_epi32(v); };
  for (int64_t g = 0; g < groups; ++g) {
    const uint8_t* c = codes + g * 2 * gbytes;
    const uint16_t* xg = x + g * G;
    prefetch_ahead<2 * gbytes>(c);
    __m512 acc[R][2];
#pragma GCC unroll 8
    for (int m = 0; m < R; ++m) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
    constexpr int units = G / 4;
#pragma GCC unroll 8
    for (int u = 0; u < units; ++u) {
      __m512i w[4];
      unpack_unit<BITS, G>(c, u, w);
      const __m512i lo0 = w[0], lo1 = w[1], hi0 = w[2], hi1 = w[3];
#pragma GCC unroll 8
      for (int m = 0; m < R; ++m) {
        const __m512bh a = pair(xg + m * K + 2 * u), b = pair(xg + m * K + 2 * (u + units));
        acc[m][0] = _mm512_dpbf16_ps(acc[m][0], (__m512bh)lo0, a);
        acc[m][1] = _mm512_dpbf16_ps(acc[m][1], (__m512bh)lo1, a);
        acc[m][0] = _mm512_dpbf16_ps(acc[m][0], (__m512bh)hi0, b);
        acc[m][1] = _mm512_dpbf16_ps(acc[m][1], (__m512bh)hi1, b);
      }
    }
#pragma GCC unroll 2
    for (int t = 0; t < 2; ++t) {
      __m512 sc, lo;
      meta512(meta, g, t, sc, lo);
      __m512 shifted = _mm512_fnmadd_ps(sc, c128, lo);  // low - 128 * scale
#pragma GCC unroll 8
      for (int m = 0; m < R; ++m) {
        float* out = y + m * BLOCK + t * TILE;
        const __m512 before = in_registers ? yacc[m][t] : _mm512_loadu_ps(out);
        const __m512 after = _mm512_fmadd_ps(sc, acc[m][t], _mm512_fmadd_ps(shifted, _mm512_set1_ps(xsum[m * groups + g]), before));
        if (in_registers) yacc[m][t] = after;
        else _mm512_storeu_ps(out, after);
      }
    }
  }
  if (in_registers) {
#pragma GCC unroll 4
    for (int m = 0; m < R; ++m) {
      _mm512_storeu_ps(y + m * BLOCK, yacc[m][0]);
      _mm512_storeu_ps(y + m * BLOCK + TILE, yacc[m][1]);
    }
  }
}
#endif

// int8 activations: each row of x is rounded to int8 per group of G inputs, q = rint(x * (127 / amax)) with
// the scale s = amax / 127 (llama.cpp's Q8 activations, at the granularity of its Q8_0), so a group's dot
// product of codes and q is exact in int32 (vpdpbusd: four u8 x s8 products a lane, twice vdpbf16ps's rate,
// and the codes need no widening): y += (scale * s) * dot + low * (s * sum(q)). Against K-quant weights the
// rows are rounded per super-block of 256 inputs instead (llama.cpp's Q8_K, which it pairs with K-quants):
// with one s for the super-block's groups, y += (d * s) * sum_g(a_g * dot_g) + (dmin * s) * sum_g(b_g * sum(q_g)),
// one float multiply-add a group where the per-group form needs three (``block_int8_kquant``).
// A row's rounding and sums depend on that row alone, so rows stay independent as in the bf16 kernel.
struct Int8Rows {
  std::vector<int8_t> q;      // [M, K]
  std::vector<float> scale;   // [M, K / span]: s
  std::vector<float> low;     // [M, groups]: s * sum(q) (rounded per group)
  std::vector<int32_t> sums;  // [M, groups / 2]: sum(q) of groups 2j, 2j + 1 as the low and high int16 (per 256)
};

// ``span`` inputs of x rounded to int8 with one scale; ``sums`` [span / group]: each group's sum of q.
template <typename T>
void quantize_span(const T* x, int64_t span, int64_t group, int8_t* q, float& scale, int32_t* sums, bool reference) {
#ifdef QMM_AVX512
  if (!reference && group % 16 == 0) {
    auto load = [&](int64_t k) {
      if constexpr (std::is_same_v<T, float>) return _mm512_loadu_ps(x + k);
      const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + k));
      return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    };
    __m512 top = _mm512_setzero_ps();
    for (int64_t k = 0; k < span; k += 16) top = _mm512_max_ps(top, _mm512_abs_ps(load(k)));
    const float amax = _mm512_reduce_max_ps(top), inv = amax > 0.f ? 127.f / amax : 0.f;
    for (int64_t g = 0; g < span / group; ++g) {
      __m512i total = _mm512_setzero_si512();
      for (int64_t k = g * group; k < (g + 1) * group; k += 16) {
        const __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(load(k), _mm512_set1_ps(inv)));  // nearest even
        total = _mm512_add_epi32(total, v);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(q + k), _mm512_cvtepi32_epi8(v));
      }
      sums[g] = _mm512_reduce_add_epi32(total);
    }
    scale = amax / 127.f;
    return;
  }
#elif defined(QMM_AVX2)
  if (!reference && group % 16 == 0) {
    auto load = [&](int64_t k) {
      if constexpr (std::is_same_v<T, float>) return _mm256_loadu_ps(x + k);
      const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(x + k));
      return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    };
    const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
    __m256 top = _mm256_setzero_ps();
    for (int64_t k = 0; k < span; k += 8) top = _mm256_max_ps(top, _mm256_and_ps(load(k), magnitude));
    __m128 half = _mm_max_ps(_mm256_castps256_ps128(top), _mm256_extractf128_ps(top, 1));
    half = _mm_max_ps(half, _mm_movehl_ps(half, half));
    const float amax = _mm_cvtss_f32(_mm_max_ss(half, _mm_movehdup_ps(half))), inv = amax > 0.f ? 127.f / amax : 0.f;
    for (int64_t g = 0; g < span / group; ++g) {
      __m256i total = _mm256_setzero_si256();
      for (int64_t k = g * group; k < (g + 1) * group; k += 16) {
        // nearest even, as std::nearbyint; |v| <= 127, so the packs never saturate
        const __m256i v0 = _mm256_cvtps_epi32(_mm256_mul_ps(load(k), _mm256_set1_ps(inv)));
        const __m256i v1 = _mm256_cvtps_epi32(_mm256_mul_ps(load(k + 8), _mm256_set1_ps(inv)));
        total = _mm256_add_epi32(total, _mm256_add_epi32(v0, v1));
        const __m256i words = _mm256_permute4x64_epi64(_mm256_packs_epi32(v0, v1), 0xD8);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(q + k),
                         _mm_packs_epi16(_mm256_castsi256_si128(words), _mm256_extracti128_si256(words, 1)));
      }
      __m128i sum = _mm_add_epi32(_mm256_castsi256_si128(total), _mm256_extracti128_si256(total, 1));
      sum = _mm_add_epi32(sum, _mm_shuffle_epi32(sum, 0x4E));
      sums[g] = _mm_cvtsi128_si32(_mm_add_epi32(sum, _mm_shuffle_epi32(sum, 0xB1)));
    }
    scale = amax / 127.f;
    return;
  }
#endif
  float amax = 0.f;
  for (int64_t k = 0; k < span; ++k) amax = std::max(amax, std::fabs(static_cast<float>(x[k])));
  const float inv = amax > 0.f ? 127.f / amax : 0.f;
  for (int64_t g = 0; g < span / group; ++g) {
    int32_t total = 0;
    for (int64_t k = g * group; k < (g + 1) * group; ++k) {
      const int32_t v = static_cast<int32_t>(std::nearbyint(static_cast<float>(x[k]) * inv));
      total += v, q[k] = static_cast<int8_t>(v);
    }
    sums[g] = total;
  }
  scale = amax / 127.f;
}

// x [M, K] rounded per group (``kquant`` false: scale and low filled) or per super-block of 256 inputs
// (``kquant``: scale and sums filled).
Int8Rows quantize_rows(const at::Tensor& x, int64_t group, bool kquant, bool reference) {
  const int64_t M = x.size(0), K = x.size(1), groups = K / group, span = kquant ? 256 : group, per = span / group;
  Int8Rows rows{std::vector<int8_t>(M * K), std::vector<float>(M * K / span), {}, {}};
  if (kquant) rows.sums.resize(M * groups / 2);
  else rows.low.resize(M * groups);
  auto each = [&](auto* xp) {
    at::parallel_for(0, M * K / span, 64 / per, [&](int64_t begin, int64_t end) {
      int32_t sums[16];  // a span's groups (at most 256 / 16)
      for (int64_t i = begin; i < end; ++i) {
        quantize_span(xp + i * span, span, group, rows.q.data() + i * span, rows.scale[i], sums, reference);
        if (!kquant) {
          rows.low[i] = rows.scale[i] * static_cast<float>(sums[0]);
          continue;
        }
        for (int64_t j = 0; j < per / 2; ++j)
          rows.sums[i * per / 2 + j] = static_cast<int32_t>(static_cast<uint32_t>(sums[2 * j] & 0xFFFF) |
                                                            (static_cast<uint32_t>(sums[2 * j + 1]) << 16));
      }
    });
  };
  if (x.scalar_type() == at::kFloat) each(x.data_ptr<float>());
  else each(x.data_ptr<at::BFloat16>());
  return rows;
}

// The reference of the int8 kernel: tile t of R rows of quantized x, in the vector kernel's order of float
// operations (its result should equal this bit for bit).
void tile_scalar_int8(const int8_t* x, int64_t m_rows, int64_t K, const uint8_t* codes, int t, const Meta& meta,
                      int64_t bits, int64_t group, const float* xscale, const float* xlow, float* y) {
  const int64_t groups = K / group, gbytes = group_bytes(bits, group);
  for (int64_t m = 0; m < m_rows; ++m) {
    for (int r = 0; r < TILE; ++r) {
      float total = 0.f;
      for (int64_t g = 0; g < groups; ++g) {
        const uint8_t* c = codes + g * 2 * gbytes;
        float scale, low;
        meta.at(g, t, r, scale, low);
        int32_t dot = 0;
        for (int k = 0; k < group; ++k) dot += code_at(c, bits, group, t, r, k) * x[m * K + g * group + k];
        const int64_t i = m * groups + g;
        total = std::fma(scale * xscale[i], static_cast<float>(dot), std::fma(low, xlow[i], total));
      }
      y[m * BLOCK + r] = total;
    }
  }
}

// The reference of the K-quant int8 kernel (x rounded per super-block of 256 inputs: ``xscale`` [m, K / 256],
// ``sums`` [m, groups / 2] as quantize_rows packs them), in its order of float operations.
void tile_scalar_int8_kquant(const int8_t* x, int64_t m_rows, int64_t K, const uint8_t* codes, int t,
                             const Meta& meta, int64_t bits, int64_t group, const float* xscale,
                             const int32_t* sums, float* y) {
  const int64_t groups = K / group, gbytes = group_bytes(bits, group), per = meta.per_super;
  for (int64_t m = 0; m < m_rows; ++m) {
    for (int r = 0; r < TILE; ++r) {
      float total = 0.f;
      for (int64_t g0 = 0; g0 < groups; g0 += per) {
        // the super-block's sum of a_g * dot_g as the build's vector kernel makes it: in float32 on AVX512-VNNI
        // (exact while the partial sums stay below 2^24 in magnitude), in integers on AVX2 (exact: at most
        // 256 x 63 x 127 x 128 < 2^31)
#ifdef QMM_AVX512VNNI
        float sum = 0.f;
#else
        int32_t sum = 0;
#endif
        int32_t low = 0;
        for (int64_t g = g0; g < g0 + per; ++g) {
          const uint8_t* c = codes + g * 2 * gbytes;
          int32_t dot = 0;
          for (int k = 0; k < group; ++k) dot += code_at(c, bits, group, t, r, k) * x[m * K + g * group + k];
#ifdef QMM_AVX512VNNI
          sum = std::fma(static_cast<float>(meta.multiplier(g, t)[r]), static_cast<float>(dot), sum);
#else
          sum += meta.multiplier(g, t)[r] * dot;
#endif
          const int32_t pair = sums[m * groups / 2 + g / 2];
          low += meta.multiplier(g, t)[16 + r] * static_cast<int16_t>(g % 2 ? pair >> 16 : pair & 0xFFFF);
        }
        const float s = xscale[m * groups / per + g0 / per];
        const float d = half_to_float(meta.factor(g0, t)[r]), dmin = half_to_float(meta.factor(g0, t)[16 + r]);
        total = std::fma(dmin * s, static_cast<float>(low), std::fma(d * s, static_cast<float>(sum), total));
      }
      y[m * BLOCK + r] = total;
    }
  }
}

#ifdef QMM_AVX512VNNI
// Group g's integer dot products of a block's codes and R rows of int8 x, into acc [R][2 tiles]. Two units of
// codes as bytes make each tile's 16 rows x 4 inputs: interleaving their 16-bit words (within 16-byte lanes,
// where the tiles alternate by 8 bytes) puts pair u and pair u + 1 of a row in one 32-bit lane, what vpdpbusd
// multiplies with a broadcast quad of x. (Inlined, so that acc stays in registers.)
template <int BITS, int G, int R>
__attribute__((always_inline)) inline void group_dots(const int8_t* x, int64_t K, const uint8_t* codes, int64_t g, __m512i acc[R][2]) {
  constexpr int64_t gbytes = TILE * G * BITS / 8;
  auto quad = [](const int8_t* p) { int32_t v; std::memcpy(&v, p, 4); return _mm512_set1_epi32(v); };
  const uint8_t* c = codes + g * 2 * gbytes;
  const int8_t* xg = x + g * G;
  prefetch_ahead<2 * gbytes>(c);
#pragma GCC unroll 8
  for (int m = 0; m < R; ++m) acc[m][0] = acc[m][1] = _mm512_setzero_si512();
  constexpr int units = G / 4;
#pragma GCC unroll 4
  for (int u = 0; u < units; u += 2) {
    __m512i lo0, hi0, lo1, hi1;
    unit_codes<BITS, G>(c, u, lo0, hi0);
    unit_codes<BITS, G>(c, u + 1, lo1, hi1);
    const __m512i a0 = _mm512_unpacklo_epi16(lo0, lo1), a1 = _mm512_unpackhi_epi16(lo0, lo1);
    const __m512i b0 = _mm512_unpacklo_epi16(hi0, hi1), b1 = _mm512_unpackhi_epi16(hi0, hi1);
#pragma GCC unroll 8
    for (int m = 0; m < R; ++m) {
      const __m512i p = quad(xg + m * K + 2 * u), q = quad(xg + m * K + 2 * (u + units));
      acc[m][0] = _mm512_dpbusd_epi32(acc[m][0], a0, p);
      acc[m][1] = _mm512_dpbusd_epi32(acc[m][1], a1, p);
      acc[m][0] = _mm512_dpbusd_epi32(acc[m][0], b0, q);
      acc[m][1] = _mm512_dpbusd_epi32(acc[m][1], b1, q);
    }
  }
}

// R rows of int8 x times one block, into y [R, 32] (as block_bf16), a group's dot products at a time.
template <int BITS, int G, int R>
void block_int8(const int8_t* x, int64_t K, const uint8_t* codes, const Meta& meta, float* y, const float* xscale,
                const float* xlow) {
  constexpr bool in_registers = R <= 6;
  const int64_t groups = K / G;
  __m512 yacc[in_registers ? R : 1][2];
#pragma GCC unroll 8
  for (int m = 0; m < R; ++m) {
    if (in_registers) yacc[m][0] = yacc[m][1] = _mm512_setzero_ps();
    else _mm512_storeu_ps(y + m * BLOCK, _mm512_setzero_ps()), _mm512_storeu_ps(y + m * BLOCK + TILE, _mm512_setzero_ps());
  }
  for (int64_t g = 0; g < groups; ++g) {
    __m512i acc[R][2];
    group_dots<BITS, G, R>(x, K, codes, g, acc);
#pragma GCC unroll 2
    for (int t = 0; t < 2; ++t) {
      __m512 sc, lo;
      meta512(meta, g, t, sc, lo);
#pragma GCC unroll 8
      for (int m = 0; m < R; ++m) {
        float* out = y + m * BLOCK + t * TILE;
        const int64_t i = m * groups + g;
        const __m512 before = in_registers ? yacc[m][t] : _mm512_loadu_ps(out);
        const __m512 after = _mm512_fmadd_ps(_mm512_mul_ps(sc, _mm512_set1_ps(xscale[i])),
                                             _mm512_cvtepi32_ps(acc[m][t]),
                                             _mm512_fmadd_ps(lo, _mm512_set1_ps(xlow[i]), before));
        if (in_registers) yacc[m][t] = after;
        else _mm512_storeu_ps(out, after);
      }
    }
  }
  if (in_registers) {
#pragma GCC unroll 4
    for (int m = 0; m < R; ++m) {
      _mm512_storeu_ps(y + m * BLOCK, yacc[m][0]);
      _mm512_storeu_ps(y + m * BLOCK + TILE, yacc[m][1]);
    }
  }
}

// R rows of int8 x, rounded per super-block of 256 inputs, times one block of K-quant weights, into y [R, 32]:
// block_int8's integer dot products, then each group's a_g times its dot into a float sum per row and tile;
// at each super-block's end, y += (d * s) * sum + (dmin * s) * sum_g(b_g * sum(q_g)), the last in integers
// (vpdpwssd: b_g of groups 2j, 2j + 1 as int16 pairs times their sums of q, packed the same way).
template <int BITS, int G, int R>
void block_int8_kquant(const int8_t* x, int64_t K, const uint8_t* codes, const Meta& meta, float* y,
                       const float* xscale, const int32_t* sums) {
  constexpr int per = 256 / G;
  constexpr bool in_registers = R <= 6;
  const int64_t groups = K / G;
  __m512 fsum[in_registers ? R : 1][2];
  alignas(64) float spill[in_registers ? 1 : R * BLOCK];
#pragma GCC unroll 8
  for (int m = 0; m < R; ++m) _mm512_storeu_ps(y + m * BLOCK, _mm512_setzero_ps()), _mm512_storeu_ps(y + m * BLOCK + TILE, _mm512_setzero_ps());
  auto i8 = [](const int8_t* p) { return _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); };
  for (int64_t g0 = 0; g0 < groups; g0 += per) {
#pragma GCC unroll 8
    for (int m = 0; m < R; ++m) {
      if (in_registers) fsum[m][0] = fsum[m][1] = _mm512_setzero_ps();
      else _mm512_store_ps(spill + m * BLOCK, _mm512_setzero_ps()), _mm512_store_ps(spill + m * BLOCK + TILE, _mm512_setzero_ps());
    }
    for (int64_t g = g0; g < g0 + per; ++g) {
      __m512i acc[R][2];
      group_dots<BITS, G, R>(x, K, codes, g, acc);
#pragma GCC unroll 2
      for (int t = 0; t < 2; ++t) {
        const __m512 a = _mm512_cvtepi32_ps(i8(meta.multiplier(g, t)));
#pragma GCC unroll 8
        for (int m = 0; m < R; ++m) {
          float* out = spill + m * BLOCK + t * TILE;
          const __m512 before = in_registers ? fsum[m][t] : _mm512_load_ps(out);
          const __m512 after = _mm512_fmadd_ps(a, _mm512_cvtepi32_ps(acc[m][t]), before);
          if (in_registers) fsum[m][t] = after;
          else _mm512_store_ps(out, after);
        }
      }
    }
#pragma GCC unroll 2
    for (int t = 0; t < 2; ++t) {
      __m512i b[per / 2];
#pragma GCC unroll 8
      for (int j = 0; j < per / 2; ++j) {
        const __m512i even = i8(meta.multiplier(g0 + 2 * j, t) + 16), odd = i8(meta.multiplier(g0 + 2 * j + 1, t) + 16);
        b[j] = _mm512_or_si512(_mm512_and_si512(even, _mm512_set1_epi32(0xFFFF)), _mm512_slli_epi32(odd, 16));
      }
      const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(meta.factor(g0, t))));
      const __m512 dmin = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(meta.factor(g0, t) + 16)));
#pragma GCC unroll 8
      for (int m = 0; m < R; ++m) {
        const int32_t* pairs = sums + m * groups / 2 + g0 / 2;
        __m512i low = _mm512_setzero_si512();
#pragma GCC unroll 8
        for (int j = 0; j < per / 2; ++j) low = _mm512_dpwssd_epi32(low, b[j], _mm512_set1_epi32(pairs[j]));
        const __m512 s = _mm512_set1_ps(xscale[m * groups / per + g0 / per]);
        const __m512 sum = in_registers ? fsum[m][t] : _mm512_load_ps(spill + m * BLOCK + t * TILE);
        float* out = y + m * BLOCK + t * TILE;
        _mm512_storeu_ps(out, _mm512_fmadd_ps(_mm512_mul_ps(dmin, s), _mm512_cvtepi32_ps(low),
                                              _mm512_fmadd_ps(_mm512_mul_ps(d, s), sum, _mm512_loadu_ps(out))));
      }
    }
  }
}
#endif

#ifdef QMM_AVX2
// int8 x on AVX2 (no VNNI): vpmaddubsw multiplies a 32-bit lane's four u8 codes by a broadcast quad of x into two
// int16 sums, and vpmaddwd with ones adds those into the lane's int32, the integer dot products vpdpbusd makes.
// With 4-bit codes a group's int16 sums add up before that (at most 8 x 2 x 15 x 127 = 30480 a lane for G = 32);
// 6-bit codes (2 x 63 x 127 = 16002 each) go to int32 two at a time. Against plain groups the float operations
// after are block_int8's, in the same order, so the results equal the VNNI kernel's bit for bit. Against
// K-quants, vpmaddwd multiplies the int16 sums by each group's multiplier a_g rather than by ones, and a
// super-block's groups add up in int32, converted to float once: block_int8_kquant converts each group's dot
// and adds a_g * dot_g in float32, which is the same number while its partial sums stay below 2^24 in
// magnitude (every one so far; a super-block of products that large would differ in the last bit). Two float
// operations a group and row fewer: the 1.5B's Q6_K layers (groups of 16) ~7 % faster at 5 to 128 rows, Q4_K
// 1-4 %, sd +2.3 % end to end (Zen 3). The scalar reference follows the build's kernel.
//
// A 32-byte half h of a unit holds rows 8h..8h+7 of both tiles (tiles alternating by 8 bytes within each
// 16-byte lane); interleaving the words of two units' halves puts a row's pairs u and u + 1 in one 32-bit lane.

// Group g's dot products of rows 8h..8h+7 of both tiles with R rows of int8 x, into acc [R][2 tiles] (int32);
// with ``WEIGHTED``, acc += each dot times its row's multiplier (``mul`` [2 tiles]: a lane's int16 pair both
// the multiplier of the lane's row).
template <int BITS, int G, int R, bool WEIGHTED = false>
__attribute__((always_inline)) inline void group_dots_avx2(const int8_t* x, int64_t K, const uint8_t* codes, int64_t g,
                                                           int h, __m256i acc[R][2], const __m256i* mul = nullptr) {
  constexpr int64_t gbytes = TILE * G * BITS / 8;
  constexpr int units = G / 4, top_units = G / 8;
  const uint8_t* c = codes + g * 2 * gbytes + 32 * h;
  const int8_t* xg = x + g * G;
  const __m256i nibble = _mm256_set1_epi8(0x0F), top = _mm256_set1_epi8(0x30), ones = _mm256_set1_epi16(1);
  auto load = [](const uint8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); };
  auto quad = [](const int8_t* p) { int32_t v; std::memcpy(&v, p, 4); return _mm256_set1_epi32(v); };
  // unit u's codes as bytes: ``lo`` the pair of inputs u, ``hi`` the pair u + G/4 (as unit_codes)
  auto unit = [&](int u, __m256i& lo, __m256i& hi) {
    const __m256i v = load(c + u * 64);
    lo = _mm256_and_si256(v, nibble), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), nibble);
    if (BITS == 6) {
      const int s = 2 * (u / top_units);
      const __m256i t = load(c + G * 16 + (u % top_units) * 64);
      lo = _mm256_or_si256(lo, _mm256_and_si256(_mm256_slli_epi16(t, 4 - s), top));
      hi = _mm256_or_si256(hi, _mm256_and_si256(_mm256_srli_epi16(t, s), top));
    }
  };
  __m256i sum16[R][2];
#pragma GCC unroll 8
  for (int m = 0; m < R; ++m) {
    sum16[m][0] = sum16[m][1] = _mm256_setzero_si256();
    if (!WEIGHTED) acc[m][0] = acc[m][1] = _mm256_setzero_si256();
  }
  const __m256i w0 = WEIGHTED ? mul[0] : ones, w1 = WEIGHTED ? mul[1] : ones;
#pragma GCC unroll 4
  for (int u = 0; u < units; u += 2) {
    __m256i lo0, hi0, lo1, hi1;
    unit(u, lo0, hi0);
    unit(u + 1, lo1, hi1);
    const __m256i a0 = _mm256_unpacklo_epi16(lo0, lo1), a1 = _mm256_unpackhi_epi16(lo0, lo1);
    const __m256i b0 = _mm256_unpacklo_epi16(hi0, hi1), b1 = _mm256_unpackhi_epi16(hi0, hi1);
#pragma GCC unroll 8
    for (int m = 0; m < R; ++m) {
      const __m256i p = quad(xg + m * K + 2 * u), q = quad(xg + m * K + 2 * (u + units));
      if (BITS == 4) {
        // each add pinned where it is written (the empty asm): GCC would otherwise re-associate the chain into a
        // tree, computing the whole unrolled group's products first and spilling them (~25 % slower at 5 to 128
        // rows, Zen 3). Not the saturating vpaddsw that once pinned it: on Zen 3 it competes with vpmaddubsw for
        // the same two pipes (measured a core: either alone 6.2 G a second, vpmaddubsw + vpaddsw 3.3 G pairs,
        // vpmaddubsw + vpaddw 4.9 G; these layers ~10 % faster at 4 to 128 rows). The sums never overflow (30480
        // at most), so both give the same bits.
        auto add = [](__m256i& sum, __m256i v) { sum = _mm256_add_epi16(sum, v); asm("" : "+x"(sum)); };
        add(sum16[m][0], _mm256_maddubs_epi16(a0, p));
        add(sum16[m][1], _mm256_maddubs_epi16(a1, p));
        add(sum16[m][0], _mm256_maddubs_epi16(b0, q));
        add(sum16[m][1], _mm256_maddubs_epi16(b1, q));
      } else {
        const __m256i s0 = _mm256_add_epi16(_mm256_maddubs_epi16(a0, p), _mm256_maddubs_epi16(b0, q));
        const __m256i s1 = _mm256_add_epi16(_mm256_maddubs_epi16(a1, p), _mm256_maddubs_epi16(b1, q));
        acc[m][0] = _mm256_add_epi32(acc[m][0], _mm256_madd_epi16(s0, w0));
        acc[m][1] = _mm256_add_epi32(acc[m][1], _mm256_madd_epi16(s1, w1));
      }
    }
  }
  if (BITS == 4) {
#pragma GCC unroll 8
    for (int m = 0; m < R; ++m) {  // (acc is zero here unless WEIGHTED: the add folds away)
      acc[m][0] = _mm256_add_epi32(acc[m][0], _mm256_madd_epi16(sum16[m][0], w0));
      acc[m][1] = _mm256_add_epi32(acc[m][1], _mm256_madd_epi16(sum16[m][1], w1));
    }
  }
}

// R rows of int8 x times one block, into y [R, 32]: block_int8's arithmetic, a half-tile of rows at a time.
template <int BITS, int G, int R>
void block_int8_avx2(const int8_t* x, int64_t K, const uint8_t* codes, const Meta& meta, float* y, const float* xscale,
                     const float* xlow) {
  const int64_t groups = K / G;
  __m256 yacc[R][2][2];  // [row][tile][half]
#pragma GCC unroll 8
  for (int m = 0; m < R; ++m)
    for (int t = 0; t < 2; ++t) yacc[m][t][0] = yacc[m][t][1] = _mm256_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
#pragma GCC unroll 2
    for (int h = 0; h < 2; ++h) {
      __m256i acc[R][2];
      group_dots_avx2<BITS, G, R>(x, K, codes, g, h, acc);
#pragma GCC unroll 2
      for (int t = 0; t < 2; ++t) {
        __m256 sc, lo;
        meta256(meta, g, t, h, sc, lo);
#pragma GCC unroll 8
        for (int m = 0; m < R; ++m) {
          const int64_t i = m * groups + g;
          yacc[m][t][h] = _mm256_fmadd_ps(_mm256_mul_ps(sc, _mm256_set1_ps(xscale[i])), _mm256_cvtepi32_ps(acc[m][t]),
                                          _mm256_fmadd_ps(lo, _mm256_set1_ps(xlow[i]), yacc[m][t][h]));
        }
      }
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < R; ++m)
    for (int t = 0; t < 2; ++t)
      for (int h = 0; h < 2; ++h) _mm256_storeu_ps(y + m * BLOCK + t * TILE + 8 * h, yacc[m][t][h]);
}

// R rows of int8 x, rounded per super-block of 256 inputs, times one block of K-quant weights, into y [R, 32]:
// block_int8_kquant's arithmetic (vpdpwssd's pairs of int16 products as vpmaddwd) but for a super-block's
// groups summed in integers (above), a half-tile at a time.
template <int BITS, int G, int R>
void block_int8_kquant_avx2(const int8_t* x, int64_t K, const uint8_t* codes, const Meta& meta, float* y,
                            const float* xscale, const int32_t* sums) {
  constexpr int per = 256 / G;
  const int64_t groups = K / G;
  auto i8 = [](const int8_t* p) {
    return _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  };
  auto f16 = [](const uint16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); };
  __m256 yacc[R][2][2];  // [row][tile][half]
#pragma GCC unroll 8
  for (int m = 0; m < R; ++m)
    for (int t = 0; t < 2; ++t) yacc[m][t][0] = yacc[m][t][1] = _mm256_setzero_ps();
  for (int64_t g0 = 0; g0 < groups; g0 += per) {
#pragma GCC unroll 2
    for (int h = 0; h < 2; ++h) {
      __m256i isum[R][2];
#pragma GCC unroll 8
      for (int m = 0; m < R; ++m) isum[m][0] = isum[m][1] = _mm256_setzero_si256();
      for (int64_t g = g0; g < g0 + per; ++g) {
        __m256i mul[2];  // each row's a_g twice, as the int16 pair of its lane
#pragma GCC unroll 2
        for (int t = 0; t < 2; ++t) {
          const __m128i a = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(meta.multiplier(g, t) + 8 * h));
          mul[t] = _mm256_cvtepi8_epi16(_mm_unpacklo_epi8(a, a));
        }
        group_dots_avx2<BITS, G, R, true>(x, K, codes, g, h, isum, mul);
      }
#pragma GCC unroll 2
      for (int t = 0; t < 2; ++t) {
        __m256i b[per / 2];
#pragma GCC unroll 8
        for (int j = 0; j < per / 2; ++j) {
          const __m256i even = i8(meta.multiplier(g0 + 2 * j, t) + 16 + 8 * h);
          const __m256i odd = i8(meta.multiplier(g0 + 2 * j + 1, t) + 16 + 8 * h);
          b[j] = _mm256_or_si256(_mm256_and_si256(even, _mm256_set1_epi32(0xFFFF)), _mm256_slli_epi32(odd, 16));
        }
        const __m256 d = f16(meta.factor(g0, t) + 8 * h), dmin = f16(meta.factor(g0, t) + 16 + 8 * h);
#pragma GCC unroll 8
        for (int m = 0; m < R; ++m) {
          const int32_t* pairs = sums + m * groups / 2 + g0 / 2;
          __m256i low = _mm256_setzero_si256();
#pragma GCC unroll 8
          for (int j = 0; j < per / 2; ++j) low = _mm256_add_epi32(low, _mm256_madd_epi16(b[j], _mm256_set1_epi32(pairs[j])));
          const __m256 s = _mm256_set1_ps(xscale[m * groups / per + g0 / per]);
          yacc[m][t][h] = _mm256_fmadd_ps(_mm256_mul_ps(dmin, s), _mm256_cvtepi32_ps(low),
                                          _mm256_fmadd_ps(_mm256_mul_ps(d, s), _mm256_cvtepi32_ps(isum[m][t]), yacc[m][t][h]));
        }
      }
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < R; ++m)
    for (int t = 0; t < 2; ++t)
      for (int h = 0; h < 2; ++h) _mm256_storeu_ps(y + m * BLOCK + t * TILE + 8 * h, yacc[m][t][h]);
}
#endif

// fn(R) for rows = R in 1..MAX (a compile-time R)
template <int MAX, typename Fn>
void dispatch_rows(int64_t rows, Fn&& fn) {
  if constexpr (MAX > 1) {
    if (rows < MAX) return dispatch_rows<MAX - 1>(rows, fn);
  }
  fn(std::integral_constant<int, MAX>());
}

template <typename Fn>
void dispatch_format(int64_t bits, int64_t group, Fn&& fn) {
  if (bits == 4 && group == 32) fn(std::integral_constant<int, 4>(), std::integral_constant<int, 32>());
  else if (bits == 4 && group == 16) fn(std::integral_constant<int, 4>(), std::integral_constant<int, 16>());
  else if (bits == 6 && group == 32) fn(std::integral_constant<int, 6>(), std::integral_constant<int, 32>());
  else fn(std::integral_constant<int, 6>(), std::integral_constant<int, 16>());
}

enum class Isa { kScalar, kAvx2, kAvx512Bf16, kAvx512Vnni };

// The inner kernel that serves x of this dtype (rounded to int8 with ``int8``) on this build.
Isa isa_for(at::ScalarType dtype, bool int8, bool reference) {
  if (reference) return Isa::kScalar;
  if (int8) {
#if defined(QMM_AVX512VNNI)
    return Isa::kAvx512Vnni;
#elif defined(QMM_AVX2)
    return Isa::kAvx2;
#else
    return Isa::kScalar;
#endif
  }
#ifdef QMM_AVX512BF16
  if (dtype == at::kBFloat16) return Isa::kAvx512Bf16;
#endif
#ifdef QMM_AVX2
  return Isa::kAvx2;
#else
  return Isa::kScalar;
#endif
}

// exp(x) in float32 (Cephes' expf: x = n ln2 + r, |r| <= ln2 / 2, a degree-7 polynomial in r, times 2^n), as
// fused multiply-adds in one fixed order, so the scalar form below and the vector form in Epilogue give the
// same bits (within 1-2 ulp of the true exp; std::exp has no vector twin to match).
inline float exp_cephes(float x) {
  x = std::min(std::max(x, -87.3f), 88.3f);
  const float n = std::nearbyint(x * 1.44269504088896341f);
  float r = std::fma(n, -0.693359375f, x);
  r = std::fma(n, 2.12194440e-4f, r);
  float y = 1.9875691500e-4f;
  y = std::fma(y, r, 1.3981999507e-3f);
  y = std::fma(y, r, 8.3334519073e-3f);
  y = std::fma(y, r, 4.1665795894e-2f);
  y = std::fma(y, r, 1.6666665459e-1f);
  y = std::fma(y, r, 5.0000001201e-1f);
  y = std::fma(y, r * r, r) + 1.f;
  return std::ldexp(y, static_cast<int>(n));
}

inline float silu_times(float g, float up) { return g / (1.f + exp_cephes(-g)) * up; }

#ifdef QMM_AVX512
inline __m512 exp_cephes(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.3f)), _mm512_set1_ps(88.3f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fmadd_ps(n, _mm512_set1_ps(-0.693359375f), x);
  r = _mm512_fmadd_ps(n, _mm512_set1_ps(2.12194440e-4f), r);
  __m512 y = _mm512_set1_ps(1.9875691500e-4f);
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.3981999507e-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(8.3334519073e-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(4.1665795894e-2f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.6666665459e-1f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(5.0000001201e-1f));
  y = _mm512_add_ps(_mm512_fmadd_ps(y, _mm512_mul_ps(r, r), r), _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(y, n);
}

inline __m512 silu_times(__m512 g, __m512 up) {
  const __m512 e = exp_cephes(_mm512_sub_ps(_mm512_setzero_ps(), g));
  return _mm512_mul_ps(_mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.f), e)), up);
}

// 16 float32 results into T (bf16: rounded to nearest even, as c10::BFloat16 rounds)
template <typename T>
inline void store16(T* out, __m512 v) {
  if constexpr (std::is_same_v<T, float>) {
    _mm512_storeu_ps(out, v);
  } else {
    // c10::BFloat16's rounding: to nearest even on the float bits, a NaN as 0x7FC0
    const __m512i bits = _mm512_castps_si512(v);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    __m512i half = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))), 16);
    half = _mm512_mask_mov_epi32(half, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), _mm512_cvtepi32_epi16(half));
  }
}
#endif

#if defined(QMM_AVX2) && !defined(QMM_AVX512)
// exp_cephes and silu_times on 8 lanes: the same operations (2^n as an exponent field: n is in -126..127 after
// the clamp, so the product is scalef's and ldexp's, bit for bit)
inline __m256 exp_cephes(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fmadd_ps(n, _mm256_set1_ps(-0.693359375f), x);
  r = _mm256_fmadd_ps(n, _mm256_set1_ps(2.12194440e-4f), r);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_add_ps(_mm256_fmadd_ps(y, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.f));
  return _mm256_mul_ps(y, two_to(n));
}

inline __m256 silu_times(__m256 g, __m256 up) {
  const __m256 e = exp_cephes(_mm256_sub_ps(_mm256_setzero_ps(), g));
  return _mm256_mul_ps(_mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.f), e)), up);
}
#endif

// What follows a block's float32 results [rows][32] into the output row(s): a bias, or SwiGLU (the block's
// first tile holds 16 gate rows, its second the 16 matching up rows: out = silu(gate) * up, 16 columns).
// A whole block's outputs go out as vectors (AVX512), a partial one's one by one: the same bits.
struct Epilogue {
  const float* bias;  // [n] or null
  bool swiglu;
  int64_t columns;    // of the output: n, or n / 2 with SwiGLU

  template <typename T>
  void store(const float* block, int64_t rows, int64_t b, T* y) const {
#ifdef QMM_AVX512
    if constexpr (std::is_same_v<T, float> || std::is_same_v<T, at::BFloat16>) {
      if ((b + 1) * (swiglu ? TILE : BLOCK) <= columns) {
        for (int64_t m = 0; m < rows; ++m) {
          const float* r = block + m * BLOCK;
          T* out = y + m * columns;
          if (swiglu) {
            store16(out + b * TILE, silu_times(_mm512_loadu_ps(r), _mm512_loadu_ps(r + TILE)));
            continue;
          }
          for (int t = 0; t < 2; ++t) {
            const __m512 v = _mm512_loadu_ps(r + t * TILE);
            const float* add = bias ? bias + b * BLOCK + t * TILE : nullptr;
            store16(out + b * BLOCK + t * TILE, add ? _mm512_add_ps(v, _mm512_loadu_ps(add)) : v);
          }
        }
        return;
      }
    }
#elif defined(QMM_AVX2)
    if constexpr (std::is_same_v<T, float>) {
      if ((b + 1) * (swiglu ? TILE : BLOCK) <= columns) {
        for (int64_t m = 0; m < rows; ++m) {
          const float* r = block + m * BLOCK;
          float* out = y + m * columns;
          for (int i = 0; i < (swiglu ? TILE : BLOCK); i += 8) {
            const __m256 v = _mm256_loadu_ps(r + i);
            if (swiglu) _mm256_storeu_ps(out + b * TILE + i, silu_times(v, _mm256_loadu_ps(r + TILE + i)));
            else _mm256_storeu_ps(out + b * BLOCK + i, bias ? _mm256_add_ps(v, _mm256_loadu_ps(bias + b * BLOCK + i)) : v);
          }
        }
        return;
      }
    }
#endif
    for (int64_t m = 0; m < rows; ++m) {
      const float* r = block + m * BLOCK;
      T* out = y + m * columns;
      if (swiglu) {
        for (int i = 0; i < TILE && b * TILE + i < columns; ++i)
          out[b * TILE + i] = static_cast<T>(silu_times(r[i], r[TILE + i]));
      } else {
        for (int i = 0; i < BLOCK && b * BLOCK + i < columns; ++i)
          out[b * BLOCK + i] = static_cast<T>(bias ? r[i] + bias[b * BLOCK + i] : r[i]);
      }
    }
  }
};

at::Tensor run(const at::Tensor& x_in, const at::Tensor& codes, const at::Tensor& meta, int64_t n, int64_t bits,
               int64_t group, const c10::optional<at::Tensor>& bias, bool swiglu, bool int8, bool reference) {
  TORCH_CHECK(bits == 4 || bits == 6, "qmm: expected bits 4 or 6, received ", bits);
  TORCH_CHECK(group == 16 || group == 32, "qmm: expected a group of 16 or 32, received ", group);
  TORCH_CHECK(x_in.dim() == 2, "qmm: expected x [M, K], received ", x_in.sizes());
  TORCH_CHECK(codes.scalar_type() == at::kByte && codes.dim() == 4 && codes.is_contiguous(),
              "qmm: expected contiguous uint8 codes [blocks, groups, 2, bytes]");
  const bool kquant = meta.scalar_type() == at::kByte;
  const int64_t M = x_in.size(0), K = x_in.size(1), blocks = codes.size(0), groups = codes.size(1);
  TORCH_CHECK(K == groups * group, "qmm: expected x with ", groups * group, " inputs, received ", K);
  TORCH_CHECK(codes.size(2) == 2 && codes.size(3) == group_bytes(bits, group), "qmm: expected ",
              group_bytes(bits, group), " bytes of codes per tile and group");
  // K-quant meta: a super-block factor per 256 inputs
  const int64_t supers = K / 256, meta_bytes = kquant ? groups * 64 + supers * 128 : groups * 128;
  if (kquant) {
    TORCH_CHECK(K % 256 == 0 && meta.dim() == 2 && meta.is_contiguous() && meta.size(0) == blocks &&
                meta.size(1) == meta_bytes, "qmm: expected contiguous K-quant meta [", blocks, ", ", meta_bytes,
                "] (inputs a multiple of 256)");
  } else {
    TORCH_CHECK(meta.scalar_type() == at::kHalf && meta.dim() == 5 && meta.is_contiguous(),
                "qmm: expected contiguous fp16 meta [blocks, groups, 2, 2, 16] or uint8 K-quant meta");
    TORCH_CHECK(meta.size(0) == blocks && meta.size(1) == groups, "qmm: meta and codes disagree");
  }
  TORCH_CHECK(blocks * BLOCK >= n && (blocks - 1) * BLOCK < n, "qmm: ", blocks, " blocks cannot hold ", n, " rows");
  TORCH_CHECK(!swiglu || n == blocks * BLOCK, "qmm: SwiGLU needs whole blocks of 16 gate and 16 up rows");
  TORCH_CHECK(!(swiglu && bias.has_value()), "qmm: a bias with SwiGLU is not supported");
  at::Tensor bias_f;
  if (bias.has_value()) {
    TORCH_CHECK(bias->numel() == n, "qmm: expected a bias of ", n, " values, received ", bias->numel());
    bias_f = bias->to(at::kFloat).contiguous();
  }
  const Epilogue epilogue{bias.has_value() ? bias_f.data_ptr<float>() : nullptr, swiglu, swiglu ? n / 2 : n};
  const auto out_dtype = x_in.scalar_type();
  const Isa isa = isa_for(out_dtype, int8, reference);
  const bool bf16 = isa == Isa::kAvx512Bf16;
  at::Tensor x = bf16 || (int8 && out_dtype == at::kBFloat16) ? x_in.contiguous() : x_in.to(at::kFloat).contiguous();
  // int8: x rounded (per group, or per super-block against K-quants); else each row's sum over each group of
  // inputs [M, groups], in float32
  const Int8Rows xq = int8 ? quantize_rows(x, group, kquant, reference) : Int8Rows{};
  std::vector<float> xsum(int8 ? 0 : M * groups);
  for (int64_t i = 0; i < static_cast<int64_t>(xsum.size()); ++i) {
    float total = 0.f;
    if (bf16) {
      const at::BFloat16* xb = x.data_ptr<at::BFloat16>() + i * group;
      for (int64_t k = 0; k < group; ++k) total += static_cast<float>(xb[k]);
    } else {
      const float* xf = x.data_ptr<float>() + i * group;
      for (int64_t k = 0; k < group; ++k) total += xf[k];
    }
    xsum[i] = total;
  }
  // the vector kernels' bf16 activations: bf16 out; the others float32 out (cast to their dtype after)
  const bool out_bf16 = out_dtype == at::kBFloat16 && (bf16 || isa == Isa::kAvx512Vnni);
  at::Tensor y = at::empty({M, epilogue.columns}, x.options().dtype(out_bf16 ? at::kBFloat16 : at::kFloat));
  const uint8_t* cp = codes.data_ptr<uint8_t>();
  const uint8_t* mp = reinterpret_cast<const uint8_t*>(meta.data_ptr());
  const float* sp = xsum.data();
  const int64_t gbytes = group_bytes(bits, group);
  const int64_t block_bytes = groups * 2 * gbytes;
  // rows of x in register blocks of at most MT (MT_INT8_AVX2, MT_BF16), balanced (5 = 3 + 2, not 4 + 1: a
  // block of one row is latency-bound)
  const bool wide = bf16 || isa == Isa::kAvx512Vnni;  // AVX512's 32 registers
  const int64_t mt = !wide ? (int8 ? MT_INT8_AVX2 : MT) : M > 2 * MT_BF16 ? MT_LONG : MT_BF16, chunks = (M + mt - 1) / mt;
  auto work = [&](int64_t begin, int64_t end) {
    alignas(64) float results[MT_BF16 * BLOCK];
    for (int64_t b = begin; b < end; ++b) {
      const uint8_t* cb = cp + b * block_bytes;
      const Meta mb{mp + b * meta_bytes, groups, kquant ? 256 / group : 0};
      for (int64_t c = 0, m0 = 0; c < chunks; ++c) {
        const int64_t rows = (M - m0) / (chunks - c);
        const float* sb = sp + m0 * groups;
        if (int8) {
          const int8_t* xb = xq.q.data() + m0 * K;
          const float* xs = xq.scale.data() + m0 * (kquant ? supers : groups);
          const float* xl = kquant ? nullptr : xq.low.data() + m0 * groups;
          const int32_t* xp = kquant ? xq.sums.data() + m0 * groups / 2 : nullptr;
          if (isa == Isa::kScalar) {
            for (int t = 0; t < 2; ++t) {
              if (kquant) tile_scalar_int8_kquant(xb, rows, K, cb, t, mb, bits, group, xs, xp, results + t * TILE);
              else tile_scalar_int8(xb, rows, K, cb, t, mb, bits, group, xs, xl, results + t * TILE);
            }
          } else {
#ifdef QMM_AVX512VNNI
            dispatch_format(bits, group, [&](auto B, auto G) {
              dispatch_rows<MT_BF16>(rows, [&](auto R) {
                constexpr int nb = decltype(B)::value, ng = decltype(G)::value, nr = decltype(R)::value;
                if (kquant) block_int8_kquant<nb, ng, nr>(xb, K, cb, mb, results, xs, xp);
                else block_int8<nb, ng, nr>(xb, K, cb, mb, results, xs, xl);
              });
            });
#elif defined(QMM_AVX2)
            dispatch_format(bits, group, [&](auto B, auto G) {
              dispatch_rows<MT_INT8_AVX2>(rows, [&](auto R) {
                constexpr int nb = decltype(B)::value, ng = decltype(G)::value, nr = decltype(R)::value;
                if (kquant) block_int8_kquant_avx2<nb, ng, nr>(xb, K, cb, mb, results, xs, xp);
                else block_int8_avx2<nb, ng, nr>(xb, K, cb, mb, results, xs, xl);
              });
            });
#endif
          }
          if (out_bf16) epilogue.store(results, rows, b, y.data_ptr<at::BFloat16>() + m0 * epilogue.columns);
          else epilogue.store(results, rows, b, y.data_ptr<float>() + m0 * epilogue.columns);
          m0 += rows;
          continue;
        }
        if (bf16) {
#ifdef QMM_AVX512BF16
          const uint16_t* xb = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>()) + m0 * K;
          dispatch_format(bits, group, [&](auto B, auto G) {
            dispatch_rows<MT_BF16>(rows, [&](auto R) {
              block_bf16<decltype(B)::value, decltype(G)::value, decltype(R)::value>(xb, K, cb, mb, results, sb);
            });
          });
          epilogue.store(results, rows, b, y.data_ptr<at::BFloat16>() + m0 * epilogue.columns);
#endif
          m0 += rows;
          continue;
        }
        const float* xt = x.data_ptr<float>() + m0 * K;
        for (int t = 0; t < 2; ++t) {
          if (isa == Isa::kScalar) {
            tile_scalar(xt, rows, K, cb, t, mb, bits, group, results + t * TILE);
            continue;
          }
#ifdef QMM_AVX2
          dispatch_format(bits, group, [&](auto B, auto G) {
            dispatch_rows<MT>(rows, [&](auto R) {
              block_avx2<decltype(B)::value, decltype(G)::value, decltype(R)::value>(xt, K, cb, t, mb,
                                                                                     results + t * TILE, sb);
            });
          });
#endif
        }
        epilogue.store(results, rows, b, y.data_ptr<float>() + m0 * epilogue.columns);
        m0 += rows;
      }
    }
  };
  if (reference) work(0, blocks);
  else at::parallel_for(0, blocks, 2, work);  // each thread streams its own contiguous share of the weights
  return y.scalar_type() == out_dtype ? y : y.to(out_dtype);
}

at::Tensor qmm(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& meta, int64_t n, int64_t bits,
               int64_t group, const c10::optional<at::Tensor>& bias, bool swiglu, bool int8) {
  return run(x, codes, meta, n, bits, group, bias, swiglu, int8, false);
}

// The scalar reference over the same packed weights (tests compare the vector kernels with it).
at::Tensor qmm_reference(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& meta, int64_t n,
                         int64_t bits, int64_t group, const c10::optional<at::Tensor>& bias, bool swiglu,
                         bool int8) {
  return run(x, codes, meta, n, bits, group, bias, swiglu, int8, true);
}

// x [M, K] (float32 or bf16) rounded to int8 as the int8 kernel does, for tests: per group, (q int8 [M, K],
// s [M, K / group], s * sum(q) [M, K / group]); with ``kquant``, per super-block of 256 inputs, (q, s [M, K / 256],
// sum(q) per group int32 [M, K / group]).
std::tuple<at::Tensor, at::Tensor, at::Tensor> qmm_quantize(const at::Tensor& x_in, int64_t group, bool reference,
                                                            bool kquant) {
  const int64_t span = kquant ? 256 : group;
  TORCH_CHECK(x_in.dim() == 2 && x_in.size(1) % span == 0, "qmm_quantize: expected x [M, K], K a multiple of ", span);
  const at::Tensor x = x_in.scalar_type() == at::kBFloat16 ? x_in.contiguous() : x_in.to(at::kFloat).contiguous();
  Int8Rows rows = quantize_rows(x, group, kquant, reference);
  const int64_t M = x.size(0), K = x.size(1);
  at::Tensor q = at::empty({M, K}, x.options().dtype(at::kChar));
  at::Tensor scale = at::empty({M, K / span}, x.options().dtype(at::kFloat));
  at::Tensor third = at::empty({M, K / group}, x.options().dtype(kquant ? at::kInt : at::kFloat));
  std::memcpy(q.data_ptr(), rows.q.data(), M * K);
  std::memcpy(scale.data_ptr(), rows.scale.data(), scale.numel() * 4);
  if (kquant) {
    int32_t* out = third.data_ptr<int32_t>();
    for (int64_t i = 0; i < third.numel(); ++i) out[i] = static_cast<int16_t>(rows.sums[i / 2] >> (i % 2 ? 16 : 0));
  } else {
    std::memcpy(third.data_ptr(), rows.low.data(), third.numel() * 4);
  }
  return {q, scale, third};
}

// The rotary embedding and cache write of one sequence's new tokens, in one op (in eager PyTorch the
// same is ~20 small ops a layer, which cost more than a small model's arithmetic): q [T, Hq, D] and
// k, v [T, Hkv, D] (rows of a fused projection: any row stride, contiguous heads), cos and sin [T, D]
// (the half-split convention: x * cos + rotate_half(x) * sin). k (rotated) and v are written into
// cache_k / cache_v [Hkv, C, D] (a slot's layer: any head stride) at positions start..start+T-1; the
// rotated q, times ``scale``, is returned as [Hkv, Hq / Hkv * T, D]: each KV head's query heads stacked,
// as the attention's batched matmuls take them.
at::Tensor rope_write(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cache_k,
                      const at::Tensor& cache_v, int64_t start, const at::Tensor& cos, const at::Tensor& sin,
                      double scale) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3, "rope_write: expected q, k, v [T, H, D]");
  const int64_t T = q.size(0), Hq = q.size(1), D = q.size(2), Hkv = k.size(1);
  TORCH_CHECK(k.size(0) == T && v.size(0) == T && k.size(2) == D && v.sizes() == k.sizes() && Hq % Hkv == 0,
              "rope_write: q, k, v disagree");
  TORCH_CHECK(q.stride(2) == 1 && k.stride(2) == 1 && v.stride(2) == 1 && q.stride(1) == D && k.stride(1) == D &&
              v.stride(1) == D, "rope_write: expected contiguous heads");
  TORCH_CHECK(cache_k.dim() == 3 && cache_k.size(0) == Hkv && cache_k.size(2) == D && cache_k.stride(2) == 1 &&
              cache_k.stride(1) == D && cache_v.sizes() == cache_k.sizes() && cache_v.strides() == cache_k.strides(),
              "rope_write: expected caches [Hkv, C, D]");
  TORCH_CHECK(start >= 0 && start + T <= cache_k.size(1), "rope_write: positions past the cache");
  TORCH_CHECK(cos.dim() == 2 && cos.size(0) == T && cos.size(1) == D && D % 2 == 0, "rope_write: expected cos [T, D]");
  TORCH_CHECK(q.scalar_type() == cache_k.scalar_type() && k.scalar_type() == q.scalar_type() &&
              v.scalar_type() == q.scalar_type(), "rope_write: expected one dtype");
  const int64_t g = Hq / Hkv, half = D / 2;
  at::Tensor out = at::empty({Hkv, g * T, D}, q.options());
  at::Tensor c = cos.contiguous(), sn = sin.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "rope_write", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* cp = c.data_ptr<scalar_t>();
    const scalar_t* sp = sn.data_ptr<scalar_t>();
    auto rotate = [&](const scalar_t* x, int64_t t, acc_t factor, scalar_t* to) {
      const scalar_t* ct = cp + t * D;
      const scalar_t* st = sp + t * D;
      for (int64_t d = 0; d < half; ++d) {
        const acc_t a = x[d], b = x[d + half];
        to[d] = static_cast<scalar_t>((a * acc_t(ct[d]) - b * acc_t(st[d])) * factor);
        to[d + half] = static_cast<scalar_t>((b * acc_t(ct[d + half]) + a * acc_t(st[d + half])) * factor);
      }
    };
    const scalar_t* qp = q.data_ptr<scalar_t>();
    const scalar_t* kp = k.data_ptr<scalar_t>();
    const scalar_t* vp = v.data_ptr<scalar_t>();
    scalar_t* ckp = cache_k.data_ptr<scalar_t>();
    scalar_t* cvp = cache_v.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const int64_t ch = cache_k.stride(0);
    for (int64_t t = 0; t < T; ++t) {
      for (int64_t h = 0; h < Hkv; ++h) {
        rotate(kp + t * k.stride(0) + h * D, t, acc_t(1), ckp + h * ch + (start + t) * D);
        std::memcpy(cvp + h * ch + (start + t) * D, vp + t * v.stride(0) + h * D, D * sizeof(scalar_t));
      }
      for (int64_t h = 0; h < Hq; ++h)  // query head h = kv * g + j goes to row j * T + t of its KV head
        rotate(qp + t * q.stride(0) + h * D, t, acc_t(scale), op + ((h / g) * g * T + (h % g) * T + t) * D);
    }
  });
  return out;
}

// RMSNorm of x [N, H] with weight [H], as transformers' RMSNorm computes it (the mean of squares and the
// scaling in float32, the result rounded to x's dtype, then times the weight). With ``residual``: x += residual
// first, in place (the residual stream), and the norm is of the sum. torch's CPU rms_norm spends ~60 us on a
// bf16 row of 1536 (a composite of converting ops); this is one pass.
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps, const c10::optional<at::Tensor>& residual) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && weight.dim() == 1 && weight.size(0) == x.size(1) &&
              weight.scalar_type() == x.scalar_type(), "rms_norm: expected x [N, H] contiguous and weight [H]");
  const int64_t N = x.size(0), H = x.size(1);
  at::Tensor out = at::empty_like(x);
  at::Tensor res;
  if (residual.has_value()) {
    res = residual->contiguous();
    TORCH_CHECK(res.sizes() == x.sizes() && res.scalar_type() == x.scalar_type(), "rms_norm: residual unlike x");
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* wp = weight.data_ptr<scalar_t>();
    const scalar_t* rp = residual.has_value() ? res.data_ptr<scalar_t>() : nullptr;
    scalar_t* op = out.data_ptr<scalar_t>();
    for (int64_t i = 0; i < N; ++i) {
      scalar_t* row = xp + i * H;
      if (rp) {
        for (int64_t j = 0; j < H; ++j) row[j] = static_cast<scalar_t>(acc_t(row[j]) + acc_t(rp[i * H + j]));
      }
      acc_t squares = 0;
      for (int64_t j = 0; j < H; ++j) squares += acc_t(row[j]) * acc_t(row[j]);
      const acc_t inv = acc_t(1) / std::sqrt(squares / acc_t(H) + acc_t(eps));
      for (int64_t j = 0; j < H; ++j)
        op[i * H + j] = static_cast<scalar_t>(acc_t(wp[j]) * acc_t(static_cast<scalar_t>(acc_t(row[j]) * inv)));
    }
  });
  return out;
}

// Attention of a few queries of one sequence over its cache, after rope_write: ``grouped`` [Hkv, g * T, D]
// (rotated, scaled; row j * T + t is query head kv * g + j of new token t, at position start + t), cache_k /
// cache_v [Hkv, C, D]; token t sees keys 0..start+t. Returns [T, Hq * D] in the cache's dtype. Scores, softmax
// and the weighted sum in float32 (float64 for float64 caches). Two batched matmuls and a softmax cost ~0.15 ms
// of fixed overhead a layer on a CPU for a decode step over a few hundred keys; this runs in a few us there.
#if defined(__AVX512F__)
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const at::BFloat16* p) {
  return _mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}
// exp(x) for x <= 0 (softmax after subtracting the max): 2^n * p(r), |r| <= ln2 / 2, degree-6 polynomial
inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.0f / 720);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

template <typename T>
void attend_row_avx512(const T* q, const T* keys, const T* values, int64_t S, int64_t D, float* scores, T* out) {
  float qf[256];
  for (int64_t d = 0; d < D; ++d) qf[d] = static_cast<float>(q[d]);
  __m512 best = _mm512_set1_ps(-INFINITY);
  for (int64_t s = 0; s < S; ++s) {
    const T* k = keys + s * D;
    __m512 acc = _mm512_mul_ps(_mm512_loadu_ps(qf), load16(k));
    for (int64_t d = 16; d < D; d += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(qf + d), load16(k + d), acc);
    scores[s] = _mm512_reduce_add_ps(acc);
  }
  float top = -INFINITY;
  for (int64_t s = 0; s < S; ++s) top = std::max(top, scores[s]);
  __m512 sum16 = _mm512_setzero_ps();
  int64_t s = 0;
  for (; s + 16 <= S; s += 16) {
    __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(scores + s), _mm512_set1_ps(top)));
    _mm512_storeu_ps(scores + s, e);
    sum16 = _mm512_add_ps(sum16, e);
  }
  float sum = _mm512_reduce_add_ps(sum16);
  for (; s < S; ++s) {
    scores[s] = std::exp(scores[s] - top);
    sum += scores[s];
  }
  (void)best;
  __m512 acc[16];
  const int64_t chunks = D / 16;
  for (int64_t c = 0; c < chunks; ++c) acc[c] = _mm512_setzero_ps();
  for (int64_t t = 0; t < S; ++t) {
    const __m512 w = _mm512_set1_ps(scores[t]);
    const T* v = values + t * D;
    for (int64_t c = 0; c < chunks; ++c) acc[c] = _mm512_fmadd_ps(w, load16(v + c * 16), acc[c]);
  }
  const float inv = 1.f / sum;
  for (int64_t c = 0; c < chunks; ++c) {
    alignas(64) float tmp[16];
    _mm512_store_ps(tmp, _mm512_mul_ps(acc[c], _mm512_set1_ps(inv)));
    for (int i = 0; i < 16; ++i) out[c * 16 + i] = static_cast<T>(tmp[i]);
  }
}
#endif

#if defined(QMM_AVX2) && !defined(__AVX512F__)
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const at::BFloat16* p) {
  return _mm256_castsi256_ps(
      _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
}
inline float sum8(__m256 v) {
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  return _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
}
// scores[s] = exp(scores[s] - max) for s < S, returning their sum
inline float exp_and_sum_avx2(float* scores, int64_t S) {
  float top = -INFINITY;
  for (int64_t s = 0; s < S; ++s) top = std::max(top, scores[s]);
  __m256 sums = _mm256_setzero_ps();
  int64_t s = 0;
  for (; s + 8 <= S; s += 8) {
    const __m256 e = exp_cephes(_mm256_sub_ps(_mm256_loadu_ps(scores + s), _mm256_set1_ps(top)));
    _mm256_storeu_ps(scores + s, e);
    sums = _mm256_add_ps(sums, e);
  }
  float sum = sum8(sums);
  for (; s < S; ++s) {
    scores[s] = std::exp(scores[s] - top);
    sum += scores[s];
  }
  return sum;
}

// attend_row_avx512 on 8 lanes (AVX2 without AVX512: the scalar row's strict float order keeps the compiler
// from vectorizing its dot products, ~20x slower; its exp is the epilogue's exp_cephes), for R query rows over
// the same keys (the query heads of one kv head, one token; D % 16 == 0): each key and value read once for all
// R rows rather than once a row (they come from L2: a few hundred keys of a head are 64-128 KB; ~2.5x faster
// for the 1.5B's 6 heads a kv head). A row's arithmetic does not depend on R: each dot product in two 8-lane
// sums (inputs 16j..16j+7, 16j+8..16j+15) added across lanes at the end, each output a sum over the keys in
// their order. ``scores`` [R][S].
template <int R, typename T>
void attend_rows_avx2(const T* const* q, const T* keys, const T* values, int64_t S, int64_t D, float* scores,
                      T* const* out) {
  alignas(32) float qf[R][256];
  for (int r = 0; r < R; ++r)
    for (int64_t d = 0; d < D; ++d) qf[r][d] = static_cast<float>(q[r][d]);
  for (int64_t s = 0; s < S; ++s) {
    const T* k = keys + s * D;
    __m256 acc0[R], acc1[R];
    const __m256 k0 = load8(k), k1 = load8(k + 8);
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r)
      acc0[r] = _mm256_mul_ps(_mm256_load_ps(qf[r]), k0), acc1[r] = _mm256_mul_ps(_mm256_load_ps(qf[r] + 8), k1);
    for (int64_t d = 16; d < D; d += 16) {
      const __m256 kd0 = load8(k + d), kd1 = load8(k + d + 8);
#pragma GCC unroll 6
      for (int r = 0; r < R; ++r) {
        acc0[r] = _mm256_fmadd_ps(_mm256_load_ps(qf[r] + d), kd0, acc0[r]);
        acc1[r] = _mm256_fmadd_ps(_mm256_load_ps(qf[r] + d + 8), kd1, acc1[r]);
      }
    }
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r) scores[r * S + s] = sum8(_mm256_add_ps(acc0[r], acc1[r]));
  }
  float inv[R];
  for (int r = 0; r < R; ++r) inv[r] = 1.f / exp_and_sum_avx2(scores + r * S, S);
  for (int64_t c = 0; c < D; c += 16) {
    __m256 acc[R][2];
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    for (int64_t t = 0; t < S; ++t) {
      const __m256 v0 = load8(values + t * D + c), v1 = load8(values + t * D + c + 8);
#pragma GCC unroll 6
      for (int r = 0; r < R; ++r) {
        const __m256 w = _mm256_set1_ps(scores[r * S + t]);
        acc[r][0] = _mm256_fmadd_ps(w, v0, acc[r][0]), acc[r][1] = _mm256_fmadd_ps(w, v1, acc[r][1]);
      }
    }
    for (int r = 0; r < R; ++r)
      for (int i = 0; i < 2; ++i) {
        alignas(32) float tmp[8];
        _mm256_store_ps(tmp, _mm256_mul_ps(acc[r][i], _mm256_set1_ps(inv[r])));
        for (int j = 0; j < 8; ++j) out[r][c + 8 * i + j] = static_cast<T>(tmp[j]);
      }
  }
}

// attend_short on AVX2 for float and bf16 with D % 16 == 0: one token's g query rows of a kv head at a time, in
// register blocks of at most 6 (balanced); false (nothing done) for other dtypes and sizes
template <typename T>
bool attend_grouped_avx2(const T* qp, const T* kp, const T* vp, T* op, int64_t Hkv, int64_t g, int64_t T_, int64_t D,
                         int64_t ch, int64_t start) {
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, at::BFloat16>) {
    if (D % 16 != 0) return false;
    constexpr int MAX_ROWS = 6;
    const int64_t rows = g * T_, chunks = (g + MAX_ROWS - 1) / MAX_ROWS;
    at::parallel_for(0, Hkv * T_, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> scores(MAX_ROWS * (start + T_));
      for (int64_t i = begin; i < end; ++i) {
        const int64_t h = i / T_, t = i % T_, S = start + t + 1;
        for (int64_t c = 0, j0 = 0; c < chunks; ++c) {
          const int64_t n = (g - j0) / (chunks - c);
          const T* q[MAX_ROWS];
          T* o[MAX_ROWS];
          for (int64_t j = 0; j < n; ++j) {
            q[j] = qp + (h * rows + (j0 + j) * T_ + t) * D;
            o[j] = op + t * Hkv * g * D + (h * g + j0 + j) * D;
          }
          dispatch_rows<MAX_ROWS>(n, [&](auto R) {
            attend_rows_avx2<decltype(R)::value>(q, kp + h * ch, vp + h * ch, S, D, scores.data(), o);
          });
          j0 += n;
        }
      }
    });
    return true;
  } else {
    return false;
  }
}
#endif

template <typename T>
void attend_row_scalar(const T* q, const T* keys, const T* values, int64_t S, int64_t D, at::opmath_type<T>* scores,
                       T* out) {
  using acc_t = at::opmath_type<T>;
  acc_t top = -INFINITY;
  for (int64_t s = 0; s < S; ++s) {
    acc_t dot = 0;
    for (int64_t d = 0; d < D; ++d) dot += acc_t(q[d]) * acc_t(keys[s * D + d]);
    scores[s] = dot;
    top = std::max(top, dot);
  }
  acc_t sum = 0;
  for (int64_t s = 0; s < S; ++s) sum += (scores[s] = std::exp(scores[s] - top));
  for (int64_t d = 0; d < D; ++d) {
    acc_t total = 0;
    for (int64_t s = 0; s < S; ++s) total += scores[s] * acc_t(values[s * D + d]);
    out[d] = static_cast<T>(total / sum);
  }
}

at::Tensor attend_short(const at::Tensor& grouped, const at::Tensor& cache_k, const at::Tensor& cache_v,
                        int64_t start, int64_t T) {
  TORCH_CHECK(grouped.dim() == 3 && grouped.is_contiguous(), "attend_short: expected contiguous grouped queries");
  const int64_t Hkv = grouped.size(0), rows = grouped.size(1), D = grouped.size(2), g = rows / T;
  TORCH_CHECK(rows % T == 0 && cache_k.dim() == 3 && cache_k.size(0) == Hkv && cache_k.size(2) == D &&
              cache_k.stride(2) == 1 && cache_k.stride(1) == D && cache_v.sizes() == cache_k.sizes() &&
              cache_v.strides() == cache_k.strides() && start + T <= cache_k.size(1) && D <= 256,
              "attend_short: expected caches [Hkv, C, D] holding start + T positions");
  TORCH_CHECK(cache_k.scalar_type() == grouped.scalar_type(), "attend_short: expected one dtype");
  at::Tensor out = at::empty({T, Hkv * g * D}, grouped.options());
  const int64_t ch = cache_k.stride(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grouped.scalar_type(), "attend_short", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* qp = grouped.data_ptr<scalar_t>();
    const scalar_t* kp = cache_k.data_ptr<scalar_t>();
    const scalar_t* vp = cache_v.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
#if defined(QMM_AVX2) && !defined(__AVX512F__)
    if (attend_grouped_avx2(qp, kp, vp, op, Hkv, g, T, D, ch, start)) return;
#endif
    at::parallel_for(0, Hkv * rows, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> scores(start + T);
      for (int64_t i = begin; i < end; ++i) {
        const int64_t h = i / rows, r = i % rows, j = r / T, t = r % T;
        const scalar_t* q = qp + i * D;
        scalar_t* o = op + t * Hkv * g * D + (h * g + j) * D;
        const int64_t S = start + t + 1;
#if defined(__AVX512F__)
        if constexpr (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, at::BFloat16>) {
          if (D % 16 == 0) {
            attend_row_avx512(q, kp + h * ch, vp + h * ch, S, D, reinterpret_cast<float*>(scores.data()), o);
            continue;
          }
        }
#endif
        attend_row_scalar(q, kp + h * ch, vp + h * ch, S, D, scores.data(), o);
      }
    });
  });
  return out;
}

std::string qmm_isa(const at::Tensor& x, bool int8) {
  switch (isa_for(x.scalar_type(), int8, false)) {
    case Isa::kAvx512Bf16: return "avx512bf16";
    case Isa::kAvx512Vnni: return "avx512vnni";
    case Isa::kAvx2: return "avx2";
    default: return "scalar";
  }
}


// Rejection sampling's draws (core/verify.py _rejection_sample), one pass a row instead of ~20 ops over [K + 1, V]:
// the block's token ids ``at`` [K, 1], the target ``p`` [K + 1, V] float32, the proposal ``q`` (with ``q_ids``
// [K, W]: sparse rows of probabilities [K, W]; without: dense [K, V]; none: one-hot on the block) and ``u``
// [K + 1] float64. Row i < K draws its recovered token from the residual max(0, p - q) (p itself where that
// is all zero), row K its bonus token from p, each by inverse CDF at u: the first id whose running sum, in
// float64 in id order, exceeds u times the row's total (clamped to V - 1). That is what the torch ops compute
// (cumsum in order, searchsorted right), so the tokens are the same, bit for bit. Returns the tokens [K + 1],
// p(d) and q(d) of the block tokens [K] each (q(d) empty for a one-hot proposal).
std::tuple<at::Tensor, at::Tensor, at::Tensor> residual_draws(const at::Tensor& p, const at::Tensor& at_ids,
                                                              const c10::optional<at::Tensor>& q_in,
                                                              const c10::optional<at::Tensor>& q_ids_in,
                                                              const at::Tensor& u_in) {
  TORCH_CHECK(p.dim() == 2 && p.scalar_type() == at::kFloat, "residual_draws: expected p [K + 1, V] float32");
  const int64_t K = p.size(0) - 1, V = p.size(1);
  TORCH_CHECK(at_ids.numel() == K && at_ids.scalar_type() == at::kLong, "residual_draws: expected at [K, 1] long");
  TORCH_CHECK(u_in.numel() == K + 1, "residual_draws: expected u [K + 1]");
  const bool sparse = q_ids_in.has_value(), one_hot = !q_in.has_value();
  at::Tensor pc = p.contiguous(), ids = at_ids.contiguous(), u = u_in.to(at::kDouble).contiguous(), q, q_ids;
  int64_t W = 0;
  if (!one_hot) {
    q = q_in->to(at::kFloat).contiguous();
    TORCH_CHECK(q.dim() == 2 && q.size(0) == K, "residual_draws: expected q with K rows");
    if (sparse) {
      q_ids = q_ids_in->contiguous();
      TORCH_CHECK(q_ids.sizes() == q.sizes() && q_ids.scalar_type() == at::kLong, "residual_draws: q_ids unlike q");
      W = q.size(1);
    } else {
      TORCH_CHECK(q.size(1) == V, "residual_draws: expected a dense q [K, V]");
    }
  }
  at::Tensor tokens = at::empty({K + 1}, at::kLong), p_tok = at::empty({K}, at::kFloat);
  at::Tensor q_tok = at::empty({one_hot ? 0 : K}, at::kFloat);
  const float* pp = pc.data_ptr<float>();
  const int64_t* dp = ids.data_ptr<int64_t>();
  const double* up = u.data_ptr<double>();
  const float* qp = one_hot ? nullptr : q.data_ptr<float>();
  const int64_t* qip = sparse ? q_ids.data_ptr<int64_t>() : nullptr;
  int64_t* tp = tokens.data_ptr<int64_t>();
  float* ptp = p_tok.data_ptr<float>();
  float* qtp = q_tok.data_ptr<float>();
  for (int64_t i = 0; i < K; ++i) {
    TORCH_CHECK(0 <= dp[i] && dp[i] < V, "residual_draws: a block token outside the vocabulary");
    for (int64_t j = 0; j < W; ++j)
      TORCH_CHECK(0 <= qip[i * W + j] && qip[i * W + j] < V, "residual_draws: a proposal id outside the vocabulary");
  }
  auto sum = [V](const float* w) {
    double total = 0.0;
    for (int64_t v = 0; v < V; ++v) total += static_cast<double>(w[v]);
    return total;
  };
  // rows in parallel only where a row is long enough to pay for waking the threads
  at::parallel_for(0, K + 1, V >= 16384 ? 1 : K + 1, [&](int64_t begin, int64_t end) {
    std::vector<float> residual(V);
    for (int64_t i = begin; i < end; ++i) {
      const float* row = pp + i * V;
      const float* weights = row;  // the bonus row draws from p
      double total;
      if (i < K) {
        const int64_t d = dp[i];
        ptp[i] = row[d];
        if (one_hot) {
          std::memcpy(residual.data(), row, V * sizeof(float));
          residual[d] = 0.0f;
        } else if (sparse) {
          std::memcpy(residual.data(), row, V * sizeof(float));  // p - 0 where q has no mass
          const float* qr = qp + i * W;
          const int64_t* qi = qip + i * W;
          float qd = 0.0f;
          for (int64_t j = 0; j < W; ++j) {
            residual[qi[j]] = std::max(row[qi[j]] - qr[j], 0.0f);
            if (qi[j] == d) qd = qr[j];
          }
          qtp[i] = qd;
        } else {
          const float* qr = qp + i * V;
          for (int64_t v = 0; v < V; ++v) residual[v] = std::max(row[v] - qr[v], 0.0f);
          qtp[i] = qr[d];
        }
        total = sum(residual.data());
        if (total > 0.0) {
          weights = residual.data();
        } else {  // p == q up to rounding: recover from p itself
          total = sum(row);
        }
      } else {
        total = sum(row);
      }
      const double target = up[i] * total;
      double running = 0.0;
      int64_t pick = V - 1;
      for (int64_t v = 0; v < V; ++v) {
        running += static_cast<double>(weights[v]);
        if (running > target) {
          pick = v;
          break;
        }
      }
      tp[i] = pick;
    }
  });
  return {tokens, p_tok, q_tok};
}

}  // namespace

// A pass of decoder layers over packed rows, each layer what ``layers.LayerPlan`` computes with packed
// projections and the fused CPU ops (the input norm adding the previous layer's output into the residual
// stream, the fused q / k / v projection, rotary embedding and cache writes, attention of each row over its
// cache, o, the post-attention norm adding that, SwiGLU, down): the same ops in the same order, without Python
// between them (~40 us a layer at one row: ~15 % of the 0.5B drafter's step, ~8 % of the 1.5B's).
// ``weights``: per layer, LAYER_TENSORS of them (input and post-attention norm weights; q/k/v codes, meta,
// bias or an empty tensor; o codes, meta; SwiGLU codes, meta; down codes, meta; v's codes, meta, bias where v is
// a projection of its own, else empty); ``dims``: per layer, LAYER_DIMS ints (n, bits, group, int8 of q/k/v,
// o, SwiGLU and down; the widths of q and k; n, bits, group, int8 of a projection of v's own, n 0 if none:
// GGUF files give some layers' v another format than q and k). ``keys`` and
// ``values``: layer l's cache of row b at l * rows + b ([Hkv, C, D]). Returns the residual stream and the last
// layer's output (the final norm adds it).
constexpr int LAYER_TENSORS = 14, LAYER_DIMS = 22;
// where a layer's tensors start (a projection: codes, meta, then its bias for q/k/v and v) and its dims
enum LayerTensor { kInputNorm = 0, kPostNorm = 1, kQkv = 2, kO = 5, kSwiGLU = 7, kDown = 9, kV = 11 };
enum LayerDim { dQkv = 0, dO = 4, dSwiGLU = 8, dDown = 12, dWidths = 16, dV = 18 };

std::tuple<at::Tensor, at::Tensor> decoder_layers(const at::Tensor& hidden_in, at::TensorList weights,
                                                  at::IntArrayRef dims, at::TensorList keys, at::TensorList values,
                                                  at::IntArrayRef starts, at::IntArrayRef lengths,
                                                  const at::Tensor& cos, const at::Tensor& sin, double scale,
                                                  double eps, int64_t head_dim) {
  const int64_t layers = static_cast<int64_t>(weights.size()) / LAYER_TENSORS, rows = starts.size();
  TORCH_CHECK(static_cast<int64_t>(weights.size()) == layers * LAYER_TENSORS &&
              static_cast<int64_t>(dims.size()) == layers * LAYER_DIMS, "decoder_layers: expected ", LAYER_TENSORS,
              " tensors and ", LAYER_DIMS, " dims a layer");
  TORCH_CHECK(static_cast<int64_t>(lengths.size()) == rows && static_cast<int64_t>(keys.size()) == layers * rows &&
              static_cast<int64_t>(values.size()) == layers * rows, "decoder_layers: expected a cache per layer and row");
  at::Tensor hidden = hidden_in;
  at::Tensor out;
  const int64_t n = hidden.size(0);
  for (int64_t l = 0; l < layers; ++l) {
    const at::Tensor* w = weights.data() + l * LAYER_TENSORS;
    const int64_t* d = dims.data() + l * LAYER_DIMS;
    auto project = [&](const at::Tensor& x, LayerTensor first, LayerDim f, bool swiglu) {
      c10::optional<at::Tensor> bias;
      if ((first == kQkv || first == kV) && w[first + 2].numel() > 0) bias = w[first + 2];
      return run(x, w[first], w[first + 1], d[f], d[f + 1], d[f + 2], bias, swiglu, d[f + 3] != 0, false);
    };
    const at::Tensor x = rms_norm(hidden, w[kInputNorm], eps,
                                  l == 0 ? c10::optional<at::Tensor>() : c10::optional<at::Tensor>(out));
    const at::Tensor qkv = project(x, kQkv, dQkv, false);
    const int64_t qw = d[dWidths], kw = d[dWidths + 1];
    const at::Tensor q = qkv.narrow(1, 0, qw).view({n, -1, head_dim});
    const at::Tensor k = qkv.narrow(1, qw, kw).view({n, -1, head_dim});
    const at::Tensor v = (d[dV] > 0 ? project(x, kV, dV, false) : qkv.narrow(1, qw + kw, d[dQkv] - qw - kw))
                             .view({n, -1, head_dim});
    std::vector<at::Tensor> attended;
    for (int64_t b = 0, off = 0; b < rows; off += lengths[b], ++b) {
      const int64_t t = lengths[b];
      const at::Tensor& ck = keys[l * rows + b];
      const at::Tensor& cv = values[l * rows + b];
      const at::Tensor grouped = rope_write(q.narrow(0, off, t), k.narrow(0, off, t), v.narrow(0, off, t), ck, cv,
                                            starts[b], cos.narrow(0, off, t), sin.narrow(0, off, t), scale);
      attended.push_back(attend_short(grouped, ck, cv, starts[b], t));
    }
    const at::Tensor o = project(rows == 1 ? attended[0] : at::cat(attended), kO, dO, false);
    const at::Tensor y = rms_norm(hidden, w[kPostNorm], eps, o);
    out = project(project(y, kSwiGLU, dSwiGLU, true), kDown, dDown, false);
  }
  return {hidden, out};
}

TORCH_LIBRARY(via_sd, m) {
  m.def("qmm(Tensor x, Tensor codes, Tensor meta, int n, int bits, int group, Tensor? bias=None, "
        "bool swiglu=False, bool int8=False) -> Tensor");
  m.def("qmm_reference(Tensor x, Tensor codes, Tensor meta, int n, int bits, int group, Tensor? bias=None, "
        "bool swiglu=False, bool int8=False) -> Tensor");
  m.def("qmm_quantize(Tensor x, int group, bool reference=False, bool kquant=False) -> (Tensor, Tensor, Tensor)");
  m.def("qmm_isa(Tensor x, bool int8=False) -> str");
  m.def("attend_short(Tensor grouped, Tensor cache_k, Tensor cache_v, int start, int T) -> Tensor");
  m.def("rms_norm(Tensor(a!) x, Tensor weight, float eps, Tensor? residual=None) -> Tensor");
  m.def("decoder_layers(Tensor(a!) hidden, Tensor[] weights, int[] dims, Tensor(b!)[] keys, Tensor(c!)[] values, "
        "int[] starts, int[] lengths, Tensor cos, Tensor sin, float scale, float eps, int head_dim) -> (Tensor, Tensor)");
  m.def("residual_draws(Tensor p, Tensor at, Tensor? q, Tensor? q_ids, Tensor u) -> (Tensor, Tensor, Tensor)");
  m.def("rope_write(Tensor q, Tensor k, Tensor v, Tensor(a!) cache_k, Tensor(b!) cache_v, int start, Tensor cos, "
        "Tensor sin, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(via_sd, CPU, m) {
  m.impl("qmm", &qmm);
  m.impl("qmm_reference", &qmm_reference);
  m.impl("qmm_isa", &qmm_isa);
  m.impl("qmm_quantize", &qmm_quantize);
  m.impl("rope_write", &rope_write);
  m.impl("rms_norm", &rms_norm);
  m.impl("residual_draws", &residual_draws);
  m.impl("attend_short", &attend_short);
  m.impl("decoder_layers", &decoder_layers);
}

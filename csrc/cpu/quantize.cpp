// Float32 -> GGUF weight quantizers, CPU (SPEC §1). Used to build test weights and to quantize F32/F16
// weights at load time, so the bytes must decode with any GGUF reader exactly as llama.cpp's would.
//
// - Q4_0 / Q8_0: bit-exact with gguf-py's `gguf.quants.quantize` (itself bit-exact with ggml's
//   quantize_row_q4_0_ref / q8_0_ref). Every step is the same fp32 operation in the same order.
// - Q4_K / Q6_K: ggml's reference algorithms (the ones llama.cpp runs without an importance
//   matrix): a per-sub-block search for the scale (and min), then those scales quantized against a
//   super-block fp16 scale, then the values re-quantized with the scales actually stored.
//
// Thread safety: no static mutable state; every scratch array lives on the caller's stack.
#include <algorithm>
#include <cmath>
#include <cstring>

#include "ggfuse/kernels_cpu.h"

// The Q4_0 rounding is trunc(fl(x*id) + 8.5f): a fused multiply-add would skip the rounding of the
// product and change the nibble on rare ties, breaking bit-exactness with gguf-py (numpy never fuses).
// Compilers may contract across statements (GCC's default outside strict ISO modes, clang within an
// expression), so contraction is switched off for this whole file rather than trusted to flags.
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

namespace ggfuse {
namespace cpu {
namespace {

// ggml's nearest_int: round to nearest, ties to even. Adding 1.5 * 2^23 leaves an integer-valued float
// (the fp32 add itself does the rounding), exact for |v| < 2^22. The clamp keeps inf/nan inputs
// (meaningless for quantization anyway) away from an undefined float->int conversion; fmax/fmin
// return the non-nan operand.
inline int round_nearest_even(float v) {
  v = std::fmin(std::fmax(v, -4194303.0f), 4194303.0f);
  const float shifted = v + 12582912.0f;
  return static_cast<int>(shifted) - 12582912;
}

// ---------------------------------------------------------------------------------------------
// Q4_0: d = m / -8 where m is the value of largest magnitude (its sign kept, so m lands exactly on
// level -8 and the asymmetric range -8..7 covers the other side up to 7/8 of |m|).
void quantize_block_q4_0(const float* x, BlockQ4_0* out) {
  // First index of the largest |x| (strict >, as numpy's argmax and ggml both do). Taking the value
  // at that index (rather than starting from +0) matters for an all -0.0 block: gguf-py then stores
  // d = +0.0 and this matches it.
  int imax = 0;
  float amax = std::fabs(x[0]);
  for (int j = 1; j < kQK; ++j) {
    const float a = std::fabs(x[j]);
    if (a > amax) {
      amax = a;
      imax = j;
    }
  }
  const float d = x[imax] / -8.0f;
  const float id = d != 0.0f ? 1.0f / d : 0.0f;
  out->d = float_to_fp16(d);
  for (int j = 0; j < kQK / 2; ++j) {
    uint8_t q[2];
    for (int h = 0; h < 2; ++h) {
      const float scaled = x[j + h * kQK / 2] * id;  // rounded to fp32 before the add (see pragma)
      // trunc(scaled + 8.5) rounds half away from zero around the -8 offset; the sum is >= 0.5 for
      // finite input, and clamping to [0, 15] first gives the same integer as gguf-py's
      // trunc-then-clip(0, 15) without an out-of-range conversion.
      const float t = std::fmin(std::fmax(scaled + 8.5f, 0.0f), 15.0f);
      q[h] = static_cast<uint8_t>(t);  // truncates toward zero
    }
    // Low nibbles hold the first 16 values, high nibbles the last 16 (not interleaved).
    out->qs[j] = static_cast<uint8_t>(q[0] | (q[1] << 4));
  }
}

// ---------------------------------------------------------------------------------------------
// Q8_0: d = amax / 127, q = roundf(x * (1/d)). Multiplying by the fp32 reciprocal (not dividing by d)
// is what ggml and gguf-py do, and the two differ on some values.
void quantize_block_q8_0(const float* x, BlockQ8_0* out) {
  float amax = 0.0f;
  for (int j = 0; j < kQK; ++j) amax = std::fmax(amax, std::fabs(x[j]));
  const float d = amax / 127.0f;
  const float id = d != 0.0f ? 1.0f / d : 0.0f;
  out->d = float_to_fp16(d);
  for (int j = 0; j < kQK; ++j) {
    // std::round is half away from zero, like gguf-py's np_roundf and C's roundf.
    const float q = std::round(std::fmin(std::fmax(x[j] * id, -127.0f), 127.0f));
    out->qs[j] = static_cast<int8_t>(q);
  }
}

// ---------------------------------------------------------------------------------------------
// ggml's make_qkx2_quants: fit x ~ scale * L + min with L in 0..nmax and min <= 0, minimizing the
// weighted squared error. The start is the plain min/max grid; then nstep+1 grids with slightly
// different step counts (nmax + rmin + rdelta*is levels across [min, max]) are tried, and for each
// assignment L the optimal (scale, min) is solved in closed form (weighted least squares), keeping the
// best. Returns the scale; *neg_min gets -min (>= 0), which is what Q4_K stores.
float fit_scale_min(int n, int nmax, const float* x, const float* w, uint8_t* L, float* neg_min,
                    float rmin, float rdelta, int nstep) {
  float lo = x[0];
  float hi = x[0];
  float sum_w = w[0];
  float sum_x = sum_w * x[0];
  for (int i = 1; i < n; ++i) {
    lo = std::min(lo, x[i]);
    hi = std::max(hi, x[i]);
    sum_w += w[i];
    sum_x += w[i] * x[i];
  }
  // The format subtracts a non-negative dmin*m, so the offset can only move the grid down: an
  // all-positive sub-block keeps min = 0.
  if (lo > 0.0f) lo = 0.0f;
  if (hi == lo) {
    for (int i = 0; i < n; ++i) L[i] = 0;
    *neg_min = -lo;
    return 0.0f;
  }
  float min = lo;
  float iscale = nmax / (hi - lo);
  float scale = 1.0f / iscale;
  float best_err = 0.0f;
  for (int i = 0; i < n; ++i) {
    const int l = std::clamp(round_nearest_even(iscale * (x[i] - min)), 0, nmax);
    L[i] = static_cast<uint8_t>(l);
    const float diff = scale * l + min - x[i];
    best_err += w[i] * (diff * diff);
  }
  uint8_t trial[32];  // n <= 32 for every caller
  for (int is = 0; is <= nstep; ++is) {
    // As in ggml, the trial grids start from the best offset found so far (min, which moves when
    // a trial wins), not from the sub-block minimum.
    iscale = (rmin + rdelta * is + nmax) / (hi - min);
    float sum_l = 0.0f, sum_l2 = 0.0f, sum_xl = 0.0f;
    for (int i = 0; i < n; ++i) {
      const int l = std::clamp(round_nearest_even(iscale * (x[i] - min)), 0, nmax);
      trial[i] = static_cast<uint8_t>(l);
      sum_l += w[i] * l;
      sum_l2 += w[i] * l * l;
      sum_xl += w[i] * l * x[i];
    }
    // Normal equations of min over (s, m) of sum w (s*l + m - x)^2; D is their determinant.
    const float D = sum_w * sum_l2 - sum_l * sum_l;
    if (D > 0.0f) {
      float this_scale = (sum_w * sum_xl - sum_x * sum_l) / D;
      float this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D;
      if (this_min > 0.0f) {
        // A positive offset is not representable: refit the scale alone with the offset at 0.
        this_min = 0.0f;
        this_scale = sum_xl / sum_l2;
      }
      float err = 0.0f;
      for (int i = 0; i < n; ++i) {
        const float diff = this_scale * trial[i] + this_min - x[i];
        err += w[i] * (diff * diff);
      }
      if (err < best_err) {
        std::memcpy(L, trial, n);
        best_err = err;
        scale = this_scale;
        min = this_min;
      }
    }
  }
  *neg_min = -min;
  return scale;
}

// Q4_K: 8 sub-blocks of 32 values, each x ~ d*sc*q - dmin*m with q in 0..15 and 6-bit sc, m.
void quantize_block_q4_k(const float* x, BlockQ4_K* out) {
  constexpr int kSub = kQK_K / 32;
  uint8_t L[kQK_K];
  float scales[kSub];
  float mins[kSub];
  float max_scale = 0.0f;  // scales and mins are both >= 0
  float max_min = 0.0f;
  for (int j = 0; j < kSub; ++j) {
    const float* xs = x + 32 * j;
    // ggml's weighting: the RMS of the sub-block plus |x|, so large values count more but small ones
    // are not ignored.
    float sum_x2 = 0.0f;
    for (int l = 0; l < 32; ++l) sum_x2 += xs[l] * xs[l];
    const float av_x = std::sqrt(sum_x2 / 32.0f);
    float w[32];
    for (int l = 0; l < 32; ++l) w[l] = av_x + std::fabs(xs[l]);
    scales[j] = fit_scale_min(32, 15, xs, w, L + 32 * j, &mins[j], -1.0f, 0.1f, 20);
    if (scales[j] > max_scale) max_scale = scales[j];
    if (mins[j] > max_min) max_min = mins[j];
  }

  // Quantize the 8 scales and 8 mins to 6 bits against the largest of each.
  const float inv_scale = max_scale > 0.0f ? 63.0f / max_scale : 0.0f;
  const float inv_min = max_min > 0.0f ? 63.0f / max_min : 0.0f;
  uint8_t ls[kSub];
  uint8_t lm[kSub];
  for (int j = 0; j < kSub; ++j) {
    ls[j] = static_cast<uint8_t>(std::clamp(round_nearest_even(inv_scale * scales[j]), 0, 63));
    lm[j] = static_cast<uint8_t>(std::clamp(round_nearest_even(inv_min * mins[j]), 0, 63));
  }
  // Packing of SPEC §1: bytes 0..3 hold sc[0..3] plus the top 2 bits of sc[4..7]; bytes 4..7 hold
  // m[0..3] plus the top 2 bits of m[4..7]; bytes 8..11 hold the low nibbles of sc[4..7] | m[4..7].
  for (int j = 0; j < 4; ++j) {
    out->scales[j] = static_cast<uint8_t>(ls[j] | ((ls[j + 4] >> 4) << 6));
    out->scales[j + 4] = static_cast<uint8_t>(lm[j] | ((lm[j + 4] >> 4) << 6));
    out->scales[j + 8] = static_cast<uint8_t>((ls[j + 4] & 15) | ((lm[j + 4] & 15) << 4));
  }
  out->d = float_to_fp16(max_scale / 63.0f);
  out->dmin = float_to_fp16(max_min / 63.0f);

  // Re-quantize the values with the scales as a decoder will see them (fp16 d times the 6-bit
  // integers), so the rounding of the scales is compensated where possible.
  const float d_all = fp16_to_float(out->d);
  const float dmin_all = fp16_to_float(out->dmin);
  for (int j = 0; j < kSub; ++j) {
    int sc, m;
    k_scale_min(out->scales, j, &sc, &m);
    const float d = d_all * sc;
    // With a zero scale every value decodes to -dmin*m whatever q is; ggml then keeps the search's
    // levels, and so do we (same bytes for the same input).
    if (d == 0.0f) continue;
    const float dm = dmin_all * m;
    for (int l = 0; l < 32; ++l) {
      L[32 * j + l] =
          static_cast<uint8_t>(std::clamp(round_nearest_even((x[32 * j + l] + dm) / d), 0, 15));
    }
  }
  // Byte 32p+l: low nibble is value 64p+l, high nibble value 64p+32+l.
  for (int p = 0; p < 4; ++p) {
    for (int l = 0; l < 32; ++l) {
      out->qs[32 * p + l] = static_cast<uint8_t>(L[64 * p + l] | (L[64 * p + 32 + l] << 4));
    }
  }
}

// ---------------------------------------------------------------------------------------------
// ggml's make_qx_quants with rmse_type 1 (weights x^2, no external weights): symmetric levels
// -nmax..nmax-1 with the value of largest magnitude on level -nmax, then 18 nearby step counts
// (nmax +- 0.1..0.9) are tried, each with its least-squares scale sum(w x l)/sum(w l^2), keeping the
// one with the largest sumlx^2/suml2 (equivalently the smallest weighted error). L gets l + nmax.
float fit_scale_symmetric(int n, int nmax, const float* x, uint8_t* L) {
  float max = 0.0f;
  float amax = 0.0f;
  for (int i = 0; i < n; ++i) {
    const float a = std::fabs(x[i]);
    if (a > amax) {
      amax = a;
      max = x[i];
    }
  }
  if (amax < 1e-15f) {  // ggml's GROUP_MAX_EPS: treat as all zero
    for (int i = 0; i < n; ++i) L[i] = 0;
    return 0.0f;
  }
  float iscale = -nmax / max;
  float sumlx = 0.0f;
  float suml2 = 0.0f;
  for (int i = 0; i < n; ++i) {
    const int l = std::clamp(round_nearest_even(iscale * x[i]), -nmax, nmax - 1);
    L[i] = static_cast<uint8_t>(l + nmax);
    const float w = x[i] * x[i];
    sumlx += w * x[i] * l;
    suml2 += w * l * l;
  }
  float scale = suml2 != 0.0f ? sumlx / suml2 : 0.0f;
  float best = scale * sumlx;
  for (int is = -9; is <= 9; ++is) {
    if (is == 0) continue;
    iscale = -(nmax + 0.1f * is) / max;
    sumlx = 0.0f;
    suml2 = 0.0f;
    for (int i = 0; i < n; ++i) {
      const int l = std::clamp(round_nearest_even(iscale * x[i]), -nmax, nmax - 1);
      const float w = x[i] * x[i];
      sumlx += w * x[i] * l;
      suml2 += w * l * l;
    }
    // Cross-multiplied form of sumlx^2/suml2 > best, the error reduction of the LS scale.
    if (suml2 > 0.0f && sumlx * sumlx > best * suml2) {
      for (int i = 0; i < n; ++i) {
        const int l = std::clamp(round_nearest_even(iscale * x[i]), -nmax, nmax - 1);
        L[i] = static_cast<uint8_t>(l + nmax);
      }
      scale = sumlx / suml2;
      best = scale * sumlx;
    }
  }
  return scale;
}

// Q6_K: 16 sub-blocks of 16 values, x ~ d * sc * (q - 32) with q in 0..63 and int8 sc.
void quantize_block_q6_k(const float* x, BlockQ6_K* out) {
  constexpr int kSub = kQK_K / 16;
  uint8_t L[kQK_K];  // level + 32, 0..63
  float scales[kSub];
  float max_scale = 0.0f;  // signed: the scale of largest magnitude
  float max_abs_scale = 0.0f;
  for (int ib = 0; ib < kSub; ++ib) {
    scales[ib] = fit_scale_symmetric(16, 32, x + 16 * ib, L + 16 * ib);
    const float a = std::fabs(scales[ib]);
    if (a > max_abs_scale) {
      max_abs_scale = a;
      max_scale = scales[ib];
    }
  }
  if (max_abs_scale < 1e-15f) {
    std::memset(out, 0, sizeof(BlockQ6_K));  // an all-zero block: every byte 0, d = +0
    return;
  }
  // Scales go to int8 with the largest one on -128 (using the full negative range, one more step
  // than +127); any other scale of the opposite sign is capped at 127.
  const float iscale = -128.0f / max_scale;
  out->d = float_to_fp16(1.0f / iscale);
  for (int ib = 0; ib < kSub; ++ib) {
    out->scales[ib] =
        static_cast<int8_t>(std::clamp(round_nearest_even(iscale * scales[ib]), -128, 127));
  }
  // Re-quantize with the stored scales (fp16 d times int8).
  const float d_all = fp16_to_float(out->d);
  for (int j = 0; j < kSub; ++j) {
    const float d = d_all * out->scales[j];
    if (d == 0.0f) continue;  // decodes to 0 whatever the levels; keep the search's, as ggml does
    for (int i = 0; i < 16; ++i) {
      L[16 * j + i] =
          static_cast<uint8_t>(std::clamp(round_nearest_even(x[16 * j + i] / d), -32, 31) + 32);
    }
  }
  // Packing of SPEC §1, per half of 128 values: ql[l] = v[l] | v[l+64] << 4 (low 4 bits),
  // ql[l+32] = v[l+32] | v[l+96] << 4, and qh[l] holds the top 2 bits of v[l], v[l+32], v[l+64],
  // v[l+96] at bits 0, 2, 4, 6.
  for (int h = 0; h < 2; ++h) {
    const uint8_t* v = L + 128 * h;
    uint8_t* ql = out->ql + 64 * h;
    uint8_t* qh = out->qh + 32 * h;
    for (int l = 0; l < 32; ++l) {
      ql[l] = static_cast<uint8_t>((v[l] & 15) | ((v[l + 64] & 15) << 4));
      ql[l + 32] = static_cast<uint8_t>((v[l + 32] & 15) | ((v[l + 96] & 15) << 4));
      qh[l] = static_cast<uint8_t>((v[l] >> 4) | ((v[l + 32] >> 4) << 2) | ((v[l + 64] >> 4) << 4) |
                                   ((v[l + 96] >> 4) << 6));
    }
  }
}

// Applies a block quantizer to every block of rows [row_begin, row_end).
template <typename Block, int QK, void (*QuantizeBlock)(const float*, Block*)>
void quantize_rows_with(const float* src, int64_t k, int64_t row_begin, int64_t row_end,
                        uint8_t* dst) {
  const int64_t nb = k / QK;
  for (int64_t r = row_begin; r < row_end; ++r) {
    const float* x = src + r * k;
    Block* out = reinterpret_cast<Block*>(dst + r * nb * static_cast<int64_t>(sizeof(Block)));
    for (int64_t b = 0; b < nb; ++b) QuantizeBlock(x + b * QK, out + b);
  }
}

}  // namespace

bool is_quantize_type(int32_t type) {
  return type == kQ4_0 || type == kQ8_0 || type == kQ4_K || type == kQ6_K;
}

bool quantize_rows(int32_t type, const float* src, int64_t k, int64_t row_begin, int64_t row_end,
                   uint8_t* dst) {
  if (!is_quantize_type(type) || row_bytes(type, k) < 0) return false;
  switch (type) {
    case kQ4_0:
      quantize_rows_with<BlockQ4_0, kQK, quantize_block_q4_0>(src, k, row_begin, row_end, dst);
      return true;
    case kQ8_0:
      quantize_rows_with<BlockQ8_0, kQK, quantize_block_q8_0>(src, k, row_begin, row_end, dst);
      return true;
    case kQ4_K:
      quantize_rows_with<BlockQ4_K, kQK_K, quantize_block_q4_k>(src, k, row_begin, row_end, dst);
      return true;
    case kQ6_K:
      quantize_rows_with<BlockQ6_K, kQK_K, quantize_block_q6_k>(src, k, row_begin, row_end, dst);
      return true;
    default:
      return false;
  }
}

}  // namespace cpu
}  // namespace ggfuse

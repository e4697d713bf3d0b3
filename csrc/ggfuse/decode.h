// Decoding quantized weights, one value at a time, and the per-block dot-product formulas with Q8_1
// activations (SPEC §1, §2). Shared by the CPU and CUDA kernels so that both compute literally the
// same expressions; only the order in which block results are summed differs between them.
#pragma once

#include "ggfuse/formats.h"

namespace ggfuse {

// ---- integer value j of a block, before scales and offsets ----
// Q4_0: 0..15 (the -8 offset is applied through the activation sum s, SPEC §2).
GGFUSE_HD int q4_0_quant(const BlockQ4_0& b, int j) {
  return j < 16 ? (b.qs[j] & 15) : (b.qs[j - 16] >> 4);
}
// Q5_0: 0..31, bit 4 from qh (bit j of the little-endian 32-bit qh).
GGFUSE_HD int q5_0_quant(const BlockQ5_0& b, int j) {
  const uint32_t qh = static_cast<uint32_t>(b.qh[0]) | (static_cast<uint32_t>(b.qh[1]) << 8) |
                      (static_cast<uint32_t>(b.qh[2]) << 16) | (static_cast<uint32_t>(b.qh[3]) << 24);
  const int lo = j < 16 ? (b.qs[j] & 15) : (b.qs[j - 16] >> 4);
  return lo | (((qh >> j) & 1u) << 4);
}
// Q4_K: 0..15 of value j (0..255); sub-block j/32 pairs with qs bytes 32*(j/64).
GGFUSE_HD int q4_k_quant(const BlockQ4_K& b, int j) {
  const int sub = j >> 5, l = j & 31;
  const uint8_t byte = b.qs[32 * (sub >> 1) + l];
  return (sub & 1) ? (byte >> 4) : (byte & 15);
}
// Q5_K: 0..31; the fifth bit of sub-block `sub` is bit `sub` of qh[l].
GGFUSE_HD int q5_k_quant(const BlockQ5_K& b, int j) {
  const int sub = j >> 5, l = j & 31;
  const uint8_t byte = b.qs[32 * (sub >> 1) + l];
  const int lo = (sub & 1) ? (byte >> 4) : (byte & 15);
  return lo | (((b.qh[l] >> sub) & 1) << 4);
}
// Q6_K: -32..31 of value j (0..255); its scale is scales[j / 16].
GGFUSE_HD int q6_k_quant(const BlockQ6_K& b, int j) {
  const int half = j >> 7, t = (j >> 5) & 3, l = j & 31;
  const uint8_t* ql = b.ql + 64 * half;
  const uint8_t* qh = b.qh + 32 * half;
  const int low = (t & 1) ? ql[l + 32] : ql[l];
  const int nib = (t & 2) ? (low >> 4) : (low & 15);
  return (nib | (((qh[l] >> (2 * t)) & 3) << 4)) - 32;
}

// ---- dequantized value j of a block, in gguf-py's order of float32 operations ----
GGFUSE_HD float dequant_value(int32_t type, const uint8_t* block, int j) {
  switch (type) {
    case kQ4_0: {
      const auto& b = *reinterpret_cast<const BlockQ4_0*>(block);
      return fp16_to_float(b.d) * static_cast<float>(q4_0_quant(b, j) - 8);
    }
    case kQ5_0: {
      const auto& b = *reinterpret_cast<const BlockQ5_0*>(block);
      return fp16_to_float(b.d) * static_cast<float>(q5_0_quant(b, j) - 16);
    }
    case kQ8_0: {
      const auto& b = *reinterpret_cast<const BlockQ8_0*>(block);
      return fp16_to_float(b.d) * static_cast<float>(b.qs[j]);
    }
    case kQ8_1: {  // activations, so quantized inputs can be inspected and fed to float fallbacks
      const auto& b = *reinterpret_cast<const BlockQ8_1*>(block);
      return fp16_to_float(b.d) * static_cast<float>(b.qs[j]);
    }
    case kQ4_K: {
      const auto& b = *reinterpret_cast<const BlockQ4_K*>(block);
      int sc, m;
      k_scale_min(b.scales, j >> 5, &sc, &m);
      const float dsc = fp16_to_float(b.d) * static_cast<float>(sc);
      const float dmn = fp16_to_float(b.dmin) * static_cast<float>(m);
      return dsc * static_cast<float>(q4_k_quant(b, j)) - dmn;
    }
    case kQ5_K: {
      const auto& b = *reinterpret_cast<const BlockQ5_K*>(block);
      int sc, m;
      k_scale_min(b.scales, j >> 5, &sc, &m);
      const float dsc = fp16_to_float(b.d) * static_cast<float>(sc);
      const float dmn = fp16_to_float(b.dmin) * static_cast<float>(m);
      return dsc * static_cast<float>(q5_k_quant(b, j)) - dmn;
    }
    case kQ6_K: {
      const auto& b = *reinterpret_cast<const BlockQ6_K*>(block);
      const float dsc = fp16_to_float(b.d) * static_cast<float>(b.scales[j >> 4]);
      return dsc * static_cast<float>(q6_k_quant(b, j));
    }
    case kF32: {
      float v;
      memcpy(&v, block, 4);
      return v;
    }
    case kF16: {
      uint16_t h;
      memcpy(&h, block, 2);
      return fp16_to_float(h);
    }
    case kBF16: {
      uint16_t h;
      memcpy(&h, block, 2);
      return bf16_to_float(h);
    }
    default:
      return 0.0f;
  }
}

// ---- per-block contributions to a dot product with Q8_1 activations (SPEC §2) ----
// d_x, s_x: the Q8_1 block's scale and sum; sumi: sum of q_w * q_x over the covered values;
// sumq: sum of q_x over them. F is the arithmetic: float on CUDA (SPEC §2: fp32); the CPU evaluates
// the same formulas in double and rounds once per output (cpu/mat_vec.cpp says why).
//
// Q4_0 / Q5_0 store unsigned quants; their offset (8 / 16) is subtracted through s_x, the sum of the
// unquantized activations, as ggml's CUDA backend does.
template <typename F>
GGFUSE_HD F dot_q4_0(F d_w, F d_x, F s_x, int sumi) {
  return d_w * (d_x * static_cast<F>(sumi) - F(8) * s_x);
}
template <typename F>
GGFUSE_HD F dot_q5_0(F d_w, F d_x, F s_x, int sumi) {
  return d_w * (d_x * static_cast<F>(sumi) - F(16) * s_x);
}
template <typename F>
GGFUSE_HD F dot_q8_0(F d_w, F d_x, int sumi) {
  return d_w * (d_x * static_cast<F>(sumi));
}
// Q4_K / Q5_K sub-block of 32: the min term uses d_x * sum(q_x), not s_x, so the result is exactly
// dequant(W) . dequant(x_q8) up to rounding (this is also what ggml's CUDA backend does).
// dsc = d * sc, dmn = dmin * m for the sub-block.
template <typename F>
GGFUSE_HD F dot_k_sub(F dsc, F dmn, F d_x, int sumi, int sumq) {
  return d_x * (dsc * static_cast<F>(sumi) - dmn * static_cast<F>(sumq));
}
// Q6_K sub-block of 16 (always inside one Q8_1 block): dsc = d * scales[sub], quants in -32..31.
template <typename F>
GGFUSE_HD F dot_q6_k_sub(F dsc, F d_x, int sumi) {
  return d_x * (dsc * static_cast<F>(sumi));
}

}  // namespace ggfuse

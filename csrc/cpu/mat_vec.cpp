// Quantized weight x Q8_1 activations, CPU reference of the fused multi-segment mat-vec (SPEC §2, §3).
//
// Each weight block is decoded to integers once and then dotted with every batch row, so the cost of
// decoding is shared across B. The per-block formulas come from decode.h, shared with the CUDA kernels,
// but evaluated and summed here in double, and the sum rounded to float once: every input of them
// (fp16 scales, their products with 6- or 8-bit scales, integer sums) is exact in double, so each
// output is the §2 result to within half an fp32 ulp. In fp32 (SPEC §2's "accumulate in fp32", what
// the CUDA kernels do) an output whose blocks cancel loses relative accuracy: on fresh random
// single-row, single-column draws (K = 768) about 0.3-1% of outputs were off by more than SPEC §5's
// CPU bound of 1e-5 (worst seen 3.6e-5), which made that check flaky; in double none can be.
#include <algorithm>
#include <type_traits>
#include <vector>

#include "ggfuse/decode.h"
#include "ggfuse/kernels_cpu.h"

namespace ggfuse {
namespace cpu {
namespace {

inline int dot_i8(const int* w, const int8_t* x, int n) {
  int s = 0;
  for (int i = 0; i < n; ++i) s += w[i] * x[i];
  return s;
}
inline int sum_i8(const int8_t* x, int n) {
  int s = 0;
  for (int i = 0; i < n; ++i) s += x[i];
  return s;
}

// Accumulates one weight row into acc[b] for every batch row b. nbx = Q8_1 blocks per row (k/32).
template <int32_t kType>
void row_dot(const uint8_t* w_row, int64_t k, const BlockQ8_1* x, int64_t batch, int64_t nbx,
             double* acc) {
  int q[kQK_K];
  if constexpr (kType == kQ4_0 || kType == kQ5_0 || kType == kQ8_0) {
    for (int64_t i = 0; i < k / kQK; ++i) {
      double d_w;
      if constexpr (kType == kQ4_0) {
        const auto& b = reinterpret_cast<const BlockQ4_0*>(w_row)[i];
        for (int j = 0; j < kQK; ++j) q[j] = q4_0_quant(b, j);
        d_w = fp16_to_float(b.d);
      } else if constexpr (kType == kQ5_0) {
        const auto& b = reinterpret_cast<const BlockQ5_0*>(w_row)[i];
        for (int j = 0; j < kQK; ++j) q[j] = q5_0_quant(b, j);
        d_w = fp16_to_float(b.d);
      } else {
        const auto& b = reinterpret_cast<const BlockQ8_0*>(w_row)[i];
        for (int j = 0; j < kQK; ++j) q[j] = b.qs[j];
        d_w = fp16_to_float(b.d);
      }
      for (int64_t bt = 0; bt < batch; ++bt) {
        const BlockQ8_1& xb = x[bt * nbx + i];
        const int sumi = dot_i8(q, xb.qs, kQK);
        const double d_x = fp16_to_float(xb.d);
        if constexpr (kType == kQ4_0) {
          acc[bt] += dot_q4_0<double>(d_w, d_x, fp16_to_float(xb.s), sumi);
        } else if constexpr (kType == kQ5_0) {
          acc[bt] += dot_q5_0<double>(d_w, d_x, fp16_to_float(xb.s), sumi);
        } else {
          acc[bt] += dot_q8_0<double>(d_w, d_x, sumi);
        }
      }
    }
  } else if constexpr (kType == kQ4_K || kType == kQ5_K) {
    using Block = std::conditional_t<kType == kQ4_K, BlockQ4_K, BlockQ5_K>;
    for (int64_t i = 0; i < k / kQK_K; ++i) {
      const Block& b = reinterpret_cast<const Block*>(w_row)[i];
      for (int j = 0; j < kQK_K; ++j) {
        if constexpr (kType == kQ4_K) q[j] = q4_k_quant(b, j); else q[j] = q5_k_quant(b, j);
      }
      double dsc[8], dmn[8];
      for (int s = 0; s < 8; ++s) {
        int sc, m;
        k_scale_min(b.scales, s, &sc, &m);
        dsc[s] = static_cast<double>(fp16_to_float(b.d)) * sc;
        dmn[s] = static_cast<double>(fp16_to_float(b.dmin)) * m;
      }
      for (int64_t bt = 0; bt < batch; ++bt) {
        const BlockQ8_1* xb = x + bt * nbx + i * 8;
        for (int s = 0; s < 8; ++s) {
          const int sumi = dot_i8(q + 32 * s, xb[s].qs, kQK);
          const int sumq = sum_i8(xb[s].qs, kQK);
          acc[bt] += dot_k_sub<double>(dsc[s], dmn[s], fp16_to_float(xb[s].d), sumi, sumq);
        }
      }
    }
  } else {  // Q6_K
    for (int64_t i = 0; i < k / kQK_K; ++i) {
      const BlockQ6_K& b = reinterpret_cast<const BlockQ6_K*>(w_row)[i];
      for (int j = 0; j < kQK_K; ++j) q[j] = q6_k_quant(b, j);
      const double d = fp16_to_float(b.d);
      for (int64_t bt = 0; bt < batch; ++bt) {
        const BlockQ8_1* xb = x + bt * nbx + i * 8;
        for (int s = 0; s < 16; ++s) {
          const BlockQ8_1& xs = xb[s >> 1];
          const int sumi = dot_i8(q + 16 * s, xs.qs + 16 * (s & 1), 16);
          acc[bt] += dot_q6_k_sub<double>(d * b.scales[s], fp16_to_float(xs.d), sumi);
        }
      }
    }
  }
}

template <int32_t kType>
void rows_typed(const uint8_t* weight, const Segment& seg, int64_t k, const uint8_t* x_q8,
                int64_t batch, int64_t row_begin, int64_t row_end, float* out, int64_t n_out) {
  const int64_t rb = row_bytes(kType, k);
  const int64_t nbx = k / kQK;
  const BlockQ8_1* x = reinterpret_cast<const BlockQ8_1*>(x_q8);
  std::vector<double> acc(static_cast<size_t>(batch));
  for (int64_t r = row_begin; r < row_end; ++r) {
    std::fill(acc.begin(), acc.end(), 0.0);
    row_dot<kType>(weight + seg.byte_offset + r * rb, k, x, batch, nbx, acc.data());
    for (int64_t bt = 0; bt < batch; ++bt) out[bt * n_out + seg.row_begin + r] = static_cast<float>(acc[bt]);
  }
}

}  // namespace

void mat_vec_q8_1_rows(const uint8_t* weight, const Segment& seg, int64_t k, const uint8_t* x_q8,
                       int64_t batch, int64_t row_begin, int64_t row_end, float* out,
                       int64_t n_out) {
  switch (seg.type) {
    case kQ4_0: return rows_typed<kQ4_0>(weight, seg, k, x_q8, batch, row_begin, row_end, out, n_out);
    case kQ5_0: return rows_typed<kQ5_0>(weight, seg, k, x_q8, batch, row_begin, row_end, out, n_out);
    case kQ8_0: return rows_typed<kQ8_0>(weight, seg, k, x_q8, batch, row_begin, row_end, out, n_out);
    case kQ4_K: return rows_typed<kQ4_K>(weight, seg, k, x_q8, batch, row_begin, row_end, out, n_out);
    case kQ5_K: return rows_typed<kQ5_K>(weight, seg, k, x_q8, batch, row_begin, row_end, out, n_out);
    case kQ6_K: return rows_typed<kQ6_K>(weight, seg, k, x_q8, batch, row_begin, row_end, out, n_out);
    default: return;  // the op layer rejects other types before calling
  }
}

}  // namespace cpu
}  // namespace ggfuse

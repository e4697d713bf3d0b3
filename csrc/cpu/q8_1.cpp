// Q8_1 activation quantization and the fused RMSNorm -> Q8_1 pass, CPU reference (SPEC §1, §3).
// The rounding steps mirror the CUDA kernels exactly (fp32 d = amax/127, q = roundf(x / d) with an
// IEEE division, s = fp32 sum of the unquantized values in formats.h's q8_1_block_sum order), and so
// does the order of the norm's sum of squares (cuda/norm.cuh's 256-thread row group, below), so both
// produce the same bytes.
#include <cmath>
#include <vector>

#include "ggfuse/kernels_cpu.h"

namespace ggfuse {
namespace cpu {
namespace {

// One Q8_1 block from 32 fp32 values.
void quantize_block_q8_1(const float* v, BlockQ8_1* out) {
  float amax = 0.0f;
  for (int i = 0; i < kQK; ++i) amax = std::fmax(amax, std::fabs(v[i]));
  const float d = amax / 127.0f;
  for (int i = 0; i < kQK; ++i) {
    // roundf rounds half away from zero, as ggml does; d == 0 means every value is zero.
    out->qs[i] = amax == 0.0f ? 0 : static_cast<int8_t>(std::roundf(v[i] / d));
  }
  out->d = float_to_fp16(d);
  out->s = float_to_fp16(q8_1_block_sum(v));  // formats.h: the order every kernel uses
}

template <typename T>
void quantize_rows_typed(const T* x, int64_t k, int64_t row_begin, int64_t row_end, uint8_t* out) {
  const int64_t nb = k / kQK;
  float v[kQK];
  for (int64_t r = row_begin; r < row_end; ++r) {
    const T* xr = x + r * k;
    BlockQ8_1* o = reinterpret_cast<BlockQ8_1*>(out) + r * nb;
    for (int64_t b = 0; b < nb; ++b) {
      for (int i = 0; i < kQK; ++i) v[i] = to_float(xr[b * kQK + i]);
      quantize_block_q8_1(v, o + b);
    }
  }
}

// The CUDA norm's order (cuda/norm.cuh): 256 threads, thread t owning the quads (4 consecutive
// values) t, t + 256, ...; its x^2 summed quad by quad in order; a butterfly over each warp of 32
// (lane l adds lane l ^ 16, then ^ 8, ^ 4, ^ 2, ^ 1: every lane ends with the same bits, so lane 0's
// sum stands for all); the 8 warp sums added in order from 0.
constexpr int kNormThreads = 256;

float norm_sum_sq(const float* xf, int64_t k) {
  float part[kNormThreads];
  for (int t = 0; t < kNormThreads; ++t) {
    float s = 0.0f;
    for (int64_t q = t; 4 * q < k; q += kNormThreads) {
      for (int i = 0; i < 4; ++i) s += xf[4 * q + i] * xf[4 * q + i];
    }
    part[t] = s;
  }
  float total = 0.0f;
  for (int w = 0; w < kNormThreads / 32; ++w) {
    float* lanes = part + 32 * w;
    for (int off = 16; off > 0; off >>= 1) {
      float next[32];
      for (int l = 0; l < 32; ++l) next[l] = lanes[l] + lanes[l ^ off];
      for (int l = 0; l < 32; ++l) lanes[l] = next[l];
    }
    total += lanes[0];
  }
  return total;
}

template <typename T, typename W>
void rms_norm_rows_typed(const T* x, const W* w, int64_t k, float eps, int64_t row_begin,
                         int64_t row_end, uint8_t* out, T* y_out) {
  const int64_t nb = k / kQK;
  std::vector<float> xf(static_cast<size_t>(k));
  float v[kQK];
  for (int64_t r = row_begin; r < row_end; ++r) {
    const T* xr = x + r * k;
    for (int64_t i = 0; i < k; ++i) xf[i] = to_float(xr[i]);
    // 1/sqrt rather than an approximate rsqrt: both are correctly rounded here and in CUDA.
    const float scale = 1.0f / std::sqrt(norm_sum_sq(xf.data(), k) / static_cast<float>(k) + eps);
    BlockQ8_1* o = reinterpret_cast<BlockQ8_1*>(out) + r * nb;
    for (int64_t b = 0; b < nb; ++b) {
      for (int i = 0; i < kQK; ++i) {
        const int64_t c = b * kQK + i;
        v[i] = xf[c] * scale * to_float(w[c]);
        if (y_out != nullptr) from_float(v[i], y_out + r * k + c);
      }
      quantize_block_q8_1(v, o + b);
    }
  }
}

template <typename T>
void rms_norm_dispatch_w(const T* x, const void* w, FloatType w_type, int64_t k, float eps,
                         int64_t rb, int64_t re, uint8_t* out, void* y_out) {
  T* y = static_cast<T*>(y_out);
  switch (w_type) {
    case FloatType::kF32: return rms_norm_rows_typed(x, static_cast<const float*>(w), k, eps, rb, re, out, y);
    case FloatType::kF16: return rms_norm_rows_typed(x, static_cast<const Half*>(w), k, eps, rb, re, out, y);
    case FloatType::kBF16: return rms_norm_rows_typed(x, static_cast<const Bf16*>(w), k, eps, rb, re, out, y);
  }
}

}  // namespace

void quantize_q8_1_rows(const void* x, FloatType x_type, int64_t k, int64_t row_begin,
                        int64_t row_end, uint8_t* out) {
  switch (x_type) {
    case FloatType::kF32: return quantize_rows_typed(static_cast<const float*>(x), k, row_begin, row_end, out);
    case FloatType::kF16: return quantize_rows_typed(static_cast<const Half*>(x), k, row_begin, row_end, out);
    case FloatType::kBF16: return quantize_rows_typed(static_cast<const Bf16*>(x), k, row_begin, row_end, out);
  }
}

void rms_norm_mul_q8_1_rows(const void* x, FloatType x_type, const void* w, FloatType w_type,
                            int64_t k, float eps, int64_t row_begin, int64_t row_end,
                            uint8_t* out, void* y_out) {
  switch (x_type) {
    case FloatType::kF32: return rms_norm_dispatch_w(static_cast<const float*>(x), w, w_type, k, eps, row_begin, row_end, out, y_out);
    case FloatType::kF16: return rms_norm_dispatch_w(static_cast<const Half*>(x), w, w_type, k, eps, row_begin, row_end, out, y_out);
    case FloatType::kBF16: return rms_norm_dispatch_w(static_cast<const Bf16*>(x), w, w_type, k, eps, row_begin, row_end, out, y_out);
  }
}

}  // namespace cpu
}  // namespace ggfuse

// CPU kernels: plain pointers and sizes, no torch types. The op layer (csrc/torch/) validates inputs,
// allocates outputs and splits rows over torch's thread pool; every function here handles the row
// range [row_begin, row_end) so it can be called from several threads on disjoint ranges.
#pragma once

#include <cstdint>

#include "ggfuse/formats.h"

namespace ggfuse {

// Element type of float activations and norm weights.
enum class FloatType : int32_t { kF32 = 0, kF16 = 1, kBF16 = 2 };

namespace cpu {

// Q8_1 (SPEC §1) of rows of k values (k % 32 == 0): row r of x starts at x + r*k elements and its
// k/32 blocks start at out + r*(k/32)*36 bytes.
void quantize_q8_1_rows(const void* x, FloatType x_type, int64_t k, int64_t row_begin,
                        int64_t row_end, uint8_t* out);

// y = x * rsqrt(mean(x^2) + eps) * w in fp32, then Q8_1 of y (SPEC §3). When y_out is not null the
// float y is also written there, in x's element type.
void rms_norm_mul_q8_1_rows(const void* x, FloatType x_type, const void* w, FloatType w_type,
                            int64_t k, float eps, int64_t row_begin, int64_t row_end,
                            uint8_t* out, void* y_out);

// Rows of GGUF bytes of `type` (each row_bytes(type, k) long) to float32 rows of k values.
// Handles F32, F16, BF16, Q4_0, Q5_0, Q8_0, Q4_K, Q5_K, Q6_K.
void dequantize_rows(int32_t type, const uint8_t* src, int64_t k, int64_t row_begin,
                     int64_t row_end, float* dst);

// Float32 rows of k values to GGUF bytes of `type`: Q4_0 and Q8_0 bit-exact with ggml's reference
// quantizer; Q4_K and Q6_K with ggml's scale search. Returns false for any other type.
bool quantize_rows(int32_t type, const float* src, int64_t k, int64_t row_begin, int64_t row_end,
                   uint8_t* dst);
bool is_quantize_type(int32_t type);

// out[b * n_out + seg.row_begin + r] = sum_k W[r, k] * x[b, k] for r in [row_begin, row_end) of one
// segment of a fused weight (rows of seg.type starting at weight + seg.byte_offset) and batch rows b of
// Q8_1 activations x_q8 (k/32 blocks each). Math of SPEC §2, identical to the CUDA kernel.
void mat_vec_q8_1_rows(const uint8_t* weight, const Segment& seg, int64_t k, const uint8_t* x_q8,
                       int64_t batch, int64_t row_begin, int64_t row_end, float* out,
                       int64_t n_out);

}  // namespace cpu
}  // namespace ggfuse

// CUDA kernel launchers: plain pointers, sizes and a stream, no torch types. Each returns the launch
// status (cudaGetLastError after the launch) so the op layer can turn a failure into an exception.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "ggfuse/formats.h"
#include "ggfuse/kernels_cpu.h"  // FloatType

namespace ggfuse {
namespace cuda {

cudaError_t quantize_q8_1(const void* x, FloatType x_type, int64_t rows, int64_t k, uint8_t* out,
                          cudaStream_t stream);

cudaError_t rms_norm_mul_q8_1(const void* x, FloatType x_type, const void* w, FloatType w_type,
                              int64_t rows, int64_t k, float eps, uint8_t* out, void* y_out,
                              cudaStream_t stream);

cudaError_t dequantize(int32_t type, const uint8_t* src, int64_t rows, int64_t k, float* dst,
                       cudaStream_t stream);

// out [batch, n_out] float32; the table's segments write columns [row_begin, row_begin + rows).
// weight_bytes: the size of the weight buffer (no kernel reads past it). With GGFUSE_MV_STREAM=N
// (opt-in) batch chunks of <= N rows run mat_vec_q8_1_stream on sm_90+ when it accepts them; the
// others the kernels below. Batches run 8 rows per launch, or, where the direct MMA kernel takes the
// weights (Q4_K, Q4_K + Q6_K, Q4_0; K % 256 == 0) and each of its warps has one weight item, up to 64
// rows per launch (GGFUSE_MV_CHUNKS=N forces N chunks of 8).
cudaError_t mat_vec_q8_1(const uint8_t* weight, int64_t weight_bytes, const SegmentTable& table, int64_t k,
                         const uint8_t* x_q8, int64_t batch, float* out, int64_t n_out,
                         cudaStream_t stream);

// Which rows the dp4a kernel copies whole into shared memory (with cp.async, before its PDL wait)
// instead of reading them from global memory unit by unit: none, the rows of the 2-byte aligned types
// (Q4_0, Q5_0, Q8_0, Q6_K; Q4_K / Q5_K rows, read with 16-byte loads, stay in global memory), or all.
enum class DpStaging : int { kNone = 0, kTwoByteTypes = 1, kAll = 2 };

// The same for batch 1..8 with one warp per row and dp4a (mat_vec_dp4a.cu); mat_vec_q8_1 calls it
// for the launches where it measured faster (mat_vec.cu has the rule; GGFUSE_MV_DP4A=N forces it for
// every type and chunks of <= N rows, 0 never; GGFUSE_MV_STAGED=0/1 forces kNone / kAll).
// Returns cudaErrorNotSupported, having launched nothing, when x does not fit in shared memory, or
// when some rows are staged and x plus the rows' slots do not fit at >= 3 CTAs per SM (the caller
// then runs the MMA kernel).
cudaError_t mat_vec_q8_1_dp4a(const uint8_t* weight, int64_t weight_bytes, const SegmentTable& table, int64_t k,
                              const uint8_t* x_q8, int64_t batch, float* out, int64_t n_out,
                              DpStaging staging, cudaStream_t stream);

// rms_norm_mul_q8_1 fused into mat_vec_q8_1 for batch <= 8, one launch: every CTA of the mat-vec
// normalizes and quantizes x [batch, k] itself (into shared memory: the bytes rms_norm_mul_q8_1
// writes). Opt-in, both measured slower than the two kernels chained by PDL: tries
// rms_norm_mat_vec_q8_1_stream first (GGFUSE_MV_STREAM=N), then the MMA kernel (GGFUSE_FUSED_NORM=1).
// Returns cudaErrorNotSupported, having launched nothing, when neither applies or x does not fit; the
// caller then runs the two kernels.
cudaError_t rms_norm_mat_vec_q8_1(const void* x, FloatType x_type, const void* norm_w, FloatType w_type,
                                  float eps, const uint8_t* weight, int64_t weight_bytes,
                                  const SegmentTable& table, int64_t k, int64_t batch, float* out,
                                  int64_t n_out, cudaStream_t stream);

// The streaming kernel (mat_vec_stream.cu), sm_90+, batch 1..8: each CTA (one per SM, half an SM's
// resources) bulk-copies its share of the weights into shared memory before the PDL wait, so the
// next layer's weights stream while this layer computes; the dp4a arithmetic, the same bits as
// mat_vec_q8_1_dp4a. The norm variant also normalizes and quantizes x in every CTA (one launch per
// layer). Opt-in: it measured slower than the default kernels (mat_vec_stream.cu says why).
// Returns cudaErrorNotSupported, having launched nothing, on older GPUs, for batch > 8 or above
// GGFUSE_MV_STREAM=N (unset or 0: always), or when x or a row does not fit in shared memory.
cudaError_t mat_vec_q8_1_stream(const uint8_t* weight, int64_t weight_bytes, const SegmentTable& table, int64_t k,
                                const uint8_t* x_q8, int64_t batch, float* out, int64_t n_out,
                                cudaStream_t stream);
cudaError_t rms_norm_mat_vec_q8_1_stream(const void* x, FloatType x_type, const void* norm_w, FloatType w_type,
                                         float eps, const uint8_t* weight, int64_t weight_bytes,
                                         const SegmentTable& table, int64_t k, int64_t batch, float* out,
                                         int64_t n_out, cudaStream_t stream);

}  // namespace cuda
}  // namespace ggfuse

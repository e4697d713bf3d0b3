// The RMSNorm -> Q8_1 arithmetic shared by the standalone norm kernel (q8_1.cu) and the norm that the
// fused norm + mat-vec kernel runs in every CTA (mat_vec.cu). Both evaluate the sum of squares in the
// same order (thread i of T sums blocks i, i + T, ... sequentially; a butterfly over each warp; the
// warps in order), so they produce the same scale and the same Q8_1 bytes.
//
// Every float step that nvcc would contract or approximate is written with an IEEE intrinsic
// (__fmul_rn, __fadd_rn, __fdiv_rn, __fsqrt_rn), matching the CPU build (-ffp-contract=off).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common.cuh"
#include "ggfuse/formats.h"

namespace ggfuse {
namespace cuda {

constexpr int kNormMaxThreads = 256;  // 32 floats per thread stay in registers (no spills)

// Threads that reduce one row of nb blocks: one per block, up to 256, a whole number of warps.
__host__ __device__ inline int norm_threads(int64_t nb) {
  const int64_t t = (nb + 31) / 32 * 32;
  return static_cast<int>(t < kNormMaxThreads ? t : kNormMaxThreads);
}

__device__ __forceinline__ float load_one(const float* p) { return *p; }
__device__ __forceinline__ float load_one(const Half* p) { return h2f(p->bits); }
__device__ __forceinline__ float load_one(const Bf16* p) {
  return __uint_as_float(static_cast<uint32_t>(p->bits) << 16);
}

// The 32 values of one block as floats. `vec`: the tensor starts on a 16-byte boundary, so 16-byte
// loads are allowed (every block then does: 32 values of any of these types are 64 or 128 bytes).
template <typename T>
__device__ __forceinline__ void load_block(const T* p, bool vec, float v[kQK]) {
  if (vec) {
    constexpr int kPerVec = 16 / sizeof(T);
#pragma unroll
    for (int i = 0; i < kQK / kPerVec; ++i) {
      const uint4 u = *(reinterpret_cast<const uint4*>(p) + i);
      const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        if constexpr (sizeof(T) == 4) {
          v[i * 4 + j] = __uint_as_float(w[j]);
        } else {
          T lo, hi;
          lo.bits = static_cast<uint16_t>(w[j] & 0xffffu);
          hi.bits = static_cast<uint16_t>(w[j] >> 16);
          v[i * 8 + 2 * j] = load_one(&lo);
          v[i * 8 + 2 * j + 1] = load_one(&hi);
        }
      }
    }
  } else {
#pragma unroll
    for (int i = 0; i < kQK; ++i) v[i] = load_one(p + i);
  }
}

__device__ __forceinline__ void store_one(float v, float* p) { *p = v; }
__device__ __forceinline__ void store_one(float v, Half* p) {
  p->bits = __half_as_ushort(__float2half_rn(v));
}
__device__ __forceinline__ void store_one(float v, Bf16* p) {
  p->bits = __bfloat16_as_ushort(__float2bfloat16_rn(v));
}

// Q8_1 of 32 floats, exactly as cpu/q8_1.cpp's quantize_block_q8_1: sequential fmax/sum, fp32
// d = amax/127 with an IEEE division, q = roundf(v/d) (half away from zero), d and s rounded to fp16.
// `out` is 4-byte aligned (a Q8_1 row of ours, in global or shared memory).
__device__ __forceinline__ void quantize_block(const float v[kQK], uint8_t* out) {
  float amax = 0.0f;
  float sum = 0.0f;
#pragma unroll
  for (int i = 0; i < kQK; ++i) {
    amax = fmaxf(amax, fabsf(v[i]));
    sum = __fadd_rn(sum, v[i]);
  }
  const float d = __fdiv_rn(amax, 127.0f);
  uint32_t words[2 + kQK / 4];
  words[0] = static_cast<uint32_t>(__half_as_ushort(__float2half_rn(d))) |
             (static_cast<uint32_t>(__half_as_ushort(__float2half_rn(sum))) << 16);
#pragma unroll
  for (int i = 0; i < kQK / 4; ++i) {
    uint32_t packed = 0;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int q = amax == 0.0f ? 0 : static_cast<int>(roundf(__fdiv_rn(v[4 * i + j], d)));
      packed |= (static_cast<uint32_t>(q) & 0xffu) << (8 * j);
    }
    words[1 + i] = packed;
  }
  uint32_t* o = reinterpret_cast<uint32_t*>(out);
#pragma unroll
  for (int i = 0; i < 1 + kQK / 4; ++i) o[i] = words[i];
}

// Thread i of `nthreads`: its share of the row's sum of squares (blocks i, i + nthreads, ...).
template <typename T>
__device__ __forceinline__ float row_sum_sq_part(const T* xr, int64_t nb, int i, int nthreads, bool vec) {
  float v[kQK];
  float sum_sq = 0.0f;
  for (int64_t b = i; b < nb; b += nthreads) {
    load_block(xr + b * kQK, vec, v);
#pragma unroll
    for (int j = 0; j < kQK; ++j) sum_sq = __fadd_rn(sum_sq, __fmul_rn(v[j], v[j]));
  }
  return sum_sq;
}

// The butterfly over a warp (every lane gets the same total).
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = __fadd_rn(v, __shfl_xor_sync(0xffffffffu, v, off));
  return v;
}

// 1/sqrt(mean + eps) with IEEE division and square root, as the CPU computes it.
__device__ __forceinline__ float rms_scale(float total, int64_t k, float eps) {
  return __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(__fdiv_rn(total, static_cast<float>(k)), eps)));
}

// Block b of a row: y = (x * scale) * w in fp32, optionally stored in x's type, then Q8_1 of y.
template <typename T, typename W>
__device__ __forceinline__ void norm_quantize_block(const T* xr, const W* w, int64_t b, float scale,
                                                    bool vec_x, bool vec_w, uint8_t* out_block,
                                                    T* y_row) {
  float v[kQK], wv[kQK];
  load_block(xr + b * kQK, vec_x, v);
  load_block(w + b * kQK, vec_w, wv);
#pragma unroll
  for (int i = 0; i < kQK; ++i) v[i] = __fmul_rn(__fmul_rn(v[i], scale), wv[i]);
  if (y_row != nullptr) {
#pragma unroll
    for (int i = 0; i < kQK; ++i) store_one(v[i], y_row + b * kQK + i);
  }
  quantize_block(v, out_block);
}

// The norm a mat-vec CTA runs for itself (mat_vec.cu with GGFUSE_FUSED_NORM=1, mat_vec_stream.cu):
// rms_norm_mul_q8_1 of `batch` rows of x [batch, nb * 32], every block's 9 Q8_1 words handed to
// place(row, block, words). The standalone kernel's thread i of nt (norm_threads(nb)) becomes virtual
// thread (row, i), each of its warps' butterflies a virtual warp, so the sums of squares are added in
// the same order and the bytes are the same. `red`: batch * (nt + 9) floats of shared scratch. Ends
// with a CTA barrier.
template <typename T, typename W, typename Place>
__device__ __forceinline__ void cta_norm_q8_1(const T* x, const W* w, int batch, int64_t nb, int nt, float eps,
                                              bool vx, bool vw, float* red, Place place) {
  const int64_t k = nb * kQK;
  const int wpr = nt / 32, threads = blockDim.x, warps = threads >> 5;
  float* parts = red;                   // [batch][nt]
  float* wsums = red + batch * nt;      // [batch][8]
  float* scales = wsums + batch * 8;    // [batch]
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  for (int v = threadIdx.x; v < batch * nt; v += threads) {
    const int b = v / nt;
    parts[v] = row_sum_sq_part(x + b * k, nb, v - b * nt, nt, vx);
  }
  __syncthreads();
  for (int v = warp; v < batch * wpr; v += warps) {
    const int b = v / wpr, ww = v - b * wpr;
    const float s = warp_sum(parts[b * nt + ww * 32 + lane]);
    if (lane == 0) wsums[b * 8 + ww] = s;
  }
  __syncthreads();
  if (threadIdx.x < batch) {
    float total = 0.0f;
    for (int i = 0; i < wpr; ++i) total = __fadd_rn(total, wsums[threadIdx.x * 8 + i]);
    scales[threadIdx.x] = rms_scale(total, k, eps);
  }
  __syncthreads();
  for (int64_t v = threadIdx.x; v < batch * nb; v += threads) {
    const int b = static_cast<int>(v / nb);
    const int64_t blk = v - b * nb;
    uint32_t q[9];
    norm_quantize_block(x + b * k, w, blk, scales[b], vx, vw, reinterpret_cast<uint8_t*>(q),
                        static_cast<T*>(nullptr));
    place(b, blk, q);
  }
  __syncthreads();
}

}  // namespace cuda
}  // namespace ggfuse

// The RMSNorm -> Q8_1 arithmetic shared by the standalone norm kernel (q8_1.cu) and the norm that a
// mat-vec CTA runs for itself in the opt-in one-launch variants (the MMA kernel with
// GGFUSE_FUSED_NORM=1, the streaming kernel; docs/PERFORMANCE.md v10 has why they stay opt-in). One
// row is normalized by a group of 256 threads (8 warps) in one fixed order wherever it runs, so every
// path produces the same Q8_1 bytes (the standalone kernel gives a row to up to 8 such groups in as
// many CTAs, each quantizing a share of the row's rounds after computing the whole sum of squares:
// norm_row_q8_1):
//   * thread t owns the "quads" (4 consecutive values) t, t + 256, t + 512, ... ("rounds"); 8 adjacent
//     lanes hold one Q8_1 block, so a block's max, sum and 32 divisions are spread over 8 lanes
//     (the previous layout, one thread per block, put 32 serial IEEE divisions on every CTA's
//     critical path);
//   * the sum of squares: each thread's rounds in order, a butterfly over the warp, the 8 warps in
//     order; the block sum s: formats.h's q8_1_block_sum order (each lane's 4 values, then a
//     butterfly over the 8 lanes);
//   * the first kNormRegRounds rounds of x and w stay in registers between the two passes (all of
//     them up to K = 4096), later rounds are read again.
// cpu/q8_1.cpp sums in the same orders, so the CPU writes the same bytes.
//
// Every float step that nvcc would contract or approximate is written with an IEEE intrinsic
// (__fmul_rn, __fadd_rn, __fdiv_rn, __fsqrt_rn), matching the CPU build (-ffp-contract=off).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common.cuh"
#include "ggfuse/formats.h"
#include "ggfuse/kernels_cpu.h"  // FloatType

namespace ggfuse {
namespace cuda {

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

// Q8_1 of 32 floats, exactly as cpu/q8_1.cpp's quantize_block_q8_1: fmax, q8_1_block_sum, fp32
// d = amax/127 with an IEEE division, q = roundf(v/d) (half away from zero), d and s rounded to fp16.
// `out` is 4-byte aligned (a Q8_1 row of ours, in global or shared memory).
__device__ __forceinline__ void quantize_block(const float v[kQK], uint8_t* out) {
  float amax = 0.0f;
#pragma unroll
  for (int i = 0; i < kQK; ++i) amax = fmaxf(amax, fabsf(v[i]));
  const float sum = q8_1_block_sum(v);  // formats.h: the order every kernel uses
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

constexpr int kNormThreads = 256;   // one row's group: 8 warps
constexpr int kNormWarps = kNormThreads / 32;
constexpr int kNormRegRounds = 4;   // rounds of x and w held in registers: 32 floats per thread
constexpr int kNormMaxGroups = 4;   // a CTA of up to 1024 threads normalizes up to 4 rows at once

// The arguments of a fused norm, as a mat-vec kernel receives them (by value in its parameters).
struct NormArgs {
  const void* x;   // [batch, K] of x_type, rows contiguous
  const void* w;   // [K] of w_type
  float eps;
  int32_t types;   // 3 * x_type + w_type (FloatType values)
  int32_t vec;     // bit 0: x may use vector loads (16-byte aligned); bit 1: w may
  int32_t prefetch;  // prefetch w into L2 before the PDL wait (GGFUSE_NORM_PREFETCH=0: not)
};
// GGFUSE_NORM_PREFETCH=0 turns the norm weight's L2 prefetch off (an experiment knob), read once.
inline bool norm_prefetch_enabled() {
  static const bool on = env_int("GGFUSE_NORM_PREFETCH", 1) != 0;
  return on;
}
inline NormArgs make_norm_args(const void* x, FloatType x_type, const void* w, FloatType w_type, float eps) {
  NormArgs n{};
  n.x = x;
  n.w = w;
  n.eps = eps;
  n.types = 3 * static_cast<int32_t>(x_type) + static_cast<int32_t>(w_type);
  n.vec = ((reinterpret_cast<uintptr_t>(x) & 15u) == 0 ? 1 : 0) | ((reinterpret_cast<uintptr_t>(w) & 15u) == 0 ? 2 : 0);
  n.prefetch = norm_prefetch_enabled() ? 1 : 0;
  return n;
}

// Four consecutive values as floats (one 16- or 8-byte load when `vec`).
template <typename T>
__device__ __forceinline__ void load_quad(const T* p, bool vec, float v[4]) {
  if (vec) {
    if constexpr (sizeof(T) == 4) {
      const float4 f = *reinterpret_cast<const float4*>(p);
      v[0] = f.x, v[1] = f.y, v[2] = f.z, v[3] = f.w;
    } else {
      const uint2 u = *reinterpret_cast<const uint2*>(p);
      T h[4];
      h[0].bits = static_cast<uint16_t>(u.x & 0xffffu);
      h[1].bits = static_cast<uint16_t>(u.x >> 16);
      h[2].bits = static_cast<uint16_t>(u.y & 0xffffu);
      h[3].bits = static_cast<uint16_t>(u.y >> 16);
#pragma unroll
      for (int i = 0; i < 4; ++i) v[i] = load_one(&h[i]);
    }
  } else {
#pragma unroll
    for (int i = 0; i < 4; ++i) v[i] = load_one(p + i);
  }
}

// Pulls the norm weight's lines into L2 ahead of the PDL wait (a prefetch cannot return stale data:
// the loads that use it come after the wait). Thread t of a group touches its own quads' lines.
template <typename W>
__device__ __forceinline__ void prefetch_norm_weight(const W* w, int64_t k, int t) {
  for (int64_t q = t; 4 * q < k; q += kNormThreads) {
    asm volatile("prefetch.global.L2 [%0];" ::"l"(w + 4 * q));
  }
}

// Barrier over the group of 256 threads that normalizes one row (id 0: the whole CTA is one group).
__device__ __forceinline__ void norm_group_sync(int group, int groups) {
  if (groups == 1) {
    __syncthreads();
  } else {
    asm volatile("bar.sync %0, %1;" ::"r"(1 + group), "n"(kNormThreads) : "memory");
  }
}

// Q8_1 of 4 values held by lane j (= lane % 8) of the 8 lanes of one block: the block's words go to
// place(j, word j + 1 of the block, word 0 (d | s << 16), half sums of quants (lo: quants 0..15,
// hi: 16..31, dp4a_units.cuh's layout)). Every lane of the warp calls it (shuffles).
template <typename Place>
__device__ __forceinline__ void quantize_quad(const float v[4], Place place) {
  float amax = fmaxf(fmaxf(fabsf(v[0]), fabsf(v[1])), fmaxf(fabsf(v[2]), fabsf(v[3])));
  float sum = q8_1_quad_sum(v);  // then the butterfly: formats.h's q8_1_block_sum order
#pragma unroll
  for (int off = 1; off < 8; off <<= 1) {  // a butterfly: all 8 lanes get the same bits
    amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, off));
    sum = __fadd_rn(sum, __shfl_xor_sync(0xffffffffu, sum, off));
  }
  const float d = __fdiv_rn(amax, 127.0f);
  uint32_t word = 0;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int q = amax == 0.0f ? 0 : static_cast<int>(roundf(__fdiv_rn(v[i], d)));
    word |= (static_cast<uint32_t>(q) & 0xffu) << (8 * i);
  }
  const uint32_t ds = static_cast<uint32_t>(__half_as_ushort(__float2half_rn(d))) |
                      (static_cast<uint32_t>(__half_as_ushort(__float2half_rn(sum))) << 16);
  // Σq over lanes 0..3 (quants 0..15) and 4..7 (16..31): exact integer sums.
  int s = __dp4a(static_cast<int>(word), 0x01010101, 0);
  s += __shfl_xor_sync(0xffffffffu, s, 1);
  s += __shfl_xor_sync(0xffffffffu, s, 2);
  const int other = __shfl_xor_sync(0xffffffffu, s, 4);
  const int j = threadIdx.x & 7;
  const int lo = j < 4 ? s : other, hi = j < 4 ? other : s;
  place(j, word, ds, (static_cast<uint32_t>(lo) & 0xffffu) | (static_cast<uint32_t>(hi) << 16));
}

// One row: y = x * rsqrt(mean(x^2) + eps) * w in fp32, Q8_1 of y; thread t (0..255) of its group.
// The group quantizes the rounds r with r % subs == sub only (the standalone kernel gives a row to
// `subs` CTAs, up to 8; the other callers pass 0, 1): a round's quantization is a serial chain
// (shuffles for each block's max and sum, IEEE divisions behind branches) of ~0.55 us on an H200, and
// a lone group doing all 4 rounds of K = 4096 in a row spent most of the norm's time on them
// (docs/PERFORMANCE.md v14). Every group computes the whole sum of squares itself, in the one order:
// cheap loads and adds.
// place(block, j, word, ds, sq) receives the row's block `block` from its lane j (quantize_quad);
// y_row (optional) receives y in x's type. `wsum`: kNormWarps floats of shared memory for this group.
// The caller has done the PDL wait. Ends with a group barrier (wsum and the placed bytes are free /
// visible to the group afterwards).
template <typename T, typename W, typename Place>
__device__ __forceinline__ void norm_row_q8_1(const T* xr, const W* w, int64_t k, float eps, bool vx, bool vw,
                                              int t, int sub, int subs, int group, int groups, float* wsum,
                                              Place place, T* y_row) {
  const int64_t nq = k / 4;
  const int rounds = static_cast<int>((nq + kNormThreads - 1) / kNormThreads);
  // The group's rounds among the held ones as a bit mask, and its first later round, without a
  // division per round by the runtime `subs` (those sat between the loads and the sums: +0.5 us).
  // nvcc turns this loop into a trip count and an unrolled body on the uniform datapath; the two
  // loop-free forms tried (compares per round; a branch-free mask) measured slower still, through
  // where they made nvcc put the loads (docs/PERFORMANCE.md v14), so the loop stays.
  uint32_t own = 0;
  int first = sub;
  for (; first < kNormRegRounds; first += subs) own |= 1u << first;
  float xv[kNormRegRounds][4], wv[kNormRegRounds][4];
  float sum_sq = 0.0f;
#pragma unroll
  for (int r = 0; r < kNormRegRounds; ++r) {  // x and w of the held rounds: all loads in flight at once
    const int64_t q = static_cast<int64_t>(r) * kNormThreads + t;
    if (q < nq) {
      load_quad(xr + 4 * q, vx, xv[r]);
    } else {
#pragma unroll
      for (int i = 0; i < 4; ++i) xv[r][i] = 0.0f;
    }
    if (q < nq && (own >> r & 1u)) {  // w only where this group quantizes
      load_quad(w + 4 * q, vw, wv[r]);
    } else {
#pragma unroll
      for (int i = 0; i < 4; ++i) wv[r][i] = 0.0f;
    }
  }
#pragma unroll
  for (int r = 0; r < kNormRegRounds; ++r) {
#pragma unroll
    for (int i = 0; i < 4; ++i) sum_sq = __fadd_rn(sum_sq, __fmul_rn(xv[r][i], xv[r][i]));  // +0 for padding
  }
#pragma unroll 1
  for (int r0 = kNormRegRounds; r0 < rounds; r0 += 4) {  // later rounds: 4 loads in flight, added in order
    float c[4][4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t q = static_cast<int64_t>(r0 + j) * kNormThreads + t;
      if (q < nq) {  // q < nq implies r0 + j < rounds
        load_quad(xr + 4 * q, vx, c[j]);
      } else {
#pragma unroll
        for (int i = 0; i < 4; ++i) c[j][i] = 0.0f;
      }
    }
#pragma unroll
    for (int j = 0; j < 4; ++j) {
#pragma unroll
      for (int i = 0; i < 4; ++i) sum_sq = __fadd_rn(sum_sq, __fmul_rn(c[j][i], c[j][i]));
    }
  }
  sum_sq = warp_sum(sum_sq);
  if ((t & 31) == 0) wsum[t >> 5] = sum_sq;
  norm_group_sync(group, groups);
  float total = 0.0f;
#pragma unroll
  for (int i = 0; i < kNormWarps; ++i) total = __fadd_rn(total, wsum[i]);  // in order
  const float scale = rms_scale(total, k, eps);

  auto finish = [&](int64_t q, float v[4], const float wq[4]) {  // every lane of the warp (shuffles)
#pragma unroll
    for (int i = 0; i < 4; ++i) v[i] = __fmul_rn(__fmul_rn(v[i], scale), wq[i]);
    const bool valid = q < nq;
    if (valid && y_row != nullptr) {
#pragma unroll
      for (int i = 0; i < 4; ++i) store_one(v[i], y_row + 4 * q + i);
    }
    quantize_quad(v, [&](int j, uint32_t word, uint32_t ds, uint32_t sq) {
      if (valid) place(q / 8, j, word, ds, sq);
    });
  };
#pragma unroll
  for (int r = 0; r < kNormRegRounds; ++r) {  // uniform over the group
    if (r < rounds && (own >> r & 1u)) finish(static_cast<int64_t>(r) * kNormThreads + t, xv[r], wv[r]);
  }
#pragma unroll 1
  for (int r = first; r < rounds; r += subs) {
    const int64_t q = static_cast<int64_t>(r) * kNormThreads + t;
    float v[4] = {0.0f, 0.0f, 0.0f, 0.0f}, wq[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    if (q < nq) {
      load_quad(xr + 4 * q, vx, v);
      load_quad(w + 4 * q, vw, wq);
    }
    finish(q, v, wq);
  }
  norm_group_sync(group, groups);
}

// The norm a mat-vec CTA runs for itself: rms_norm_mul_q8_1 of `batch` rows of n.x [batch, k], the
// standalone kernel's bytes. The CTA's threads (a multiple of 256) form groups of 256; group g takes
// rows g, g + groups, ... place(row, block, j, word, ds, sq) as in norm_row_q8_1. Prefetches w into L2,
// does the PDL wait, and ends with a CTA barrier.
template <typename T, typename W, typename Place>
__device__ __forceinline__ void cta_norm_q8_1_typed(const NormArgs& n, int batch, int64_t k, float* wsums,
                                                    Place place) {
  const int groups = min(static_cast<int>(blockDim.x) / kNormThreads, kNormMaxGroups);
  const int group = threadIdx.x / kNormThreads, t = threadIdx.x % kNormThreads;
  const T* x = static_cast<const T*>(n.x);
  const W* w = static_cast<const W*>(n.w);
  if (group < groups && n.prefetch) prefetch_norm_weight(w, k, t);
  grid_dependency_wait();
  if (group < groups) {
    for (int b = group; b < batch; b += groups) {
      norm_row_q8_1(x + b * k, w, k, n.eps, (n.vec & 1) != 0, (n.vec & 2) != 0, t, 0, 1, group, groups, wsums + group * kNormWarps,
                    [&](int64_t blk, int j, uint32_t word, uint32_t ds, uint32_t sq) {
                      place(b, blk, j, word, ds, sq);
                    },
                    static_cast<T*>(nullptr));
    }
  }
  __syncthreads();
}

// Static shared memory of cta_norm_q8_1 (launchers leave room for it next to their dynamic share).
constexpr int kNormScratchBytes = kNormMaxGroups * kNormWarps * static_cast<int>(sizeof(float));

// The nine (x type, w type) instantiations behind one switch; callers wrap it in a __noinline__
// function (it runs once per CTA, and inlining nine copies would crowd their main loops).
template <typename Place>
__device__ __forceinline__ void cta_norm_q8_1(const NormArgs& n, int batch, int64_t k, Place place) {
  __shared__ float wsums[kNormScratchBytes / sizeof(float)];  // here, not per type: one copy
  switch (n.types) {
    case 0: return cta_norm_q8_1_typed<float, float>(n, batch, k, wsums, place);
    case 1: return cta_norm_q8_1_typed<float, Half>(n, batch, k, wsums, place);
    case 2: return cta_norm_q8_1_typed<float, Bf16>(n, batch, k, wsums, place);
    case 3: return cta_norm_q8_1_typed<Half, float>(n, batch, k, wsums, place);
    case 4: return cta_norm_q8_1_typed<Half, Half>(n, batch, k, wsums, place);
    case 5: return cta_norm_q8_1_typed<Half, Bf16>(n, batch, k, wsums, place);
    case 6: return cta_norm_q8_1_typed<Bf16, float>(n, batch, k, wsums, place);
    case 7: return cta_norm_q8_1_typed<Bf16, Half>(n, batch, k, wsums, place);
    default: return cta_norm_q8_1_typed<Bf16, Bf16>(n, batch, k, wsums, place);
  }
}

}  // namespace cuda
}  // namespace ggfuse

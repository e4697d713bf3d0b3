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
// the loads that use it come after the wait). Thread t of a group touches its own quads' lines in the
// rounds first, first + step, ... (a CTA of a split row fetches only the rounds it quantizes).
template <typename W>
__device__ __forceinline__ void prefetch_norm_weight(const W* w, int64_t k, int t, int first = 0, int step = 1) {
  for (int64_t q = static_cast<int64_t>(first) * kNormThreads + t; 4 * q < k;
       q += static_cast<int64_t>(step) * kNormThreads) {
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
// kSubs (1, 2, 4 or 8) groups in as many CTAs share the row (the standalone kernel; the other callers
// pass 1 and sub 0): group `sub` (< the row's rounds) quantizes the rounds r with r % kSubs == sub.
// A round's quantization is a serial chain (shuffles for each block's max and sum, IEEE divisions
// behind branches) of ~0.55 us on an H200, and a lone group doing all 4 rounds of K = 4096 in a row
// spent most of the norm's time on them (docs/PERFORMANCE.md v14). Every group computes the whole sum
// of squares itself, in the one order: cheap loads and adds.
// The count is a template parameter because every runtime form of it (a mask of owned rounds, compares
// per round) made nvcc put branches or unpacking between the x loads, and cost 0.3-0.7 us even at one
// group per row (v14, v15). A split group loads its first round's x and w into registers of their own
// (a second load of an x quad that the sum also reads: no indexing of the held rounds by `sub`).
// place(block, j, word, ds, sq) receives the row's block `block` from its lane j (quantize_quad);
// y_row (optional) receives y in x's type. `wsum`: kNormWarps floats of shared memory for this group.
// The caller has done the PDL wait. Ends with a group barrier (wsum and the placed bytes are free /
// visible to the group afterwards).
template <int kSubs, typename T, typename W, typename Place>
__device__ __forceinline__ void norm_row_q8_1(const T* xr, const W* w, int64_t k, float eps, bool vx, bool vw,
                                              int t, int sub, int group, int groups, float* wsum,
                                              Place place, T* y_row) {
  static_assert(kSubs == 1 || kSubs == 2 || kSubs == 4 || kSubs == 8, "kSubs: 1, 2, 4 or 8");
  const int nq = static_cast<int>(k / 4);  // quads in the row: K < 2^31 (the launchers check it)
  const int rounds = (nq + kNormThreads - 1) / kNormThreads;
  // A quad past the row reads the row's first quad and becomes zeros: a load without a branch around
  // it, so that nvcc issues all of them before the first use (behind branches it had put each load's
  // unpacking right after it, a load-use stall per round).
  // 32-bit offsets: 64-bit address arithmetic doubled the instructions between the PDL wait and the
  // last load.
  auto load_or_zero = [&](const auto* base, bool vec, int q, float v[4]) {
    const bool inside = q < nq;
    load_quad(base + (inside ? 4 * q : 0), vec, v);
#pragma unroll
    for (int i = 0; i < 4; ++i) v[i] = inside ? v[i] : 0.0f;
  };
  // Issued together, before any arithmetic: the held rounds' x (and w with one group per row), or
  // the group's first own round's x and w.
  float xv[kNormRegRounds][4];
  float wv[kSubs == 1 ? kNormRegRounds : 1][4];
  float xo[4];
#pragma unroll
  for (int r = 0; r < kNormRegRounds; ++r) load_or_zero(xr, vx, r * kNormThreads + t, xv[r]);
  const int q_own = sub * kNormThreads + t;
  if constexpr (kSubs == 1) {
#pragma unroll
    for (int r = 0; r < kNormRegRounds; ++r) load_or_zero(w, vw, r * kNormThreads + t, wv[r]);
  } else {
    load_or_zero(xr, vx, q_own, xo);
    load_or_zero(w, vw, q_own, wv[0]);
  }
  float sum_sq = 0.0f;
#pragma unroll
  for (int r = 0; r < kNormRegRounds; ++r) {
#pragma unroll
    for (int i = 0; i < 4; ++i) sum_sq = __fadd_rn(sum_sq, __fmul_rn(xv[r][i], xv[r][i]));  // +0 for padding
  }
#pragma unroll 1
  for (int r0 = kNormRegRounds; r0 < rounds; r0 += 4) {  // later rounds: 4 loads in flight, added in order
    float c[4][4];
#pragma unroll
    for (int j = 0; j < 4; ++j) load_or_zero(xr, vx, (r0 + j) * kNormThreads + t, c[j]);
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

  auto finish = [&](int q, float v[4], const float wq[4]) {  // every lane of the warp (shuffles)
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
  int later;  // the group's first round not in registers
  if constexpr (kSubs == 1) {
#pragma unroll
    for (int r = 0; r < kNormRegRounds; ++r) {  // uniform over the group
      if (r < rounds) finish(r * kNormThreads + t, xv[r], wv[r]);
    }
    later = kNormRegRounds;
  } else {
    if (sub < rounds) finish(q_own, xo, wv[0]);
    later = sub + kSubs;
  }
#pragma unroll 1
  for (int r = later; r < rounds; r += kSubs) {
    const int q = r * kNormThreads + t;
    float v[4], wq[4];
    load_or_zero(xr, vx, q, v);
    load_or_zero(w, vw, q, wq);
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
      norm_row_q8_1<1>(x + b * k, w, k, n.eps, (n.vec & 1) != 0, (n.vec & 2) != 0, t, 0, group, groups, wsums + group * kNormWarps,
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

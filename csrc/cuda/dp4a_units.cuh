// The pieces of the dp4a mat-vec shared by its two kernels (SPEC §2, §3): mat_vec_dp4a.cu reads the
// weights from global memory, mat_vec_stream.cu from shared memory after a bulk copy. Each weight
// row is split by the warp's lanes into "units" (a K-quant unit: two 32-value sub-blocks of one
// super-block; a 32-block type's unit: one block); a unit is loaded into registers (load_*, templated
// on where the bytes are) and dotted with the Q8_1 activations staged in shared memory (dot_*), whose
// whole-block integer sums go through decode.h's formulas, so every per-block fp32 result is the
// CPU's. mat_vec_dp4a.cu's header comment has the design and the measurements behind it.
#pragma once

#include "common.cuh"
#include "ggfuse/decode.h"

namespace ggfuse {
namespace cuda {
namespace dp4a {

constexpr int kDpWarps = 8;
constexpr int kDpThreads = kDpWarps * 32;
constexpr int kDpMaxCols = 8;
constexpr uint32_t kNib = 0x0F0F0F0Fu;
constexpr uint32_t kOne = 0x01010101u;
constexpr int kQ8Bytes = sizeof(BlockQ8_1);

// ---- loads: the weight readers are templated on where the bytes are ----
// Weights in global memory (mat_vec_dp4a.cu), through the read-only path, allocating in L1: every
// load here reads part of a 32-byte sector whose other bytes the lane's next load, or a neighbouring
// lane's, reads soon after, and finds in L1 instead of fetching the sector from L2 again.
//   * the 4- and 2-byte word loads of the 2-byte aligned types (Q4_0, Q5_0, Q8_0, Q6_K: lanes 18 to
//     210 bytes apart; each warp-wide word load touches the sectors of the neighbouring lanes'
//     blocks): v7 measured them 2x slower than their bytes with L1::no_allocate;
//   * the 16-byte loads (Q4_K / Q5_K units, Q4_0's 4-block units) each read half a sector, and the
//     two lanes of a Q4_0 144-byte group both read its middle granule: v17 measured QKV Q4_0 at B=1
//     8.54 -> 7.69 us on the H100 with it, and on the H200 Q4_K and Q4_K+Q6_K at B <= 2 up to 12-16%
//     faster at K >= 5120 than with L1::no_allocate (docs/PERFORMANCE.md v17).
struct GlobalLd {
  static __device__ __forceinline__ uint4 ld16(const uint8_t* p) {
    uint4 v;
    asm volatile("ld.global.nc.v4.u32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(p));
    return v;
  }
  static __device__ __forceinline__ uint32_t ld4(const uint8_t* p) {
    uint32_t v;
    asm volatile("ld.global.nc.u32 %0, [%1];" : "=r"(v) : "l"(p));
    return v;
  }
  static __device__ __forceinline__ uint32_t ld2(const uint8_t* p) {
    unsigned short v;
    asm volatile("ld.global.nc.u16 %0, [%1];" : "=h"(v) : "l"(p));
    return v;
  }
};
// Weights already copied into shared memory (mat_vec_stream.cu): `p` is a generic pointer into the
// CTA's shared window; ld.shared on its 32-bit shared address (no generic-to-shared resolution per
// load). The copy keeps each byte's address mod 16, so the alignment reasoning of the global path
// holds unchanged.
struct SharedLd {
  static __device__ __forceinline__ uint32_t addr(const uint8_t* p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
  }
  static __device__ __forceinline__ uint4 ld16(const uint8_t* p) {
    uint4 v;
    asm volatile("ld.shared.v4.u32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "r"(addr(p)));
    return v;
  }
  static __device__ __forceinline__ uint32_t ld4(const uint8_t* p) {
    uint32_t v;
    asm volatile("ld.shared.u32 %0, [%1];" : "=r"(v) : "r"(addr(p)));
    return v;
  }
  static __device__ __forceinline__ uint32_t ld2(const uint8_t* p) {
    unsigned short v;
    asm volatile("ld.shared.u16 %0, [%1];" : "=h"(v) : "r"(addr(p)));
    return v;
  }
};
// Activations: plain loads (written by the previous kernel; read only after the PDL wait).
__device__ __forceinline__ uint32_t ldx(const uint8_t* p) { return *reinterpret_cast<const uint32_t*>(p); }

// A Q8_1 block from the CTA's shared copy: d | s << 16, the 32 quants, and the sums of quants
// 0..15 (low 16 bits, signed) and 16..31 (high 16 bits) computed while staging.
struct XBlock {
  uint32_t ds;
  int q[8];
  uint32_t sq;
};
// Shared copy of the launch's activations: block i (= row * K/32 + block) at words 9i..9i+8 (the Q8_1
// bytes; a stride of 9 words keeps lanes reading consecutive blocks on distinct banks), then one
// word of half sums per block.
__device__ __forceinline__ void load_x(const uint32_t* sx, int nblk, int i, XBlock& xb) {
  xb.ds = sx[9 * i];
#pragma unroll
  for (int j = 0; j < 8; ++j) xb.q[j] = static_cast<int>(sx[9 * i + 1 + j]);
  xb.sq = sx[9 * nblk + i];
}
__device__ __forceinline__ int sq_lo(uint32_t sq) { return static_cast<int>(static_cast<int16_t>(sq & 0xffffu)); }
__device__ __forceinline__ int sq_hi(uint32_t sq) { return static_cast<int>(sq) >> 16; }

// Block i of the shared copy from its 9 Q8_1 words (d | s << 16, then the 32 quants), with its half
// sums of quants.
__device__ __forceinline__ void put_x_block(const uint32_t (&w)[9], int nblk, int i, uint32_t* sx) {
  int lo = 0, hi = 0;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    lo = __dp4a(static_cast<int>(w[1 + j]), static_cast<int>(kOne), lo);
    hi = __dp4a(static_cast<int>(w[5 + j]), static_cast<int>(kOne), hi);
  }
#pragma unroll
  for (int j = 0; j < 9; ++j) sx[9 * i + j] = w[j];
  sx[9 * nblk + i] = (static_cast<uint32_t>(lo) & 0xffffu) | (static_cast<uint32_t>(hi) << 16);
}

// After the PDL wait: every thread of the CTA copies blocks of x into shared memory (coalesced
// 4-byte loads; the rows are contiguous) with their half sums; ends with a CTA barrier.
__device__ __forceinline__ void stage_x(const uint8_t* x, int nblk, uint32_t* sx) {
  grid_dependency_wait();
#pragma unroll 1
  for (int i = threadIdx.x; i < nblk; i += blockDim.x) {
    const uint8_t* src = x + static_cast<int64_t>(i) * kQ8Bytes;
    uint32_t w[9];
#pragma unroll
    for (int j = 0; j < 9; ++j) w[j] = ldx(src + 4 * j);
    put_x_block(w, nblk, i, sx);
  }
  __syncthreads();
}

// Q5_0's fifth bits: 4 bits of v to bit 4 of each of 4 bytes.
__device__ __forceinline__ uint32_t spread4(uint32_t v) { return ((v * 0x00204081u) & kOne) << 4; }

// ---- per-type units ----
// The 2-byte aligned 32-value blocks: `n` aligned words from the block start rounded down to 4, the
// last one a 16-bit load when the block is 4-byte aligned (so nothing past the block is read).
template <int kWords>
struct WordsU {
  uint32_t a[kWords];
  uint32_t odd;  // 16 when the block starts at 2 mod 4, else 0
};
template <class Ld, int kWords>
__device__ __forceinline__ void load_words(const uint8_t* blk, WordsU<kWords>& w) {
  const uintptr_t addr = reinterpret_cast<uintptr_t>(blk);
  const uint8_t* al = reinterpret_cast<const uint8_t*>(addr & ~uintptr_t{3});
  const bool odd = (addr & 2u) != 0;
#pragma unroll
  for (int i = 0; i < kWords - 1; ++i) w.a[i] = Ld::ld4(al + 4 * i);
  w.a[kWords - 1] = odd ? Ld::ld4(al + 4 * (kWords - 1)) : Ld::ld2(al + 4 * (kWords - 1));
  w.odd = odd ? 16u : 0u;
}
// Word i of the block's bytes starting at byte 2 (after the fp16 d).
template <int kWords>
__device__ __forceinline__ uint32_t after_d(const WordsU<kWords>& w, int i) {
  return __funnelshift_rc(w.a[i], w.a[i + 1], 16u + w.odd);
}
template <int kWords>
__device__ __forceinline__ uint32_t d_bits(const WordsU<kWords>& w) {
  return (w.a[0] >> w.odd) & 0xffffu;
}

// Q4_K / Q5_K unit: header (d, dmin, scales), 32 qs bytes, and for Q5_K the 32 qh bytes.
template <bool kQ5>
struct UnitK {
  uint4 hdr, q0, q1, h0, h1;
};
template <class Ld, bool kQ5>
__device__ __forceinline__ void load_k(const uint8_t* row, int unit, UnitK<kQ5>& u) {
  const int sb = unit >> 2, pr = unit & 3;
  const uint8_t* b = row + sb * (kQ5 ? 176 : 144);
  u.hdr = Ld::ld16(b);
  const int qs = (kQ5 ? 48 : 16) + 32 * pr;
  u.q0 = Ld::ld16(b + qs);
  u.q1 = Ld::ld16(b + qs + 16);
  if constexpr (kQ5) {
    u.h0 = Ld::ld16(b + 16);
    u.h1 = Ld::ld16(b + 32);
  }
}

template <int kCols, bool kQ5>
__device__ __forceinline__ void dot_k(int x_blocks, const uint32_t* sx, const UnitK<kQ5>& u, int unit,
                                      float (&acc)[kCols]) {
  const int sb = unit >> 2, pr = unit & 3;
  // 6-bit scales and mins of sub-blocks 2pr, 2pr+1 (k_scale_min, four at a time).
  const uint32_t s0 = u.hdr.y, s1 = u.hdr.z, s2 = u.hdr.w;  // scales bytes 0..3, 4..7, 8..11
  const uint32_t scw = pr < 2 ? (s0 & 0x3F3F3F3Fu) : ((s2 & kNib) | ((s0 >> 2) & 0x30303030u));
  const uint32_t mw = pr < 2 ? (s1 & 0x3F3F3F3Fu) : (((s2 >> 4) & kNib) | ((s1 >> 2) & 0x30303030u));
  const uint32_t sh = 16u * (pr & 1);
  const float d = h2f(u.hdr.x), dmin = h2f(u.hdr.x >> 16);
  float dsc[2], dmn[2];
#pragma unroll
  for (int e = 0; e < 2; ++e) {
    dsc[e] = d * static_cast<float>((scw >> (sh + 8 * e)) & 0xffu);
    dmn[e] = dmin * static_cast<float>((mw >> (sh + 8 * e)) & 0xffu);
  }
  const uint32_t qw[8] = {u.q0.x, u.q0.y, u.q0.z, u.q0.w, u.q1.x, u.q1.y, u.q1.z, u.q1.w};
  uint32_t hw[8];
  if constexpr (kQ5) {
    hw[0] = u.h0.x; hw[1] = u.h0.y; hw[2] = u.h0.z; hw[3] = u.h0.w;
    hw[4] = u.h1.x; hw[5] = u.h1.y; hw[6] = u.h1.z; hw[7] = u.h1.w;
  }
  int w[2][8];
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    uint32_t lo = qw[i] & kNib, hi = (qw[i] >> 4) & kNib;
    if constexpr (kQ5) {
      lo |= ((hw[i] >> (2 * pr)) & kOne) << 4;
      hi |= ((hw[i] >> (2 * pr + 1)) & kOne) << 4;
    }
    w[0][i] = static_cast<int>(lo);
    w[1][i] = static_cast<int>(hi);
  }
  const int blk = sb * 8 + 2 * pr;
  const int nblk = kCols * x_blocks;
#pragma unroll
  for (int c = 0; c < kCols; ++c) {
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      XBlock xb;
      load_x(sx, nblk, c * x_blocks + blk + e, xb);
      int sumi = 0;
#pragma unroll
      for (int i = 0; i < 8; ++i) sumi = __dp4a(w[e][i], xb.q[i], sumi);
      const int sumq = sq_lo(xb.sq) + sq_hi(xb.sq);
      acc[c] += dot_k_sub(dsc[e], dmn[e], h2f(xb.ds), sumi, sumq);
    }
  }
}

// Q6_K unit (super-block sb, half h, u = 0/1): ql bytes [64h + 32u, +32) (low nibbles: sub-block
// 4h + u, high nibbles: 4h + 2 + u), qh bytes [128 + 32h, +32), the four int8 scales and d.
struct UnitQ6 {
  uint32_t ql[9], qh[9];
  uint32_t sa, sb2, d;  // scales[2sA..2sA+1], scales[2sB..2sB+1], d (16 bits each)
  uint32_t sh;          // 16 when the super-block starts at 2 mod 4
};
template <class Ld>
__device__ __forceinline__ void load_q6(const uint8_t* row, int unit, UnitQ6& u) {
  const int sb = unit >> 2, h = (unit >> 1) & 1, uu = unit & 1;
  const uint8_t* b = row + sb * 210;
  const uintptr_t addr = reinterpret_cast<uintptr_t>(b);
  const uint8_t* al = reinterpret_cast<const uint8_t*>(addr & ~uintptr_t{3});
  // 9 aligned words cover the 32 bytes at either phase; the ninth never leaves the block.
  const uint8_t* l = al + 64 * h + 32 * uu;
  const uint8_t* q = al + 128 + 32 * h;
#pragma unroll
  for (int i = 0; i < 9; ++i) u.ql[i] = Ld::ld4(l + 4 * i);
#pragma unroll
  for (int i = 0; i < 9; ++i) u.qh[i] = Ld::ld4(q + 4 * i);
  const int sA = 4 * h + uu;
  u.sa = Ld::ld2(b + 192 + 2 * sA);
  u.sb2 = Ld::ld2(b + 192 + 2 * (sA + 2));
  u.d = Ld::ld2(b + 208);
  u.sh = static_cast<uint32_t>(addr & 2u) * 8u;
}

template <int kCols>
__device__ __forceinline__ void dot_q6(int x_blocks, const uint32_t* sx, const UnitQ6& u, int unit,
                                       float (&acc)[kCols]) {
  const int sb = unit >> 2, h = (unit >> 1) & 1, uu = unit & 1;
  const float d = h2f(u.d);
  // d * scales[s] for the four 16-value groups: A low, A high, B low, B high
  const float dsc[4] = {d * static_cast<float>(static_cast<int8_t>(u.sa & 0xff)),
                        d * static_cast<float>(static_cast<int8_t>(u.sa >> 8)),
                        d * static_cast<float>(static_cast<int8_t>(u.sb2 & 0xff)),
                        d * static_cast<float>(static_cast<int8_t>(u.sb2 >> 8))};
  int w[2][8];  // unsigned 0..63 quants of sub-blocks A and B (the -32 goes through Σq_x)
  const uint32_t shA = 2u * uu, shB = 4u + 2u * uu;
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const uint32_t ql = __funnelshift_r(u.ql[i], u.ql[i + 1], u.sh);
    const uint32_t qh = __funnelshift_r(u.qh[i], u.qh[i + 1], u.sh);
    w[0][i] = static_cast<int>((ql & kNib) | (((qh >> shA) & 0x03030303u) << 4));
    w[1][i] = static_cast<int>(((ql >> 4) & kNib) | (((qh >> shB) & 0x03030303u) << 4));
  }
  const int blkA = sb * 8 + 4 * h + uu;
  const int nblk = kCols * x_blocks;
#pragma unroll
  for (int c = 0; c < kCols; ++c) {
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      XBlock xb;
      load_x(sx, nblk, c * x_blocks + blkA + 2 * e, xb);  // sub-block B is two Q8_1 blocks after A
      const float dx = h2f(xb.ds);
#pragma unroll
      for (int g = 0; g < 2; ++g) {
        int sumi = 0;
#pragma unroll
        for (int i = 4 * g; i < 4 * g + 4; ++i) sumi = __dp4a(w[e][i], xb.q[i], sumi);
        const int sumq = g == 0 ? sq_lo(xb.sq) : sq_hi(xb.sq);
        acc[c] += dot_q6_k_sub(dsc[2 * e + g], dx, sumi - 32 * sumq);  // exact: Σ(q-32)x
      }
    }
  }
}

// Q4_0 (18 bytes: 5 words), Q5_0 (22: 6), Q8_0 (34: 9).
template <int32_t kType>
constexpr int words_of() { return kType == kQ4_0 ? 5 : kType == kQ5_0 ? 6 : 9; }
template <int32_t kType>
constexpr int bytes_of() { return kType == kQ4_0 ? 18 : kType == kQ5_0 ? 22 : 34; }

template <int kCols, int32_t kType>
__device__ __forceinline__ void dot_b32(int x_blocks, const uint32_t* sx, const WordsU<words_of<kType>()>& u,
                                        int unit, float (&acc)[kCols]) {
  const float dw = h2f(d_bits(u));
  int w[8];
  if constexpr (kType == kQ4_0) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const uint32_t q = after_d(u, i);
      w[i] = static_cast<int>(q & kNib);
      w[i + 4] = static_cast<int>((q >> 4) & kNib);
    }
  } else if constexpr (kType == kQ5_0) {
    const uint32_t qh = after_d(u, 0);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const uint32_t q = after_d(u, i + 1);
      w[i] = static_cast<int>((q & kNib) | spread4((qh >> (4 * i)) & 15u));
      w[i + 4] = static_cast<int>(((q >> 4) & kNib) | spread4((qh >> (16 + 4 * i)) & 15u));
    }
  } else {
#pragma unroll
    for (int i = 0; i < 8; ++i) w[i] = static_cast<int>(after_d(u, i));
  }
#pragma unroll
  for (int c = 0; c < kCols; ++c) {
    XBlock xb;
    load_x(sx, kCols * x_blocks, c * x_blocks + unit, xb);
    int sumi = 0;
#pragma unroll
    for (int i = 0; i < 8; ++i) sumi = __dp4a(w[i], xb.q[i], sumi);
    const float dx = h2f(xb.ds);
    if constexpr (kType == kQ4_0) {
      acc[c] += dot_q4_0(dw, dx, h2f(xb.ds >> 16), sumi);
    } else if constexpr (kType == kQ5_0) {
      acc[c] += dot_q5_0(dw, dx, h2f(xb.ds >> 16), sumi);
    } else {
      acc[c] += dot_q8_0(dw, dx, sumi);
    }
  }
}


// Q4_0 in 16-byte loads: a unit is 4 blocks (128 values), half of a 144-byte group of 8 blocks that
// starts on a 16-byte boundary (the row does, and K % 256 == 0). The lane of the group's first half
// loads granules 0..4 (bytes 0..79), that of the second half granules 4..8 (bytes 64..143): every
// byte of the unit, no byte outside the group. (One block per lane took aligned 4-byte words, which
// fetch each sector several times: 2x slower than its bytes, hence staging by default before.) Both
// halves put their blocks at the same phases mod 4 (0, 18, 36, 54 and 8, 26, 44, 62 bytes), so after
// one select of the window's start (words 0 or 2) the decode is the same straight-line code.
struct UnitQ4_0x4 {
  uint4 g[5];
};
template <class Ld>
__device__ __forceinline__ void load_q4_0x4(const uint8_t* row, int unit, UnitQ4_0x4& u) {
  const uint8_t* b = row + 144 * (unit >> 1) + 64 * (unit & 1);
#pragma unroll
  for (int i = 0; i < 5; ++i) u.g[i] = Ld::ld16(b + 16 * i);
}

template <int kCols>
__device__ __forceinline__ void dot_q4_0x4(int x_blocks, const uint32_t* sx, const UnitQ4_0x4& u, int unit,
                                           float (&acc)[kCols]) {
  const bool second = (unit & 1) != 0;
  uint32_t a[20];
#pragma unroll
  for (int i = 0; i < 5; ++i) a[4 * i] = u.g[i].x, a[4 * i + 1] = u.g[i].y, a[4 * i + 2] = u.g[i].z, a[4 * i + 3] = u.g[i].w;
  uint32_t s[18];  // the unit's 72 bytes from word 0
#pragma unroll
  for (int j = 0; j < 18; ++j) s[j] = second ? a[j + 2] : a[j];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    constexpr int kBlockBytes = 18;
    const int d_byte = kBlockBytes * i, q_byte = d_byte + 2;  // compile-time after unrolling
    const float dw = h2f(s[d_byte / 4] >> (8 * (d_byte % 4)));
    int w[8];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int wi = q_byte / 4 + j;
      const uint32_t q = q_byte % 4 == 0 ? s[wi] : __funnelshift_r(s[wi], s[wi + 1], 8 * (q_byte % 4));
      w[j] = static_cast<int>(q & kNib);
      w[j + 4] = static_cast<int>((q >> 4) & kNib);
    }
    const int blk = 4 * unit + i;
#pragma unroll
    for (int c = 0; c < kCols; ++c) {
      XBlock xb;
      load_x(sx, kCols * x_blocks, c * x_blocks + blk, xb);
      int sumi = 0;
#pragma unroll
      for (int j = 0; j < 8; ++j) sumi = __dp4a(w[j], xb.q[j], sumi);
      acc[c] += dot_q4_0(dw, h2f(xb.ds), h2f(xb.ds >> 16), sumi);
    }
  }
}

// The lanes' partial sums of a row summed over the warp by a fixed butterfly (every lane gets the
// totals): the one reduction order of every dp4a row, so results are deterministic.
template <int kCols>
__device__ __forceinline__ void sum_over_warp(float (&acc)[kCols]) {
#pragma unroll
  for (int c = 0; c < kCols; ++c) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) acc[c] += __shfl_xor_sync(0xffffffffu, acc[c], o);
  }
}

// One row's units for this lane (lane, lane + 32, ...), the next unit loaded before the current one
// is used. `first` runs once, after the lane's first load (the dp4a kernel's PDL wait and x copy).
template <int kCols, typename Unit, typename Load, typename Dot, typename First>
__device__ __forceinline__ void run_row(int n_units, int lane, Load load, Dot dot, float (&acc)[kCols],
                                        bool first, First first_fn) {
  Unit cur;
  int u = lane;
  if (u < n_units) load(u, cur);
  if (first) first_fn();
  while (u < n_units) {
    Unit next;
    const int un = u + 32;
    if (un < n_units) load(un, next);
    dot(cur, u, acc);
    cur = next;
    u = un;
  }
}

// A whole row (warp-wide) of type kType at `row` (in memory Ld): the lane's partial sums in acc,
// then summed over the warp (every lane gets the totals). `first`/`first_fn` as in run_row. `wide`:
// Q4_0 rows read in 16-byte loads (UnitQ4_0x4, where wide_units_ok allows).
template <int kCols, int32_t kType, class Ld, typename First>
__device__ __forceinline__ void row_dot_typed(const uint8_t* row, int x_blocks, const uint32_t* sx, int lane,
                                              float (&acc)[kCols], bool first, First first_fn, bool wide) {
  const int nb = x_blocks;
  if (kType == kQ4_0 && kCols == 1 && wide) {  // B = 1 only (wide_units_ok)
    run_row<kCols, UnitQ4_0x4>(
        nb / 4, lane, [&](int un, UnitQ4_0x4& w) { load_q4_0x4<Ld>(row, un, w); },
        [&](const UnitQ4_0x4& w, int un, float (&a)[kCols]) { dot_q4_0x4<kCols>(nb, sx, w, un, a); }, acc, first,
        first_fn);
  } else if constexpr (kType == kQ4_K || kType == kQ5_K) {
    constexpr bool kQ5 = kType == kQ5_K;
    run_row<kCols, UnitK<kQ5>>(
        nb / 2, lane, [&](int un, UnitK<kQ5>& w) { load_k<Ld, kQ5>(row, un, w); },
        [&](const UnitK<kQ5>& w, int un, float (&a)[kCols]) { dot_k<kCols, kQ5>(nb, sx, w, un, a); }, acc, first,
        first_fn);
  } else if constexpr (kType == kQ6_K) {
    run_row<kCols, UnitQ6>(
        nb / 2, lane, [&](int un, UnitQ6& w) { load_q6<Ld>(row, un, w); },
        [&](const UnitQ6& w, int un, float (&a)[kCols]) { dot_q6<kCols>(nb, sx, w, un, a); }, acc, first,
        first_fn);
  } else {  // Q4_0, Q5_0, Q8_0
    constexpr int kW = words_of<kType>();
    run_row<kCols, WordsU<kW>>(
        nb, lane, [&](int un, WordsU<kW>& w) { load_words<Ld, kW>(row + un * bytes_of<kType>(), w); },
        [&](const WordsU<kW>& w, int un, float (&a)[kCols]) { dot_b32<kCols, kType>(nb, sx, w, un, a); }, acc,
        first, first_fn);
  }
  sum_over_warp(acc);
}

// A warp's two rows of one type as one sequence of units (row A's, then row B's), so that each
// lane's first unit of row B is loaded while it computes its last unit of row A, not after row A's
// warp reduction: a warp otherwise waits one memory round trip per row. Each row's units go through
// the same lanes in the same order as run_row's, so each row's sum has the same bits. (Where the
// kernel uses it, and what it measured: mat_vec_dp4a.cu row_pairs_for.)
template <int kCols, typename Unit, typename Load, typename Dot, typename First>
__device__ __forceinline__ void run_row_pair(int n_units, int lane, Load load, Dot dot, float (&acc0)[kCols],
                                             float (&acc1)[kCols], bool first, First first_fn) {
  const int total = 2 * n_units;
  Unit cur;
  int u = lane;
  if (u < total) load(u >= n_units, u >= n_units ? u - n_units : u, cur);
  if (first) first_fn();
  while (u < total) {
    Unit next;
    const int un = u + 32;
    if (un < total) load(un >= n_units, un >= n_units ? un - n_units : un, next);
    if (u < n_units) {
      dot(cur, u, acc0);
    } else {
      dot(cur, u - n_units, acc1);
    }
    cur = next;
    u = un;
  }
}

// Whether row_pair_dot takes rows of this type: those read in 16-byte units from global memory
// (Q4_K, Q5_K; Q4_0 where `wide`, at B = 1).
__device__ __forceinline__ bool pair_ok(int32_t type, bool wide, int cols) {
  return type == kQ4_K || type == kQ5_K || (type == kQ4_0 && wide && cols == 1);
}

// Rows A and B (warp-wide) of type kType, as row_dot_typed: the totals of row A in acc0, of B in acc1.
template <int kCols, int32_t kType, class Ld, typename First>
__device__ __forceinline__ void row_pair_dot_typed(const uint8_t* row_a, const uint8_t* row_b, int x_blocks,
                                                   const uint32_t* sx, int lane, float (&acc0)[kCols],
                                                   float (&acc1)[kCols], bool first, First first_fn) {
  const int nb = x_blocks;
  if constexpr (kType == kQ4_0) {
    if constexpr (kCols == 1) {
      run_row_pair<kCols, UnitQ4_0x4>(
          nb / 4, lane, [&](bool b, int un, UnitQ4_0x4& w) { load_q4_0x4<Ld>(b ? row_b : row_a, un, w); },
          [&](const UnitQ4_0x4& w, int un, float (&a)[kCols]) { dot_q4_0x4<kCols>(nb, sx, w, un, a); }, acc0,
          acc1, first, first_fn);
    }
  } else {
    constexpr bool kQ5 = kType == kQ5_K;
    run_row_pair<kCols, UnitK<kQ5>>(
        nb / 2, lane, [&](bool b, int un, UnitK<kQ5>& w) { load_k<Ld, kQ5>(b ? row_b : row_a, un, w); },
        [&](const UnitK<kQ5>& w, int un, float (&a)[kCols]) { dot_k<kCols, kQ5>(nb, sx, w, un, a); }, acc0, acc1,
        first, first_fn);
  }
  sum_over_warp(acc0);
  sum_over_warp(acc1);
}
template <int kCols, class Ld, typename First>
__device__ __forceinline__ void row_pair_dot(int32_t type, const uint8_t* row_a, const uint8_t* row_b, int x_blocks,
                                             const uint32_t* sx, int lane, float (&acc0)[kCols],
                                             float (&acc1)[kCols], bool first, First first_fn) {
  switch (type) {
    case kQ4_K: return row_pair_dot_typed<kCols, kQ4_K, Ld>(row_a, row_b, x_blocks, sx, lane, acc0, acc1, first, first_fn);
    case kQ5_K: return row_pair_dot_typed<kCols, kQ5_K, Ld>(row_a, row_b, x_blocks, sx, lane, acc0, acc1, first, first_fn);
    default: return row_pair_dot_typed<kCols, kQ4_0, Ld>(row_a, row_b, x_blocks, sx, lane, acc0, acc1, first, first_fn);
  }
}

// The same for a run-time type (one of the six mat-vec types).
template <int kCols, class Ld, typename First>
__device__ __forceinline__ void row_dot(int32_t type, const uint8_t* row, int x_blocks, const uint32_t* sx,
                                        int lane, float (&acc)[kCols], bool first, First first_fn, bool wide) {
  switch (type) {
    case kQ4_K: return row_dot_typed<kCols, kQ4_K, Ld>(row, x_blocks, sx, lane, acc, first, first_fn, false);
    case kQ5_K: return row_dot_typed<kCols, kQ5_K, Ld>(row, x_blocks, sx, lane, acc, first, first_fn, false);
    case kQ6_K: return row_dot_typed<kCols, kQ6_K, Ld>(row, x_blocks, sx, lane, acc, first, first_fn, false);
    case kQ4_0: return row_dot_typed<kCols, kQ4_0, Ld>(row, x_blocks, sx, lane, acc, first, first_fn, wide);
    case kQ5_0: return row_dot_typed<kCols, kQ5_0, Ld>(row, x_blocks, sx, lane, acc, first, first_fn, false);
    default: return row_dot_typed<kCols, kQ8_0, Ld>(row, x_blocks, sx, lane, acc, first, first_fn, false);
  }
}

// Whether a segment's rows take the 16-byte-load units (`wide`): Q4_0 with K % 256 == 0 (144-byte
// groups on 16-byte boundaries: the segment starts on one, and rows are multiples of 16 bytes), at
// B = 1 only. Measured on the H200 (QKV 4096 -> 6144, mat-vec alone, us; docs/PERFORMANCE.md v15):
// B = 1 6.38 against 6.92 staged, but B = 2 8.85 against 7.86, so B = 2 stays staged. (A Q6_K unit
// of 16-byte loads, moved to its phase by selects, measured slower than staging at K = 4096: 7.65
// against 6.99 for Q4_K+Q6_K at B = 1, and was dropped.) Off with GGFUSE_MV_WIDE=0 (an experiment
// knob, read once).
inline bool wide_units_ok(int32_t type, int64_t k, int64_t byte_offset, int64_t batch) {
  static const bool on = env_int("GGFUSE_MV_WIDE", 1) != 0;
  return on && batch == 1 && type == kQ4_0 && k % 256 == 0 && byte_offset % 16 == 0;
}

}  // namespace dp4a
}  // namespace cuda
}  // namespace ggfuse

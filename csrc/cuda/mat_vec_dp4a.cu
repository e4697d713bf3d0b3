// Small-batch (B = 1..8) fused multi-segment mat-vec with Q8_1 activations: dp4a instead of tensor
// cores (SPEC §2, §3). Same contract as mat_vec.cu's kernel; mat_vec_q8_1 picks one per launch by
// batch chunk and types (measured: this one for Q4_K-only weights at <= 2 rows; docs/PERFORMANCE.md v7).
//
// Design (docs/PERFORMANCE.md has the measurements):
//   * each warp owns one weight row, its 32 lanes split K into "units": a Q4_K / Q5_K / Q6_K unit is
//     two 32-value sub-blocks of one super-block (4 units per super-block), a Q4_0 / Q5_0 / Q8_0 unit
//     one block. Every lane does useful work at every batch size (no MMA columns or lanes idle).
//   * weights go global -> registers with ld.global.nc.L1::no_allocate: 16-byte loads for Q4_K / Q5_K
//     (always 16-byte aligned), aligned 4-byte words + funnel shifts for the 2-byte aligned types
//     (Q4_0, Q5_0, Q8_0, Q6_K), never reading outside the segment. The next unit's weights are loaded
//     while the current one is computed (software pipelining: two units in flight per lane).
//   * the integer dot products use __dp4a on unpacked nibbles (mask 0x0F0F0F0F / shift 4; fifth and
//     sixth bits spread in with word operations), Σq_x with dp4a against 0x01010101; the integer sums
//     are whole-block (or whole 16-value Q6_K group) sums and go through decode.h's dot_* formulas,
//     so the per-block fp32 results are the CPU's; lanes accumulate their units in order and the warp
//     reduces with a fixed butterfly: deterministic.
//   * activations (Q8_1, <= 8 rows) are copied into shared memory once per CTA after the PDL wait,
//     with each block's two half sums of quants (Σq_x for the K-quants' min term and Q6_K's -32), at
//     a 9-word stride so lanes reading different blocks hit different banks; each warp loads its
//     first weight unit before the wait. (Reading them straight from global/L1 with 4-byte loads
//     at a 36-byte stride across lanes measured 1.5-4x slower at B >= 2: L1 wavefronts.)
//   * 8 warps per CTA, 2 rows per warp: a CTA per 16 rows, 72-80 registers, ~3 CTAs per SM.
#include <algorithm>

#include "common.cuh"
#include "ggfuse/decode.h"
#include "ggfuse/kernels_cuda.h"

namespace ggfuse {
namespace cuda {
namespace {

constexpr int kDpWarps = 8;
constexpr int kDpThreads = kDpWarps * 32;
constexpr int kDpMaxCols = 8;
constexpr uint32_t kNib = 0x0F0F0F0Fu;
constexpr uint32_t kOne = 0x01010101u;
constexpr int kQ8Bytes = sizeof(BlockQ8_1);

struct DpSeg {
  int64_t byte_offset;
  int64_t row_bytes;
  int32_t type;
  int32_t rows;
  int32_t col_begin;
  int32_t row_start;  // first global row (warp) index of this segment
};

struct DpParams {
  DpSeg seg[kMaxSegments];
  const uint8_t* weight;
  const uint8_t* x;
  float* out;
  int64_t x_row_bytes;
  int32_t n_seg;
  int32_t total_rows;
  int32_t x_blocks;  // K / 32
  int32_t n_out;
};

// ---- loads ----
__device__ __forceinline__ uint4 ldw16(const uint8_t* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}
__device__ __forceinline__ uint32_t ldw4(const uint8_t* p) {
  uint32_t v;
  asm volatile("ld.global.nc.L1::no_allocate.u32 %0, [%1];" : "=r"(v) : "l"(p));
  return v;
}
__device__ __forceinline__ uint32_t ldw2(const uint8_t* p) {
  unsigned short v;
  asm volatile("ld.global.nc.L1::no_allocate.u16 %0, [%1];" : "=h"(v) : "l"(p));
  return v;
}
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

// After the PDL wait: every thread of the CTA copies blocks of x into shared memory (coalesced
// 4-byte loads; the rows are contiguous) with their half sums; ends with a CTA barrier.
__device__ __forceinline__ void stage_x(const uint8_t* x, int nblk, uint32_t* sx) {
  grid_dependency_wait();
#pragma unroll 1
  for (int i = threadIdx.x; i < nblk; i += kDpThreads) {
    const uint8_t* src = x + static_cast<int64_t>(i) * kQ8Bytes;
    uint32_t w[9];
#pragma unroll
    for (int j = 0; j < 9; ++j) w[j] = ldx(src + 4 * j);
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
template <int kWords>
__device__ __forceinline__ void load_words(const uint8_t* blk, WordsU<kWords>& w) {
  const uintptr_t addr = reinterpret_cast<uintptr_t>(blk);
  const uint8_t* al = reinterpret_cast<const uint8_t*>(addr & ~uintptr_t{3});
  const bool odd = (addr & 2u) != 0;
#pragma unroll
  for (int i = 0; i < kWords - 1; ++i) w.a[i] = ldw4(al + 4 * i);
  w.a[kWords - 1] = odd ? ldw4(al + 4 * (kWords - 1)) : ldw2(al + 4 * (kWords - 1));
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
template <bool kQ5>
__device__ __forceinline__ void load_k(const uint8_t* row, int unit, UnitK<kQ5>& u) {
  const int sb = unit >> 2, pr = unit & 3;
  const uint8_t* b = row + sb * (kQ5 ? 176 : 144);
  u.hdr = ldw16(b);
  const int qs = (kQ5 ? 48 : 16) + 32 * pr;
  u.q0 = ldw16(b + qs);
  u.q1 = ldw16(b + qs + 16);
  if constexpr (kQ5) {
    u.h0 = ldw16(b + 16);
    u.h1 = ldw16(b + 32);
  }
}

template <int kCols, bool kQ5>
__device__ __forceinline__ void dot_k(const DpParams& p, const uint32_t* sx, const UnitK<kQ5>& u, int unit,
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
  const int nblk = kCols * p.x_blocks;
#pragma unroll
  for (int c = 0; c < kCols; ++c) {
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      XBlock xb;
      load_x(sx, nblk, c * p.x_blocks + blk + e, xb);
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
__device__ __forceinline__ void load_q6(const uint8_t* row, int unit, UnitQ6& u) {
  const int sb = unit >> 2, h = (unit >> 1) & 1, uu = unit & 1;
  const uint8_t* b = row + sb * 210;
  const uintptr_t addr = reinterpret_cast<uintptr_t>(b);
  const uint8_t* al = reinterpret_cast<const uint8_t*>(addr & ~uintptr_t{3});
  // 9 aligned words cover the 32 bytes at either phase; the ninth never leaves the block.
  const uint8_t* l = al + 64 * h + 32 * uu;
  const uint8_t* q = al + 128 + 32 * h;
#pragma unroll
  for (int i = 0; i < 9; ++i) u.ql[i] = ldw4(l + 4 * i);
#pragma unroll
  for (int i = 0; i < 9; ++i) u.qh[i] = ldw4(q + 4 * i);
  const int sA = 4 * h + uu;
  u.sa = ldw2(b + 192 + 2 * sA);
  u.sb2 = ldw2(b + 192 + 2 * (sA + 2));
  u.d = ldw2(b + 208);
  u.sh = static_cast<uint32_t>(addr & 2u) * 8u;
}

template <int kCols>
__device__ __forceinline__ void dot_q6(const DpParams& p, const uint32_t* sx, const UnitQ6& u, int unit,
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
  const int nblk = kCols * p.x_blocks;
#pragma unroll
  for (int c = 0; c < kCols; ++c) {
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      XBlock xb;
      load_x(sx, nblk, c * p.x_blocks + blkA + 2 * e, xb);  // sub-block B is two Q8_1 blocks after A
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
__device__ __forceinline__ void dot_b32(const DpParams& p, const uint32_t* sx, const WordsU<words_of<kType>()>& u,
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
    load_x(sx, kCols * p.x_blocks, c * p.x_blocks + unit, xb);
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

// One row: lanes take units lane, lane + 32, ...; the next unit is loaded before the current one is
// used. The first load happens before the PDL wait (weights are never written by a ggfuse kernel).
template <int kCols, typename Unit, typename Load, typename Dot, typename Stage>
__device__ __forceinline__ void run_row(int n_units, int lane, Load load, Dot dot, float (&acc)[kCols],
                                        bool first, Stage stage) {
  Unit cur;
  int u = lane;
  if (u < n_units) load(u, cur);
  if (first) stage();  // the PDL wait and the activations' copy, once per CTA
  while (u < n_units) {
    Unit next;
    const int un = u + 32;
    if (un < n_units) load(un, next);
    dot(cur, u, acc);
    cur = next;
    u = un;
  }
}

constexpr int kDpRowsPerWarp = 2;  // rows a warp takes in turn: a CTA covers 16 rows
constexpr int kDpCtaRows = kDpWarps * kDpRowsPerWarp;

// One row (warp-wide): kFirst also does the CTA's PDL wait and activation copy (after the row's
// first weight loads).
template <int kCols, bool kFirst, typename Stage>
__device__ __forceinline__ void dp4a_row(const DpParams& p, const uint32_t* sx, int grow, int lane, Stage stage) {
  const int nb = p.x_blocks;
  const bool first = kFirst;
  int s = 0;
  while (s + 1 < p.n_seg && grow >= p.seg[s + 1].row_start) ++s;
  const DpSeg& sd = p.seg[s];
  const int r = grow - sd.row_start;
  const uint8_t* row = p.weight + sd.byte_offset + r * sd.row_bytes;
  float acc[kCols];
#pragma unroll
  for (int c = 0; c < kCols; ++c) acc[c] = 0.0f;
  switch (sd.type) {
    case kQ4_K:
      run_row<kCols, UnitK<false>>(
          nb / 2, lane, [&](int un, UnitK<false>& w) { load_k<false>(row, un, w); },
          [&](const UnitK<false>& w, int un, float (&a)[kCols]) { dot_k<kCols, false>(p, sx, w, un, a); }, acc,
          first, stage);
      break;
    case kQ5_K:
      run_row<kCols, UnitK<true>>(
          nb / 2, lane, [&](int un, UnitK<true>& w) { load_k<true>(row, un, w); },
          [&](const UnitK<true>& w, int un, float (&a)[kCols]) { dot_k<kCols, true>(p, sx, w, un, a); }, acc,
          first, stage);
      break;
    case kQ6_K:
      run_row<kCols, UnitQ6>(
          nb / 2, lane, [&](int un, UnitQ6& w) { load_q6(row, un, w); },
          [&](const UnitQ6& w, int un, float (&a)[kCols]) { dot_q6<kCols>(p, sx, w, un, a); }, acc, first, stage);
      break;
    case kQ4_0:
      run_row<kCols, WordsU<5>>(
          nb, lane, [&](int un, WordsU<5>& w) { load_words<5>(row + un * 18, w); },
          [&](const WordsU<5>& w, int un, float (&a)[kCols]) { dot_b32<kCols, kQ4_0>(p, sx, w, un, a); }, acc,
          first, stage);
      break;
    case kQ5_0:
      run_row<kCols, WordsU<6>>(
          nb, lane, [&](int un, WordsU<6>& w) { load_words<6>(row + un * 22, w); },
          [&](const WordsU<6>& w, int un, float (&a)[kCols]) { dot_b32<kCols, kQ5_0>(p, sx, w, un, a); }, acc,
          first, stage);
      break;
    default:  // kQ8_0 (the launcher admits only the six mat-vec types)
      run_row<kCols, WordsU<9>>(
          nb, lane, [&](int un, WordsU<9>& w) { load_words<9>(row + un * 34, w); },
          [&](const WordsU<9>& w, int un, float (&a)[kCols]) { dot_b32<kCols, kQ8_0>(p, sx, w, un, a); }, acc,
          first, stage);
      break;
  }
#pragma unroll
  for (int c = 0; c < kCols; ++c) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) acc[c] += __shfl_xor_sync(0xffffffffu, acc[c], o);
  }
  if (lane == 0) {
#pragma unroll
    for (int c = 0; c < kCols; ++c) p.out[static_cast<int64_t>(c) * p.n_out + sd.col_begin + r] = acc[c];
  }
}

template <int kCols>
__global__ void __launch_bounds__(kDpThreads) mat_vec_dp4a_kernel(const DpParams p) {
  extern __shared__ uint32_t sx[];
  allow_dependent_launch();
  const int lane = threadIdx.x & 31;
  auto stage = [&] { stage_x(p.x, kCols * p.x_blocks, sx); };
  const int row0 = blockIdx.x * kDpCtaRows + (threadIdx.x >> 5) * kDpRowsPerWarp;
  if (row0 >= p.total_rows) {  // no row here: only take part in the CTA's copy of x
    stage();
    return;
  }
  dp4a_row<kCols, true>(p, sx, row0, lane, stage);
#pragma unroll 1
  for (int j = 1; j < kDpRowsPerWarp && row0 + j < p.total_rows; ++j) {
    dp4a_row<kCols, false>(p, sx, row0 + j, lane, stage);
  }
}

template <int kCols>
cudaError_t launch_dp4a(const DpParams& p, cudaStream_t stream) {
  const int grid = (p.total_rows + kDpCtaRows - 1) / kDpCtaRows;
  const size_t smem = static_cast<size_t>(kCols) * p.x_blocks * (kQ8Bytes + 4);
  if (smem > 48 * 1024) {
    int device = 0;
    cudaError_t err = cudaGetDevice(&device);
    if (err != cudaSuccess) return err;
    const int optin = device_attribute(device, cudaDevAttrMaxSharedMemoryPerBlockOptin);
    if (smem > static_cast<size_t>(optin)) return cudaErrorNotSupported;  // caller: the MMA kernel
    static int smem_set[64] = {};  // per device: the largest size set so far
    if (device >= 64 || smem_set[device] < static_cast<int>(smem)) {
      err = cudaFuncSetAttribute(mat_vec_dp4a_kernel<kCols>, cudaFuncAttributeMaxDynamicSharedMemorySize, optin);
      if (err != cudaSuccess) return err;
      if (device < 64) smem_set[device] = optin;
    }
  }
  return launch_kernel(mat_vec_dp4a_kernel<kCols>, dim3(grid), dim3(kDpThreads), smem, stream, p);
}

}  // namespace

cudaError_t mat_vec_q8_1_dp4a(const uint8_t* weight, const SegmentTable& table, int64_t k,
                              const uint8_t* x_q8, int64_t batch, float* out, int64_t n_out,
                              cudaStream_t stream) {
  if (batch <= 0 || table.count <= 0) return cudaSuccess;
  if (batch > kDpMaxCols || table.count > kMaxSegments || k <= 0 || k % kQK != 0 ||
      k > (int64_t{1} << 30)) {
    return cudaErrorInvalidValue;
  }
  DpParams p{};
  p.weight = weight;
  p.x = x_q8;
  p.out = out;
  p.x_row_bytes = k / kQK * kQ8Bytes;
  p.x_blocks = static_cast<int32_t>(k / kQK);
  p.n_out = static_cast<int32_t>(n_out);
  p.n_seg = table.count;
  int64_t rows = 0;
  for (int s = 0; s < table.count; ++s) {
    const Segment& in = table.seg[s];
    if (!is_mat_vec_type(in.type) || in.rows <= 0) return cudaErrorInvalidValue;
    const int64_t rb = row_bytes(in.type, k);
    if (rb <= 0 || static_cast<int64_t>(in.rows) * rb > (int64_t{1} << 31) - 1) return cudaErrorInvalidValue;
    DpSeg& sd = p.seg[s];
    sd.byte_offset = in.byte_offset;
    sd.row_bytes = rb;
    sd.type = in.type;
    sd.rows = in.rows;
    sd.col_begin = in.row_begin;
    sd.row_start = static_cast<int32_t>(rows);
    rows += in.rows;
  }
  if (rows > (int64_t{1} << 30)) return cudaErrorInvalidValue;
  p.total_rows = static_cast<int32_t>(rows);
  switch (batch) {
    case 1: return launch_dp4a<1>(p, stream);
    case 2: return launch_dp4a<2>(p, stream);
    case 3: return launch_dp4a<3>(p, stream);
    case 4: return launch_dp4a<4>(p, stream);
    case 5: return launch_dp4a<5>(p, stream);
    case 6: return launch_dp4a<6>(p, stream);
    case 7: return launch_dp4a<7>(p, stream);
    default: return launch_dp4a<8>(p, stream);
  }
}

}  // namespace cuda
}  // namespace ggfuse

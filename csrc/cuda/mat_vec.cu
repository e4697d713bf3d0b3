// Fused multi-segment quantized mat-vec with Q8_1 activations on CUDA (SPEC §2, §3).
//
// Design (docs/PERFORMANCE.md has the measurements behind each choice):
//   * Integer tensor cores. A tile of 16 weight rows x 32 values (one block / sub-block) is the A
//     operand of an int8 mma.m16n8k32 and up to 8 activation rows (the batch) are its B operand, so
//     the per-block integer dot products of SPEC §2 come out exact in int32, for every batch row at
//     once, in one instruction; Q6_K's 16-value scale groups use mma.m16n8k16. The integer results
//     are combined with the scales by decode.h's dot_* formulas, the ones the CPU uses.
//   * One launch covers every segment of the fused weight: the rows are cut into tiles of 16 over
//     all segments, and CTA i (one per SM) takes the tiles whose start falls in the i-th equal share
//     of the launch's cost: the weight bytes (a Q6_K tile costs 1.46x a Q4_K one), or, for the direct
//     kernel, its measured work per item (balance_direct_by_work). Every tile's type comes from the
//     segment table passed by value (graph-capturable, no device-side metadata).
//   * Inside a CTA the 16 warps split the K steps (256 values each) and, when a CTA has many tiles,
//     the tiles too. A warp loads the activations of its step into registers once (B fragments,
//     scales, sums) and reuses them for every tile of the CTA; its partial sums land in a shared
//     slot per (tile, K group), summed in a fixed order at the end: results are deterministic.
//   * Weight bytes stream with 16-byte cp.async into a per-warp ring of 2-4 shared-memory stages of
//     16 rows x 256 values, so many loads are in flight without holding registers. Rows that are not
//     16-byte aligned (Q6_K's 210-byte blocks, Q4_0 with K not a multiple of 256, ...) are copied as
//     the enclosing 16-byte granules and read back at their offset; the one granule that would cross
//     the end of a segment is copied byte by byte, so nothing outside the segment is read.
//   * Before waiting for the kernel that produces x (PDL, see common.cuh) each warp issues the copies
//     of its first weight stage, so the weight stream overlaps the norm kernel and the previous
//     layer's tail. (A bulk L2 prefetch of each CTA's whole range is available, GGFUSE_MV_PREFETCH=1,
//     but measured slower; so were deeper stage rings.)
//   * rms_norm_mat_vec_q8_1 can also run the norm inside this kernel (every CTA quantizes x into
//     shared memory, in the standalone norm kernel's order); with PDL the separate norm kernel
//     measured faster, so that is behind GGFUSE_FUSED_NORM=1.
// Batches above 8 rows of the weights the direct kernel takes go to mat_vec_wide_kernel (below), up to
// 64 rows per launch; other weights are processed 8 rows per launch (with GGFUSE_MV_WIDE=0 the direct
// kernel takes up to 64 rows per launch, each weight item it stages computed against every 8-row
// chunk, where each of its warps has one item: launch_direct). Chunks of <= 2 rows of Q4_K-only weights go to the
// dp4a kernel instead (mat_vec_dp4a.cu), where it measured faster (as do chunks of <= 4 rows with a
// 2-byte aligned type that the direct kernel does not take). Other chunks of weights made of Q4_K and Q6_K, or of Q4_0 alone, with K a
// multiple of 256, run mat_vec_direct_kernel: the same work split and MMA, with fragments read at the
// lanes' own offsets from padded rows, the Q4_K mins / Q4_0 offsets on the tensor cores (TF32) and
// integer-scaled epilogues, so fewer instructions per item (its section below has the details).
#include <algorithm>
#include <cstdlib>

#include "common.cuh"
#include "ggfuse/decode.h"
#include "ggfuse/kernels_cuda.h"
#include "norm.cuh"

namespace ggfuse {
namespace cuda {
namespace {

constexpr int kWarps = 16;
constexpr int kThreads = kWarps * 32;
constexpr int kTileRows = 16;      // the M of the MMA
constexpr int kStepValues = 256;   // K values per item: one super-block, or 8 blocks of 32
constexpr int kStepBlocks = kStepValues / kQK;
constexpr int kMaxCols = 8;        // batch rows per MMA (its N), and per launch of every kernel but the direct one
constexpr int kMaxChunks = 8;      // the direct kernel's 8-row batch chunks per launch (64 batch rows)
constexpr int kMaxPartialBytes = 64 * 1024;
constexpr int kScratchFloats = 256;  // per warp: one item's scales as floats (16 groups x 16 rows)
constexpr uint32_t kNibbles = 0x0F0F0F0Fu;
constexpr uint32_t kOnes = 0x01010101u;
// When the dp4a kernel (mat_vec_dp4a.cu) runs instead of this one, from the H200 measurements in
// docs/PERFORMANCE.md (v7, v9):
//   * weights made only of Q4_K rows, batch chunks of 1-2, reading the weights straight from global
//     memory (QKV 5.3 vs 9.2 us at B=1, 6.8 vs 10.3 at B=2; equal or slower from B=4; staged through
//     shared memory it measured 6.5 at B=1);
//   * weights with any 2-byte aligned type (Q4_0, Q5_0, Q8_0, Q6_K), chunks of 1-4 (1-2 where the
//     direct kernel below takes the weights: use_dp4a), those rows staged through shared memory
//     (all rows staged: QKV Q4_0 6.7 / 7.7 / 9.9 us at B=1 / 2 / 4
//     against 10.3 / 11.4 / 11.9; Q4_K+Q6_K 7.1 / 8.7 / 12.3 against 13.2 / 14.4 / 14.7); unstaged,
//     these were slower than MMA. Where the staged rows do not fit, the MMA kernel runs.
// GGFUSE_MV_DP4A=N forces the dp4a kernel for every chunk of <= N rows and every type (0: never);
// GGFUSE_MV_STAGED=0/1 makes it stage no rows / all rows, instead of the rule above.
constexpr int kDp4aAutoMaxBatch = 2;
constexpr int kDp4aAutoTypes = 8;  // type_bit(kQ4_K)
constexpr int kDp4aStagedMaxBatch = 4;

// Shared-memory bytes per row of a stage, per type: room for the 16-byte granules that enclose 256
// values of a row starting at any even offset, and = 16 (mod 32) so that the 8 rows read by one
// fragment load fall in different banks.
__host__ __device__ constexpr int stage_row_stride(int32_t type) {
  return type == kQ4_0 ? 176    // 144 bytes, up to 10 granules
       : type == kQ5_0 ? 208    // 176 bytes, up to 12 granules
       : type == kQ8_0 ? 304    // 272 bytes, up to 18 granules
       : type == kQ4_K ? 144    // always 16-byte aligned: 9 granules
       : type == kQ5_K ? 176    // always aligned: 11 granules
       : type == kQ6_K ? 240    // 210 bytes, up to 14 granules
       : 0;
}
template <int32_t kType>
constexpr int max_granules() { return stage_row_stride(kType) / 16 - (blocks_16_aligned(kType) ? 0 : 1); }
// Kernel variants by the set of types they handle: code for types a launch does not have only costs
// registers (the all-types kernel spills a few at 128 per thread), so the common sets get their own.
__host__ __device__ constexpr int type_bit(int32_t type) {
  return type == kQ4_0 ? 1 : type == kQ5_0 ? 2 : type == kQ8_0 ? 4
       : type == kQ4_K ? 8 : type == kQ5_K ? 16 : type == kQ6_K ? 32 : 0;
}
constexpr int kMaskKQuants = 8 | 16 | 32;   // Q4_K, Q5_K, Q6_K
constexpr int kMaskBlocks32 = 1 | 2 | 4;    // Q4_0, Q5_0, Q8_0
constexpr int kMaskAll = 63;
constexpr int kMask2ByteAligned = kMaskAll & ~(8 | 16);  // every type but Q4_K, Q5_K (blocks_16_aligned)

template <int32_t kType>
constexpr bool always_aligned() { return blocks_16_aligned(kType); }
template <int32_t kType>
constexpr int type_block_bytes() {
  return kType == kQ4_0 ? 18 : kType == kQ5_0 ? 22 : kType == kQ8_0 ? 34
       : kType == kQ4_K ? 144 : kType == kQ5_K ? 176 : 210;
}
template <int32_t kType>
constexpr bool is_k_quant() { return kType == kQ4_K || kType == kQ5_K || kType == kQ6_K; }
static_assert(max_granules<kQ4_0>() * 16 >= 144 + 14 + 2, "Q4_0 stage row too small");
static_assert(max_granules<kQ5_0>() * 16 >= 176 + 14, "Q5_0 stage row too small");
static_assert(max_granules<kQ8_0>() * 16 >= 272 + 14, "Q8_0 stage row too small");
static_assert(max_granules<kQ6_K>() * 16 >= 210 + 14, "Q6_K stage row too small");

__host__ __device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

struct SegDesc {
  int64_t byte_offset;  // first row in the weight buffer
  int64_t row_bytes;
  int64_t row_cost;     // load-balancing cost of one row: its bytes, or (direct kernel) its work
  int64_t cost_begin;   // cost of all earlier segments
  int32_t type;
  int32_t rows;
  int32_t col_begin;    // first output column
  int32_t tile_begin;   // first global tile index
};

constexpr int kMaxGrid = 512;  // CTAs per launch (the grid is about one CTA per SM)

struct Params {
  SegDesc seg[kMaxSegments];
  int32_t cta_tile[kMaxGrid + 1];  // CTA i owns tiles [cta_tile[i], cta_tile[i + 1]) (host-computed)
  const uint8_t* weight;
  const uint8_t* x;       // Q8_1 rows of this launch's batch
  float* out;             // [batch, n_out] of this launch
  int64_t x_row_bytes;    // K/32 * 36
  int64_t total_cost;     // cost of the launch (SegDesc::row_cost)
  int32_t n_seg;
  int32_t total_tiles;
  int32_t steps;          // ceil(K / 256)
  int32_t x_blocks;       // K / 32
  int32_t batch;          // 1..8
  int32_t n_out;
  int32_t stages;         // 2..4 (staged kernel); slots per warp, 1..8 (direct kernel)
  int32_t stage_bytes;    // one stage of one warp: 16 * max row stride of the launch's types
  int32_t max_tiles;      // most tiles any CTA gets (sizes the tile table and partial slots)
  int32_t k_groups;       // warps that split K (16 / k_groups tile groups)
  int32_t col_chunks;     // batch chunks of kMaxCols rows in this launch (1..kMaxChunks; > 1: direct kernel)
  uint32_t prefetch_cap;  // bytes of L2 prefetch per CTA (0: off)
  // Fused norm (rms_norm_mat_vec_q8_1): every CTA turns x into the Q8_1 rows itself, in shared memory.
  NormArgs norm;          // norm.x: [batch, K] to normalize here, or null: x above holds the Q8_1 rows
  int32_t act_offset;     // shared-memory byte offset of the Q8_1 rows the CTA's norm writes (staged
                          // kernel), or of the warps' slot rings (direct kernel)
};

struct TileInfo {
  int32_t seg;
  int32_t row0;        // first row of the tile within its segment
  int32_t rows_valid;  // rows of the tile inside the segment (1..16)
  int32_t pad;
};

// First tile whose starting cost is >= c: CTA i of g owns tiles [first(i*C/g), first((i+1)*C/g)).
// Computed on the host into Params::cta_tile, so the kernel does no 64-bit division.
int32_t first_tile_at(const Params& p, int64_t c) {
  for (int s = 0; s < p.n_seg; ++s) {
    const SegDesc& sd = p.seg[s];
    const int64_t tile_cost = kTileRows * sd.row_cost;
    const int32_t n_tiles = (sd.rows + kTileRows - 1) / kTileRows;
    if (c <= sd.cost_begin) return sd.tile_begin;
    const int64_t last_start = sd.cost_begin + static_cast<int64_t>(n_tiles - 1) * tile_cost;
    if (c <= last_start) {
      return sd.tile_begin + static_cast<int32_t>((c - sd.cost_begin + tile_cost - 1) / tile_cost);
    }
  }
  return p.total_tiles;
}
inline int64_t cta_cost_bound(const Params& p, int64_t cta, int64_t grid) {
  return p.total_cost * cta / grid;
}

// The CTA's tiles [tile0, tile0 + n_tiles) as (segment, first row, valid rows), in shared memory.
__device__ __forceinline__ void build_tile_table(const Params& p, int32_t tile0, int32_t n_tiles, TileInfo* tiles) {
  for (int i = threadIdx.x; i < n_tiles; i += blockDim.x) {
    const int32_t tile = tile0 + i;
    int s = 0;
    while (s + 1 < p.n_seg && tile >= p.seg[s + 1].tile_begin) ++s;
    TileInfo ti;
    ti.seg = s;
    ti.row0 = (tile - p.seg[s].tile_begin) * kTileRows;
    ti.rows_valid = min(kTileRows, p.seg[s].rows - ti.row0);
    ti.pad = 0;
    tiles[i] = ti;
  }
}

// The partial slot (32 float4) of tile tl, K group kw, batch chunk `chunk` of nc.
__host__ __device__ __forceinline__ size_t partial_slot(int32_t tl, int kg, int kw, int nc, int chunk) {
  return (static_cast<size_t>(tl) * kg + kw) * nc + chunk;
}

// Stores lane `lane`'s C fragment of batch chunk `chunk` for a tile starting at row `row0` of a segment
// of `rows` rows whose outputs start at o: rows g, g + 8, columns 8 chunk + 2t, + 1 (those inside).
__device__ __forceinline__ void store_c_fragment(float* o, int32_t row0, int32_t rows, int chunk, int lane,
                                                 int batch, int64_t n_out, float4 v) {
  const int g = lane >> 2, t = lane & 3;
  const int32_t ra = row0 + g, rb = ra + 8;
  const int ca = kMaxCols * chunk + 2 * t, cb = ca + 1;
  if (ra < rows) {
    if (ca < batch) o[static_cast<int64_t>(ca) * n_out + ra] = v.x;
    if (cb < batch) o[static_cast<int64_t>(cb) * n_out + ra] = v.y;
  }
  if (rb < rows) {
    if (ca < batch) o[static_cast<int64_t>(ca) * n_out + rb] = v.z;
    if (cb < batch) o[static_cast<int64_t>(cb) * n_out + rb] = v.w;
  }
}

// Sums each tile's K-group partials (float4 per lane in C-fragment order) in group order and stores
// the tile's 16 rows x batch columns (each batch chunk's). Called after a __syncthreads that follows
// the last partial write.
__device__ __forceinline__ void store_tiles(const Params& p, const TileInfo* tiles, const float* partials,
                                            int32_t n_tiles) {
  const int kg = p.k_groups, nc = p.col_chunks;
  const int groups = min(kg, p.steps);
  for (int q = threadIdx.x; q < n_tiles * nc * 32; q += blockDim.x) {
    const int32_t tc = q >> 5;  // tile * nc + chunk
    const int32_t tl = tc / nc, chunk = tc - tl * nc;
    const int ln = q & 31;
    float4 sum = make_float4(0.f, 0.f, 0.f, 0.f);
    for (int w = 0; w < groups; ++w) {
      const float4 v = reinterpret_cast<const float4*>(partials)[partial_slot(tl, kg, w, nc, chunk) * 32 + ln];
      sum.x += v.x; sum.y += v.y; sum.z += v.z; sum.w += v.w;
    }
    const TileInfo ti = tiles[tl];
    const SegDesc& sd = p.seg[ti.seg];
    store_c_fragment(p.out + sd.col_begin, ti.row0, sd.rows, chunk, ln, p.batch, p.n_out, sum);
  }
}

// This warp's share of the CTA's items: K steps kw, kw + kg, ... of tiles tw, tw + tg, ... (step-major,
// so the activations of a step are loaded once for all the warp's tiles). k_groups is a power of two:
// shifts and masks, not divisions.
struct WarpShare {
  int kg, tg;      // K groups, tile groups (kg * tg = kWarps)
  int kw, tw;      // this warp's K group and tile group
  int n_my_tiles;  // tiles of the CTA this warp visits at each of its steps
  int n_items;     // (step, tile) items of this warp
};
__device__ __forceinline__ WarpShare warp_share(const Params& p, int warp, int32_t n_tiles) {
  WarpShare w;
  const int kg_shift = __ffs(p.k_groups) - 1, tg_shift = __ffs(kWarps) - 1 - kg_shift;
  w.kg = p.k_groups;
  w.tg = kWarps >> kg_shift;
  w.kw = warp & (w.kg - 1);
  w.tw = warp >> kg_shift;
  const int n_steps = w.kw < p.steps ? (p.steps - w.kw + w.kg - 1) >> kg_shift : 0;
  w.n_my_tiles = w.tw < n_tiles ? (n_tiles - w.tw + w.tg - 1) >> tg_shift : 0;
  w.n_items = n_steps * w.n_my_tiles;
  return w;
}

// Partial sums of a slot (partial_slot: tile, K group, batch chunk) in the CTA's shared memory: the
// owning warp's first step stores, later steps add (one writer per slot, a fixed order: deterministic).
__device__ __forceinline__ void add_partial(float* partials, size_t slot_index, int lane, bool first,
                                            const float (&r)[4]) {
  float4* slot = reinterpret_cast<float4*>(partials) + slot_index * 32 + lane;
  float4 v = make_float4(r[0], r[1], r[2], r[3]);
  if (!first) {
    const float4 o = *slot;
    v.x += o.x; v.y += o.y; v.z += o.z; v.w += o.w;
  }
  *slot = v;
}

// Exact int -> float without the conversion unit (which queues behind shared-memory traffic on the
// MIO pipe): for |v| < 2^22, v + 1.5 * 2^23 is a float of fixed exponent whose mantissa holds v, so
// subtracting 1.5 * 2^23 leaves v exactly. Every integer converted here is far below 2^22.
__device__ __forceinline__ float i2f_exact(int v) { return __int_as_float(v + 0x4B400000) - 12582912.0f; }
__device__ __forceinline__ float u2f_exact(uint32_t v) {  // v < 2^23
  return __uint_as_float(v | 0x4B000000u) - 8388608.0f;
}
// decode.h's dot_* formulas, with their integer sums handed in already converted (exactly) to float.
__device__ __forceinline__ float dot_k_sub_f(float dsc, float dmn, float d_x, float sumi, float sumq) {
  return d_x * (dsc * sumi - dmn * sumq);
}
__device__ __forceinline__ float dot_q6_k_sub_f(float dsc, float d_x, float sumi) { return d_x * (dsc * sumi); }
__device__ __forceinline__ float dot_q4_0_f(float d_w, float d_x, float s_x, float sumi) {
  return d_w * (d_x * sumi - 8.0f * s_x);
}
__device__ __forceinline__ float dot_q5_0_f(float d_w, float d_x, float s_x, float sumi) {
  return d_w * (d_x * sumi - 16.0f * s_x);
}
__device__ __forceinline__ float dot_q8_0_f(float d_w, float d_x, float sumi) { return d_w * (d_x * sumi); }

// Q5_0's fifth bits: 4 bits of x to bit 4 of each of 4 bytes (the shifted copies of x never overlap).
__device__ __forceinline__ uint32_t spread4(uint32_t x) { return ((x * 0x00204081u) & kOnes) << 4; }
// Four bytes 0..63 to q - 32 as signed bytes, with no borrow between bytes: (q + 128 - 32) ^ 128.
__device__ __forceinline__ uint32_t minus32(uint32_t q) {
  return ((q | 0x80808080u) - 0x20202020u) ^ 0x80808080u;
}

// A 32-bit word at byte `off` (even) of a 16-byte aligned shared-memory row: two aligned words and a
// funnel shift. Offsets stay integers on a typed shared pointer, so the loads remain ld.shared.
__device__ __forceinline__ uint32_t lds32u(const uint8_t* base, int off) {
  const uint32_t* w = reinterpret_cast<const uint32_t*>(base + (off & ~3));
  return __funnelshift_r(w[0], w[1], static_cast<uint32_t>(off & 3) * 8u);
}
__device__ __forceinline__ uint32_t lds16at(const uint8_t* base, int off) {
  return *reinterpret_cast<const uint16_t*>(base + off);
}

// D = A * B with C = 0 (the zero goes in as a register, so nothing is moved into the accumulators).
__device__ __forceinline__ void mma_k32_z(int (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%10,%10,%10,%10};\n"
      : "=r"(d[0]), "=r"(d[1]), "=r"(d[2]), "=r"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1), "r"(0));
}
__device__ __forceinline__ void mma_k16_z(int (&d)[4], uint32_t a0, uint32_t a1, uint32_t b) {
  asm("mma.sync.aligned.m16n8k16.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5}, {%6}, {%7,%7,%7,%7};\n"
      : "=r"(d[0]), "=r"(d[1]), "=r"(d[2]), "=r"(d[3])
      : "r"(a0), "r"(a1), "r"(b), "r"(0));
}

// Fragment layout (PTX ISA, mma.m16n8k32 / m16n8k16 with .s8): lane = 4 * g + t.
//   A: a[0] = row g, k 4t..4t+3; a[1] = row g+8, k 4t..; a[2] = row g, k 16+4t..; a[3] = row g+8, k 16+4t..
//      (k16: a[0], a[1] only)
//   B: b0 = k 4t..4t+3 of column g; b1 = k 16+4t.. of column g (k16: b0 only)
//   C: c[0], c[1] = row g, columns 2t, 2t+1; c[2], c[3] = row g+8, columns 2t, 2t+1.
// Any permutation of k applied to A and B alike leaves the result unchanged; the loads below use
// each format's natural order, checked against gguf-py by the tests.

// The activations of one K step (8 Q8_1 blocks) as this lane needs them, loaded once per step.
template <int kCols>
struct StepAct {
  static constexpr int kC2 = kCols == 1 ? 1 : kStepBlocks;  // second epilogue column (2t + 1)
  uint32_t b[kStepBlocks][2];  // B fragment of column g: qs[4t..4t+3] and qs[16+4t..16+4t+3]
  uint32_t ds0[kStepBlocks];   // d | s << 16 of column 2t
  float sq0[kStepBlocks];      // sum of the 32 quants of column 2t (the K-quants' min term)
  uint32_t ds1[kC2];
  float sq1[kC2];
};

template <int kCols>
__device__ __forceinline__ void load_step(const Params& p, const uint8_t* xq, int step, int lane,
                                          StepAct<kCols>& act) {
  constexpr int kBQ = sizeof(BlockQ8_1);
  const int g = lane >> 2, t = lane & 3;
  const int last = p.batch - 1;
  const int64_t blk0 = static_cast<int64_t>(step) * kStepBlocks * kBQ;
  const uint8_t* xg = xq + min(g, last) * p.x_row_bytes + blk0;
  const uint8_t* x0 = xq + min(2 * t, last) * p.x_row_bytes + blk0;
  const uint8_t* x1 = xq + min(2 * t + 1, last) * p.x_row_bytes + blk0;
  const int n_blocks = min(kStepBlocks, p.x_blocks - step * kStepBlocks);
#pragma unroll
  for (int j = 0; j < kStepBlocks; ++j) {
    if (j < n_blocks) {
      // Plain (generic) loads: xq is global memory, or shared memory when the CTA ran the norm.
      act.b[j][0] = *reinterpret_cast<const uint32_t*>(xg + j * kBQ + 4 + 4 * t);
      act.b[j][1] = *reinterpret_cast<const uint32_t*>(xg + j * kBQ + 20 + 4 * t);
      act.ds0[j] = *reinterpret_cast<const uint32_t*>(x0 + j * kBQ);
      if constexpr (kCols != 1) act.ds1[j] = *reinterpret_cast<const uint32_t*>(x1 + j * kBQ);
    } else {  // past the end of a row whose K is not a multiple of 256: never used
      act.b[j][0] = act.b[j][1] = act.ds0[j] = 0;
      if constexpr (kCols != 1) act.ds1[j] = 0;
    }
  }
#pragma unroll
  for (int j = 0; j < kStepBlocks; ++j) {
    const uint32_t ones[4] = {kOnes, kOnes, kOnes, kOnes};
    int c[4];
    mma_k32_z(c, ones, act.b[j][0], act.b[j][1]);  // every row: sum of column 2t's / 2t+1's quants
    act.sq0[j] = i2f_exact(c[0]);
    if constexpr (kCols != 1) act.sq1[j] = i2f_exact(c[1]);
  }
}

// Byte range of step `step` within a row of type kType, and its blocks of 32 (all compile-time
// constants but the tail of a 32-block type's row: no division at run time).
template <int32_t kType>
__device__ __forceinline__ void step_range(const Params& p, int step, int32_t* off, int32_t* bytes,
                                           int* nb32) {
  constexpr int bb = type_block_bytes<kType>();
  if constexpr (is_k_quant<kType>()) {
    *off = step * bb;
    *bytes = bb;
    *nb32 = kStepBlocks;
  } else {
    const int first = step * kStepBlocks;
    *nb32 = min(kStepBlocks, p.x_blocks - first);
    *off = first * bb;
    *bytes = *nb32 * bb;
  }
}

// Copies one item's 16 rows into a stage: lane = (row lane & 15, every other granule from lane >> 4).
template <int32_t kType>
__device__ __forceinline__ void issue_item_typed(const Params& p, const SegDesc& sd, const TileInfo& ti,
                                                 int step, uint8_t* stage, int lane) {
  constexpr int kStride = stage_row_stride(kType);
  constexpr int kG = max_granules<kType>();
  const int r = lane & 15, half = lane >> 4;
  if (r >= ti.rows_valid) return;
  int32_t off, bytes;
  int nb32;
  step_range<kType>(p, step, &off, &bytes, &nb32);
  const int64_t start = sd.byte_offset + static_cast<int64_t>(ti.row0 + r) * sd.row_bytes + off;
  const int64_t g0 = always_aligned<kType>() ? start : (start & ~int64_t{15});
  const int n_gran = always_aligned<kType>() ? (bytes >> 4) : static_cast<int>((start + bytes - g0 + 15) >> 4);
  const int64_t seg_end = sd.byte_offset + static_cast<int64_t>(sd.rows) * sd.row_bytes;
  uint8_t* dst = stage + r * kStride;
#pragma unroll
  for (int m = 0; m < (kG + 1) / 2; ++m) {
    const int gi = 2 * m + half;
    if (gi < n_gran) {
      const int64_t src = g0 + 16 * gi;
      if (always_aligned<kType>() || src + 16 <= seg_end) {
        cp_async_16(dst + 16 * gi, p.weight + src);
      } else {
        // The granule that runs past the end of the segment (its last row, when the segment does
        // not end on a 16-byte boundary): the bytes inside it, one by one. Rare, and never read past.
        for (int64_t i = 0; i < seg_end - src; ++i) dst[16 * gi + i] = p.weight[src + i];
      }
    }
  }
}

template <int kMask>
__device__ __forceinline__ void issue_item(const Params& p, const TileInfo& ti, int step, uint8_t* stage,
                                           int lane) {
  const SegDesc& sd = p.seg[ti.seg];
  switch (sd.type) {
    case kQ4_0: if constexpr (kMask & 1) issue_item_typed<kQ4_0>(p, sd, ti, step, stage, lane); break;
    case kQ5_0: if constexpr (kMask & 2) issue_item_typed<kQ5_0>(p, sd, ti, step, stage, lane); break;
    case kQ8_0: if constexpr (kMask & 4) issue_item_typed<kQ8_0>(p, sd, ti, step, stage, lane); break;
    case kQ4_K: if constexpr (kMask & 8) issue_item_typed<kQ4_K>(p, sd, ti, step, stage, lane); break;
    case kQ5_K: if constexpr (kMask & 16) issue_item_typed<kQ5_K>(p, sd, ti, step, stage, lane); break;
    case kQ6_K: if constexpr (kMask & 32) issue_item_typed<kQ6_K>(p, sd, ti, step, stage, lane); break;
    default: break;
  }
}

// Where row `row` of the item starts inside its first granule (0 for the always-aligned types).
template <int32_t kType>
__device__ __forceinline__ int row_offset(const SegDesc& sd, const TileInfo& ti, int row, int32_t off) {
  if constexpr (always_aligned<kType>()) {
    return 0;
  } else {
    return static_cast<int>((sd.byte_offset + static_cast<int64_t>(ti.row0 + row) * sd.row_bytes + off) & 15);
  }
}

// One item: 16 rows x 256 values of one segment, dotted with the step's activations. r[0..3] get
// (row g, col 2t), (row g, col 2t+1), (row g+8, col 2t), (row g+8, col 2t+1).
//
// Phase 1 turns the item's per-row scales into floats once, in the warp's scratch (lane = row
// lane & 15, half lane >> 4 of the sub-blocks): the MMA layout gives each lane two rows and every
// sub-block, so decoding them in place would repeat the work four times over. The float products
// are the CPU's (d * float(sc), dmin * float(m), d * float(scale)); Q4_K/Q5_K's 6-bit scales are
// unpacked four at a time with word operations equivalent to k_scale_min (formats.h).
// Phase 2 builds the A fragments, runs the MMAs and applies decode.h's dot_* formulas.
template <int32_t kType, int kCols>
__device__ __forceinline__ void compute_item_typed(const Params& p, const SegDesc& sd, const TileInfo& ti,
                                                   int step, const uint8_t* stage, float* scratch,
                                                   const StepAct<kCols>& act, int lane, float (&r)[4]) {
  constexpr int kStride = stage_row_stride(kType);
  constexpr bool kOneCol = kCols == 1;  // batch 1: only column 0 (lanes t == 0) matters
  const int g = lane >> 2, t = lane & 3;
  int32_t off, bytes;
  int nb32;
  step_range<kType>(p, step, &off, &bytes, &nb32);

  // ---- phase 1: scales -> scratch, laid out [group][g][row g, row g + 8] ----
  {
    const int sr = lane & 15, sh = lane >> 4;
    const uint8_t* sb = stage + sr * kStride;
    const int so = row_offset<kType>(sd, ti, sr, off);
    const int slot = (sr & 7) * 2 + (sr >> 3);  // within a group: [g][row half]
    if constexpr (kType == kQ4_K || kType == kQ5_K) {
      const uint4 hd = *reinterpret_cast<const uint4*>(sb);  // d, dmin, scales[0..11]
      const float d = h2f(hd.x), dmin = h2f(hd.x >> 16);
      // k_scale_min for sub-blocks 4sh..4sh+3: j < 4 from bytes 0-7; j >= 4 mixes bytes 8-11 (low
      // and high nibbles) with the top two bits of bytes 0-3 (scales) and 4-7 (mins).
      const uint32_t scv = sh == 0 ? (hd.y & 0x3F3F3F3Fu)
                                   : ((hd.w & 0x0F0F0F0Fu) | ((hd.y >> 2) & 0x30303030u));
      const uint32_t mv = sh == 0 ? (hd.z & 0x3F3F3F3Fu)
                                  : (((hd.w >> 4) & 0x0F0F0F0Fu) | ((hd.z >> 2) & 0x30303030u));
      float2* out = reinterpret_cast<float2*>(scratch);
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int j = 4 * sh + i;
        out[j * 16 + slot] = make_float2(d * u2f_exact((scv >> (8 * i)) & 0xffu),
                                         dmin * u2f_exact((mv >> (8 * i)) & 0xffu));
      }
    } else if constexpr (kType == kQ6_K) {
      const float d = h2f(lds16at(sb, so + 208));
      const uint32_t w0 = lds32u(sb, so + 192 + 8 * sh), w1 = lds32u(sb, so + 196 + 8 * sh);
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const int sc = static_cast<int8_t>(((i < 4 ? w0 : w1) >> (8 * (i & 3))) & 0xffu);
        scratch[(8 * sh + i) * 16 + slot] = d * i2f_exact(sc);
      }
    } else {
      constexpr int bb = type_block_bytes<kType>();
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int bi = 4 * sh + i;
        if (bi < nb32) scratch[bi * 16 + slot] = h2f(lds16at(sb, so + bb * bi));
      }
    }
  }
  __syncwarp();

  // ---- phase 2: A fragments of rows g and g + 8, MMA, epilogue ----
  const uint8_t* b0r = stage + g * kStride;
  const uint8_t* b1r = stage + (g + 8) * kStride;
  const int o0 = row_offset<kType>(sd, ti, g, off);
  const int o1 = row_offset<kType>(sd, ti, g + 8, off);

  if constexpr (kType == kQ4_K || kType == kQ5_K) {
    constexpr int kQs = kType == kQ4_K ? 16 : 48;
    uint32_t qh0a = 0, qh0b = 0, qh1a = 0, qh1b = 0;
    if constexpr (kType == kQ5_K) {  // qh[l]: bit j is the fifth bit of value l of sub-block j
      qh0a = lds32(b0r + 16 + 4 * t); qh0b = lds32(b0r + 32 + 4 * t);
      qh1a = lds32(b1r + 16 + 4 * t); qh1b = lds32(b1r + 32 + 4 * t);
    }
    const float4* sc4 = reinterpret_cast<const float4*>(scratch);
#pragma unroll
    for (int pp = 0; pp < 4; ++pp) {
      // qs[32pp + l]: low nibble = value l of sub-block 2pp, high nibble = value l of 2pp+1.
      const uint32_t q0a = lds32(b0r + kQs + 32 * pp + 4 * t), q0b = lds32(b0r + kQs + 32 * pp + 16 + 4 * t);
      const uint32_t q1a = lds32(b1r + kQs + 32 * pp + 4 * t), q1b = lds32(b1r + kQs + 32 * pp + 16 + 4 * t);
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int j = 2 * pp + h;
        uint32_t a[4] = {(q0a >> (4 * h)) & kNibbles, (q1a >> (4 * h)) & kNibbles,
                         (q0b >> (4 * h)) & kNibbles, (q1b >> (4 * h)) & kNibbles};
        if constexpr (kType == kQ5_K) {
          a[0] |= ((qh0a >> j) & kOnes) << 4;
          a[1] |= ((qh1a >> j) & kOnes) << 4;
          a[2] |= ((qh0b >> j) & kOnes) << 4;
          a[3] |= ((qh1b >> j) & kOnes) << 4;
        }
        int c[4];
        mma_k32_z(c, a, act.b[j][0], act.b[j][1]);
        const float4 s = sc4[j * 8 + g];  // dsc, dmn of row g; dsc, dmn of row g + 8
        const float dx0 = h2f(act.ds0[j]);
        r[0] += dot_k_sub_f(s.x, s.y, dx0, i2f_exact(c[0]), act.sq0[j]);
        r[2] += dot_k_sub_f(s.z, s.w, dx0, i2f_exact(c[2]), act.sq0[j]);
        if constexpr (!kOneCol) {
          const float dx1 = h2f(act.ds1[j]);
          r[1] += dot_k_sub_f(s.x, s.y, dx1, i2f_exact(c[1]), act.sq1[j]);
          r[3] += dot_k_sub_f(s.z, s.w, dx1, i2f_exact(c[3]), act.sq1[j]);
        }
      }
    }
  } else if constexpr (kType == kQ6_K) {
    // ql[0..127], qh[128..191]; the block starts at an even offset o of its row in the stage.
    const float2* sc2 = reinterpret_cast<const float2*>(scratch);
#pragma unroll
    for (int half = 0; half < 2; ++half) {
#pragma unroll
      for (int l0 = 0; l0 < 32; l0 += 16) {
        const uint32_t A0 = lds32u(b0r, o0 + 64 * half + l0 + 4 * t);
        const uint32_t B0 = lds32u(b0r, o0 + 64 * half + 32 + l0 + 4 * t);
        const uint32_t H0 = lds32u(b0r, o0 + 128 + 32 * half + l0 + 4 * t);
        const uint32_t A1 = lds32u(b1r, o1 + 64 * half + l0 + 4 * t);
        const uint32_t B1 = lds32u(b1r, o1 + 64 * half + 32 + l0 + 4 * t);
        const uint32_t H1 = lds32u(b1r, o1 + 128 + 32 * half + l0 + 4 * t);
#pragma unroll
        for (int tq = 0; tq < 4; ++tq) {  // 32-value quarter of the half (SPEC §1's x[l + 32 tq])
          const uint32_t L0 = (tq & 1) ? B0 : A0, L1 = (tq & 1) ? B1 : A1;
          const int shift = 4 * (tq >> 1);
          // 6-bit quant (0..63) - 32 as a signed byte: the MMA then sums (q - 32) * x directly.
          const uint32_t a0 = minus32(((L0 >> shift) & kNibbles) | (((H0 >> (2 * tq)) & 0x03030303u) << 4));
          const uint32_t a1 = minus32(((L1 >> shift) & kNibbles) | (((H1 >> (2 * tq)) & 0x03030303u) << 4));
          const int sg = 8 * half + 2 * tq + l0 / 16;  // 16-value group = scale index
          const int blk = 4 * half + tq;               // Q8_1 block of the group
          // The k16 B fragment of values 16h..16h+15 of a block is word h of its k32 fragment.
          int c[4];
          mma_k16_z(c, a0, a1, act.b[blk][l0 / 16]);
          const float2 s = sc2[sg * 8 + g];  // d * scale of rows g and g + 8
          const float dx0 = h2f(act.ds0[blk]);
          r[0] += dot_q6_k_sub_f(s.x, dx0, i2f_exact(c[0]));
          r[2] += dot_q6_k_sub_f(s.y, dx0, i2f_exact(c[2]));
          if constexpr (!kOneCol) {
            const float dx1 = h2f(act.ds1[blk]);
            r[1] += dot_q6_k_sub_f(s.x, dx1, i2f_exact(c[1]));
            r[3] += dot_q6_k_sub_f(s.y, dx1, i2f_exact(c[3]));
          }
        }
      }
    }
  } else {  // Q4_0, Q5_0, Q8_0: up to 8 blocks of 32
    constexpr int bb = type_block_bytes<kType>();
    const float2* sc2 = reinterpret_cast<const float2*>(scratch);
#pragma unroll
    for (int bi = 0; bi < kStepBlocks; ++bi) {
      if (bi < nb32) {
        const int p0 = o0 + bb * bi, p1 = o1 + bb * bi;
        uint32_t a[4];
        if constexpr (kType == kQ4_0) {
          // qs[j]: low nibble = value j, high nibble = value j + 16.
          const uint32_t w0 = lds32u(b0r, p0 + 2 + 4 * t), w1 = lds32u(b1r, p1 + 2 + 4 * t);
          a[0] = w0 & kNibbles; a[1] = w1 & kNibbles;
          a[2] = (w0 >> 4) & kNibbles; a[3] = (w1 >> 4) & kNibbles;
        } else if constexpr (kType == kQ5_0) {
          const uint32_t h0 = lds32u(b0r, p0 + 2), h1 = lds32u(b1r, p1 + 2);
          const uint32_t w0 = lds32u(b0r, p0 + 6 + 4 * t), w1 = lds32u(b1r, p1 + 6 + 4 * t);
          a[0] = (w0 & kNibbles) | spread4((h0 >> (4 * t)) & 15u);
          a[1] = (w1 & kNibbles) | spread4((h1 >> (4 * t)) & 15u);
          a[2] = ((w0 >> 4) & kNibbles) | spread4((h0 >> (16 + 4 * t)) & 15u);
          a[3] = ((w1 >> 4) & kNibbles) | spread4((h1 >> (16 + 4 * t)) & 15u);
        } else {  // Q8_0
          a[0] = lds32u(b0r, p0 + 2 + 4 * t); a[1] = lds32u(b1r, p1 + 2 + 4 * t);
          a[2] = lds32u(b0r, p0 + 18 + 4 * t); a[3] = lds32u(b1r, p1 + 18 + 4 * t);
        }
        int c[4];
        mma_k32_z(c, a, act.b[bi][0], act.b[bi][1]);
        const float2 dw = sc2[bi * 8 + g];  // d of rows g and g + 8
        const float dx0 = h2f(act.ds0[bi]), sx0 = h2f(act.ds0[bi] >> 16);
        if constexpr (kType == kQ8_0) {
          r[0] += dot_q8_0_f(dw.x, dx0, i2f_exact(c[0]));
          r[2] += dot_q8_0_f(dw.y, dx0, i2f_exact(c[2]));
        } else if constexpr (kType == kQ4_0) {
          r[0] += dot_q4_0_f(dw.x, dx0, sx0, i2f_exact(c[0]));
          r[2] += dot_q4_0_f(dw.y, dx0, sx0, i2f_exact(c[2]));
        } else {
          r[0] += dot_q5_0_f(dw.x, dx0, sx0, i2f_exact(c[0]));
          r[2] += dot_q5_0_f(dw.y, dx0, sx0, i2f_exact(c[2]));
        }
        if constexpr (!kOneCol) {
          const float dx1 = h2f(act.ds1[bi]), sx1 = h2f(act.ds1[bi] >> 16);
          if constexpr (kType == kQ8_0) {
            r[1] += dot_q8_0_f(dw.x, dx1, i2f_exact(c[1]));
            r[3] += dot_q8_0_f(dw.y, dx1, i2f_exact(c[3]));
          } else if constexpr (kType == kQ4_0) {
            r[1] += dot_q4_0_f(dw.x, dx1, sx1, i2f_exact(c[1]));
            r[3] += dot_q4_0_f(dw.y, dx1, sx1, i2f_exact(c[3]));
          } else {
            r[1] += dot_q5_0_f(dw.x, dx1, sx1, i2f_exact(c[1]));
            r[3] += dot_q5_0_f(dw.y, dx1, sx1, i2f_exact(c[3]));
          }
        }
      }
    }
  }
}

// ---- weights read straight into MMA fragments (mat_vec_direct_kernel) ----
// The staged kernel above spends ~540 warp instructions per item (16 rows x 256 values), about half
// of them moving bytes (cp.async issue, shared loads of weights and scales) and the rest on a float
// epilogue of ~6 operations per output element and sub-block; at B = 8 it is issue-bound at 25% of the
// read bandwidth (docs/PERFORMANCE.md). The direct kernel handles Q4_K, Q6_K and Q4_0 (K a multiple of
// 256) with fewer: an item is copied as whole 16-byte granules into a slot of padded rows, and lane
// (g, t) reads, for its rows g and g + 8, only the bytes of its own fragments, under one k permutation
// shared by every type: "fragment k 4t..4t+3 = values 8t..8t+3 of a 32-value block, k 16+4t..16+4t+3
// = values 8t+4..8t+7" (any k permutation applied to A and B alike leaves the product unchanged; the
// B fragments follow it, so one set of activation registers serves every type). No scale scratch and
// no per-item warp barrier. (Loading the fragments straight from global memory into registers
// measured slower: docs/PERFORMANCE.md v11.)
//   * Q4_K (144-byte blocks, 16-byte aligned): the 16-byte header and bytes 8t..8t+7 of each 32-byte
//     run of qs; after the nibble split these are the lane's A fragments of both sub-blocks of the run.
//     A sub-block j contributes d_x * (d * sc_j * sumi - dmin * m_j * sumq) (decode.h dot_k_sub) and
//     the item's rows sum this over j = 0..7, so it is evaluated as
//       d * sum_j d_x[j] * float(sc_j * sumi_j)  -  dmin * sum_j m_j * (d_x[j] * sumq_j)
//     - sc_j * sumi_j is one integer multiply-add (|sumi| <= 15 * 128 * 32, sc <= 63: below 2^22, so
//       i2f_exact converts it exactly), then one FFMA per element and sub-block;
//     - the min sum is a 16 x 8 by 8 x 8 product (rows x sub-blocks x columns) done on the tensor
//       cores in TF32: m_j (<= 63) is exact in TF32, and the column factor d_x[j] * sumq_j (fp32,
//       computed once per K step) goes in as two TF32 parts (hi + lo, 22 bits): good to ~2^-21.
//   * Q4_0 (18-byte blocks; with K % 256 == 0 an item is 144 bytes, 16-byte aligned): values 8t..8t+7
//     of a block are the low (t < 2) or high nibbles of qs bytes 8(t & 1)..8(t & 1)+7, read at a
//     2-byte aligned offset (three words and two funnel shifts where it is not 4-byte aligned). The
//     block's d_w * (d_x * sumi - 8 * s_x) (decode.h dot_q4_0) is summed as
//       sum_j d_w[j] * d_x[j] * float(sumi_j)  -  8 * sum_j d_w[j] * s_x[j]
//     where the second sum is one 16 x 8 by 8 x 8 TF32 product whose operands (fp16) are TF32-exact.
//   * Q6_K (210-byte blocks, 2-byte aligned): the 14 granules that enclose a row's block; the lane's
//     8 bytes of each ql and qh run, read at the row's offset. Its 16-value scale groups split each
//     32-value block in two, and the lanes t < 2 hold exactly the first group's values (8t..8t+7 <
//     16), so each block runs two MMAs on the same A, one with the B fragments of lanes t >= 2 zeroed
//     and one with those of lanes t < 2 zeroed: the two groups' sums come out separately. The item's
//     integer per block and element is sc_e * sumi_e + sc_o * sumi_o (|.| <= 2 * 128 * 65536 = 2^24,
//     so its float conversion is exact), then one FFMA with d_x; d multiplies the item's sum once.
// The integer-first forms are equal to decode.h's in exact arithmetic; in fp32 they round differently
// (well inside SPEC §5's 1e-4), so this kernel's results are not bit-identical to the staged kernel's.

// Activations of one K step in the direct layout: B fragments of column g; the Q8_1 scales d_x of the
// epilogue columns 2t and 2t+1; Q4_K's min product B fragments (d_x * sumq of column g, sub-blocks t
// and t + 4, hi and lo TF32 parts); Q4_0's offset product B fragments (s_x of column g, blocks t and
// t + 4). Always 8 columns: B <= 2 runs the dp4a kernel by default.
struct DirectAct {
  uint32_t b[kStepBlocks][2];
  float dx0[kStepBlocks], dx1[kStepBlocks];
  uint32_t mb_hi[2], mb_lo[2];  // Q4_K
  uint32_t sx[2];               // Q4_0
};

// The type sets of the direct kernel's instances (type_bit masks).
constexpr int kDirectQ4K = type_bit(kQ4_K);                          // Q4_K only
constexpr int kDirectKQuants = type_bit(kQ4_K) | type_bit(kQ6_K);     // Q4_K and / or Q6_K (Q4_K_M)
constexpr int kDirectQ4_0 = type_bit(kQ4_0);                          // Q4_0 only

__device__ __forceinline__ uint32_t tf32_round(float v) {
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(v));
  return r;
}

// The activations of one step for the batch rows at xq .. xq + cols - 1 (cols <= 8: the missing
// columns of a short chunk repeat its last row, and store_tiles drops their results).
template <int kMask>
__device__ __forceinline__ void load_direct_act(const Params& p, const uint8_t* xq, int cols, int step, int lane,
                                                DirectAct& act) {
  constexpr int kBQ = sizeof(BlockQ8_1);
  const int g = lane >> 2, t = lane & 3;
  const int last = cols - 1;
  const int64_t blk0 = static_cast<int64_t>(step) * kStepBlocks * kBQ;  // K % 256 == 0 here
  const uint8_t* xg = xq + min(g, last) * p.x_row_bytes + blk0;
  const uint8_t* x0 = xq + min(2 * t, last) * p.x_row_bytes + blk0;
  const uint8_t* x1 = xq + min(2 * t + 1, last) * p.x_row_bytes + blk0;
#pragma unroll
  for (int j = 0; j < kStepBlocks; ++j) {
    act.b[j][0] = lds32(xg + j * kBQ + 4 + 8 * t);  // generic loads: global memory written before the wait
    act.b[j][1] = lds32(xg + j * kBQ + 8 + 8 * t);
    act.dx0[j] = h2f(lds32(x0 + j * kBQ));
    act.dx1[j] = h2f(lds32(x1 + j * kBQ));
  }
  const uint32_t dsg_lo = lds32(xg + t * kBQ), dsg_hi = lds32(xg + (t + 4) * kBQ);  // d | s << 16
  if constexpr ((kMask & type_bit(kQ4_K)) != 0) {
    // sumq of column g for blocks t and t + 4: each lane's 8 quants of the block, summed over the 4
    // lanes of the group.
    int sq_lo = 0, sq_hi = 0;
#pragma unroll
    for (int j = 0; j < kStepBlocks; ++j) {
      int s = __dp4a(static_cast<int>(act.b[j][0]), static_cast<int>(kOnes),
                     __dp4a(static_cast<int>(act.b[j][1]), static_cast<int>(kOnes), 0));
      s += __shfl_xor_sync(0xffffffffu, s, 1);
      s += __shfl_xor_sync(0xffffffffu, s, 2);
      if (j == t) sq_lo = s;
      if (j == t + 4) sq_hi = s;
    }
    const float q_lo = h2f(dsg_lo) * i2f_exact(sq_lo), q_hi = h2f(dsg_hi) * i2f_exact(sq_hi);
    act.mb_hi[0] = tf32_round(q_lo);
    act.mb_lo[0] = tf32_round(q_lo - __uint_as_float(act.mb_hi[0]));
    act.mb_hi[1] = tf32_round(q_hi);
    act.mb_lo[1] = tf32_round(q_hi - __uint_as_float(act.mb_hi[1]));
  }
  if constexpr ((kMask & type_bit(kQ4_0)) != 0) {
    act.sx[0] = __float_as_uint(h2f(dsg_lo >> 16));
    act.sx[1] = __float_as_uint(h2f(dsg_hi >> 16));
  }
}

// D = A * B + C in TF32 (m16n8k8): A 16 x 8 (a0 row g k t, a1 row g+8 k t, a2 row g k t+4, a3 row g+8
// k t+4), B 8 x 8 (b0 k t col g, b1 k t+4 col g), C / D as the int8 MMA's.
__device__ __forceinline__ void mma_tf32(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// A tile as the direct kernel reads it: where its row 0 starts, where its segment ends, the row
// stride, the rows it has, its type.
struct DirectTile {
  const uint8_t* row0;
  const uint8_t* seg_end;
  int32_t row_bytes;   // K <= 2^30: at most 210 * 2^22 bytes
  int16_t rows_valid;  // 1..16
  int16_t type;
};

// Each warp's items go through a ring of shared-memory slots (cp.async, 16-byte granules), the first
// ones issued before the PDL wait. Rows are 16 (mod 32) bytes apart in a slot, so the 8-byte fragment
// reads of rows g = 0..7 spread over the banks: 160 bytes for the 144-byte items of Q4_K and Q4_0,
// 240 for Q6_K's 14 granules (a 210-byte block from any even offset).
constexpr int kDirectRowStride = 160;
constexpr int kDirectQ6KRowStride = 240;
static_assert(sizeof(TileInfo) % 16 == 0, "the partial slots after the tile table must stay 16-byte aligned");
// The direct kernel's shared memory: tile table | partial slots (float4) | DirectTile table | slot
// rings, each part 16-byte aligned (the slots take 16-byte cp.async, the partials float4 accesses).
__host__ __device__ constexpr size_t direct_partials_offset(int max_tiles) {
  return static_cast<size_t>(max_tiles) * sizeof(TileInfo);
}
__host__ __device__ constexpr size_t direct_dtiles_offset(int max_tiles, int k_groups, int col_chunks) {
  return direct_partials_offset(max_tiles) + static_cast<size_t>(max_tiles) * k_groups * col_chunks * 32 * 16;
}
__host__ __device__ constexpr size_t direct_slots_offset(int max_tiles, int k_groups, int col_chunks) {
  return (direct_dtiles_offset(max_tiles, k_groups, col_chunks) + static_cast<size_t>(max_tiles) * sizeof(DirectTile) + 15) &
         ~size_t{15};
}
constexpr int kDirectMaxSlots = 8;
constexpr int kAlignedItemBytes = 144;  // a Q4_K block; 8 Q4_0 blocks
constexpr int kQ6KRowGranules = 14;
__host__ __device__ constexpr int direct_slot_bytes(int mask) {
  return kTileRows * ((mask & type_bit(kQ6_K)) != 0 ? kDirectQ6KRowStride : kDirectRowStride);
}

// Staging an item: the warp's lanes take its granules in order (lane + 32 k), so that each copy
// instruction covers ~512 contiguous-in-row bytes of 3-4 rows. (Lane pairs owning whole rows, one base
// address per lane, made each instruction touch 16 rows' cache lines and measured 7-13% slower at
// B = 4-8: docs/PERFORMANCE.md v13.) Rows past the end of the segment (its last tile) copy the tile's
// last valid row instead: nothing outside the segment is read, and store_tiles drops those rows.

// Row rr of a tile (rr < 16, 0 < row_bytes < 2^30): one 32 x 32 -> 64-bit multiply-add
// (an int64 product costs three instructions).
__device__ __forceinline__ const uint8_t* tile_row(const uint8_t* base, int rr, int32_t row_bytes) {
  return base + static_cast<uint64_t>(static_cast<uint32_t>(rr)) * static_cast<uint32_t>(row_bytes);
}

// Q4_K and Q4_0 items: 9 granules per row.
__device__ __forceinline__ void stage_aligned_item(const DirectTile& dt, int step, int lane, uint8_t* slot) {
  constexpr int kRowGranules = kAlignedItemBytes / 16;  // 9
  constexpr int kGranules = kTileRows * kRowGranules;   // 144
  const uint8_t* base = dt.row0 + step * kAlignedItemBytes;
#pragma unroll
  for (int k = 0; k < (kGranules + 31) / 32; ++k) {
    const int i = lane + 32 * k;
    if (i < kGranules) {
      const int r = i / kRowGranules, c = i - kRowGranules * r;
      const int rr = min(r, dt.rows_valid - 1);
      cp_async_16(slot + r * kDirectRowStride + 16 * c, tile_row(base, rr, dt.row_bytes) + 16 * c);
    }
  }
}

// Where row r's block of step `step` starts inside its first granule (even, 0..14), for the row that
// slot row r holds (the last valid one past the end of the segment).
__device__ __forceinline__ int q6k_row_offset(const DirectTile& dt, int step, int r) {
  const int rr = min(r, dt.rows_valid - 1);
  return static_cast<int>((static_cast<uint32_t>(reinterpret_cast<uintptr_t>(dt.row0)) +
                           static_cast<uint32_t>(rr) * static_cast<uint32_t>(dt.row_bytes) +
                           static_cast<uint32_t>(step) * static_cast<uint32_t>(sizeof(BlockQ6_K))) & 15u);
}

// Q6_K items: the 14 granules that enclose each row's 210-byte block, 7 per lane. Granules can run
// past the end of the segment only in its last row's last block, when the segment does not end on a
// 16-byte boundary: one test per item (does the tile's last row's last granule end inside?) keeps the
// per-granule work to the address arithmetic; otherwise each granule is tested, and one that would
// cross the end is copied byte by byte up to it, so nothing outside the segment is read.
__device__ __forceinline__ void stage_q6k_item(const DirectTile dt, int step, int lane, uint8_t* slot) {
  constexpr int kGranules = kTileRows * kQ6KRowGranules;  // 224: 7 per lane
  const uint8_t* base = dt.row0 + static_cast<int64_t>(step) * static_cast<int>(sizeof(BlockQ6_K));
  const uint8_t* last = tile_row(base, dt.rows_valid - 1, dt.row_bytes);
  const bool inside = reinterpret_cast<const uint8_t*>(reinterpret_cast<uintptr_t>(last) & ~uintptr_t{15}) +
                          16 * kQ6KRowGranules <= dt.seg_end;
  if (inside) {
    // Rolled: seven unrolled copies' addresses cost the mixed kernel spills at its 96-register cap.
#pragma unroll 1
    for (int k = 0; k < kGranules / 32; ++k) {
      const int i = lane + 32 * k;
      const int r = i / kQ6KRowGranules, c = i - kQ6KRowGranules * r;
      const uint8_t* start = tile_row(base, min(r, dt.rows_valid - 1), dt.row_bytes);
      const uint8_t* src = reinterpret_cast<const uint8_t*>(reinterpret_cast<uintptr_t>(start) & ~uintptr_t{15});
      cp_async_16(slot + r * kDirectQ6KRowStride + 16 * c, src + 16 * c);
    }
  } else {
#pragma unroll 1
    for (int k = 0; k < kGranules / 32; ++k) {
      const int i = lane + 32 * k;
      const int r = i / kQ6KRowGranules, c = i - kQ6KRowGranules * r;
      const uint8_t* start = tile_row(base, min(r, dt.rows_valid - 1), dt.row_bytes);
      const uint8_t* src =
          reinterpret_cast<const uint8_t*>(reinterpret_cast<uintptr_t>(start) & ~uintptr_t{15}) + 16 * c;
      uint8_t* dst = slot + r * kDirectQ6KRowStride + 16 * c;
      if (src + 16 <= dt.seg_end) {
        cp_async_16(dst, src);
      } else {
        for (int e = 0; src + e < dt.seg_end; ++e) dst[e] = src[e];
      }
    }
  }
}

// 8 bytes at an even byte offset of a 16-byte aligned shared-memory row: three aligned words and two
// funnel shifts (the compiler drops the third word where the offset is known to be 4-byte aligned).
__device__ __forceinline__ uint2 lds64u(const uint8_t* base, int off) {
  const uint32_t* w = reinterpret_cast<const uint32_t*>(base + (off & ~3));
  const uint32_t sh = static_cast<uint32_t>(off & 3) * 8u;
  return make_uint2(__funnelshift_r(w[0], w[1], sh), __funnelshift_r(w[1], w[2], sh));
}

// k_scale_min (formats.h) for all 8 sub-blocks of a header, packed a byte per sub-block:
// sc[0] holds sub-blocks 0..3, sc[1] 4..7; likewise m.
__device__ __forceinline__ void unpack_k_scales(const uint4& h, uint32_t (&sc)[2], uint32_t (&m)[2]) {
  sc[0] = h.y & 0x3F3F3F3Fu;
  m[0] = h.z & 0x3F3F3F3Fu;
  sc[1] = (h.w & 0x0F0F0F0Fu) | ((h.y >> 2) & 0x30303030u);
  m[1] = ((h.w >> 4) & 0x0F0F0F0Fu) | ((h.z >> 2) & 0x30303030u);
}
__device__ __forceinline__ int byte_u(uint32_t w, int i) { return static_cast<int>(__byte_perm(w, 0u, 0x4440u + i)); }
__device__ __forceinline__ int byte_s(uint32_t w, int i) { return static_cast<int>(static_cast<int8_t>((w >> (8 * i)) & 0xffu)); }

// r[0..3] = (row g, col 2t), (row g, col 2t+1), (row g+8, col 2t), (row g+8, col 2t+1).
// m_sel: __byte_perm selector that puts byte t of a word under the exponent of 2^23 (the lane's
// sub-blocks t and t + 4 of the min product).
// Lane (g, t) reads the headers (d, dmin, scales) of its rows g and g + 8 and bytes 8t..8t+7 of each
// 32-byte run of their qs (a run at a time, so that few registers hold weights).
__device__ __forceinline__ void compute_q4k_item(const uint8_t* slot, const DirectAct& act, int lane,
                                                 float (&r)[4]) {
  const int g = lane >> 2, t = lane & 3;
  const uint8_t* r0 = slot + g * kDirectRowStride;
  const uint8_t* r1 = r0 + 8 * kDirectRowStride;
  const uint4 h0 = *reinterpret_cast<const uint4*>(r0), h1 = *reinterpret_cast<const uint4*>(r1);
  const uint32_t m_sel = 0x7650u + static_cast<uint32_t>(t);
  uint32_t sc0[2], m0[2], sc1[2], m1[2];
  unpack_k_scales(h0, sc0, m0);
  unpack_k_scales(h1, sc1, m1);
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
  for (int c = 0; c < 4; ++c) {
    const uint2 q0 = *reinterpret_cast<const uint2*>(r0 + 16 + 32 * c + 8 * t);
    const uint2 q1 = *reinterpret_cast<const uint2*>(r1 + 16 + 32 * c + 8 * t);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int j = 2 * c + h;  // low nibbles: sub-block 2c, high: 2c + 1
      const uint32_t a[4] = {(q0.x >> (4 * h)) & kNibbles, (q1.x >> (4 * h)) & kNibbles,
                             (q0.y >> (4 * h)) & kNibbles, (q1.y >> (4 * h)) & kNibbles};
      int cc[4];
      mma_k32_z(cc, a, act.b[j][0], act.b[j][1]);
      const int s0 = byte_u(sc0[j >> 2], j & 3), s1 = byte_u(sc1[j >> 2], j & 3);
      acc[0] = fmaf(i2f_exact(cc[0] * s0), act.dx0[j], acc[0]);
      acc[1] = fmaf(i2f_exact(cc[1] * s0), act.dx1[j], acc[1]);
      acc[2] = fmaf(i2f_exact(cc[2] * s1), act.dx0[j], acc[2]);
      acc[3] = fmaf(i2f_exact(cc[3] * s1), act.dx1[j], acc[3]);
    }
  }
  // The mins: A = m of rows g, g + 8 at sub-blocks t, t + 4 (as floats: TF32-exact).
  const uint32_t am[4] = {__float_as_uint(__uint_as_float(__byte_perm(m0[0], 0x4B000000u, m_sel)) - 8388608.0f),
                          __float_as_uint(__uint_as_float(__byte_perm(m1[0], 0x4B000000u, m_sel)) - 8388608.0f),
                          __float_as_uint(__uint_as_float(__byte_perm(m0[1], 0x4B000000u, m_sel)) - 8388608.0f),
                          __float_as_uint(__uint_as_float(__byte_perm(m1[1], 0x4B000000u, m_sel)) - 8388608.0f)};
  float accm[4] = {0.f, 0.f, 0.f, 0.f};
  mma_tf32(accm, am, act.mb_hi[0], act.mb_hi[1]);
  mma_tf32(accm, am, act.mb_lo[0], act.mb_lo[1]);
  const float d0 = h2f(h0.x), dmin0 = h2f(h0.x >> 16);
  const float d1 = h2f(h1.x), dmin1 = h2f(h1.x >> 16);
  r[0] = d0 * acc[0] - dmin0 * accm[0];
  r[1] = d0 * acc[1] - dmin0 * accm[1];
  r[2] = d1 * acc[2] - dmin1 * accm[2];
  r[3] = d1 * acc[3] - dmin1 * accm[3];
}

// Q4_0 items (8 blocks of 18 bytes per row). Lane (g, t): values 8t..8t+7 of each block are the low
// (t < 2) or high (t >= 2) nibbles of qs bytes 8 (t & 1) .. 8 (t & 1) + 7; the MMA sums the unsigned
// nibbles, the - 8 goes through s_x (decode.h dot_q4_0).
__device__ __forceinline__ void compute_q4_0_item(const uint8_t* slot, const DirectAct& act, int lane,
                                                  float (&r)[4]) {
  constexpr int bb = static_cast<int>(sizeof(BlockQ4_0));
  const int g = lane >> 2, t = lane & 3;
  const uint8_t* r0 = slot + g * kDirectRowStride;
  const uint8_t* r1 = r0 + 8 * kDirectRowStride;
  const int qs = 2 + 8 * (t & 1);  // the lane's qs bytes within a block
  const int nib = 4 * (t >> 1);
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
  for (int j = 0; j < kStepBlocks; ++j) {
    const uint2 w0 = lds64u(r0, bb * j + qs), w1 = lds64u(r1, bb * j + qs);
    const uint32_t a[4] = {(w0.x >> nib) & kNibbles, (w1.x >> nib) & kNibbles,
                           (w0.y >> nib) & kNibbles, (w1.y >> nib) & kNibbles};
    int c[4];
    mma_k32_z(c, a, act.b[j][0], act.b[j][1]);
    const float dw0 = h2f(lds16at(r0, bb * j)), dw1 = h2f(lds16at(r1, bb * j));
    acc[0] = fmaf(dw0, act.dx0[j] * i2f_exact(c[0]), acc[0]);
    acc[1] = fmaf(dw0, act.dx1[j] * i2f_exact(c[1]), acc[1]);
    acc[2] = fmaf(dw1, act.dx0[j] * i2f_exact(c[2]), acc[2]);
    acc[3] = fmaf(dw1, act.dx1[j] * i2f_exact(c[3]), acc[3]);
  }
  // sum_j d_w[j] * s_x[j]: A = d_w of rows g, g + 8 at blocks t, t + 4.
  const uint32_t am[4] = {__float_as_uint(h2f(lds16at(r0, bb * t))), __float_as_uint(h2f(lds16at(r1, bb * t))),
                          __float_as_uint(h2f(lds16at(r0, bb * (t + 4)))), __float_as_uint(h2f(lds16at(r1, bb * (t + 4))))};
  float accs[4] = {0.f, 0.f, 0.f, 0.f};
  mma_tf32(accs, am, act.sx[0], act.sx[1]);
#pragma unroll
  for (int i = 0; i < 4; ++i) r[i] = acc[i] - 8.0f * accs[i];
}

// 8 bytes at `off` (a multiple of 4) past a 4-byte aligned shared-memory pointer, shifted right by
// sh bits (8 * the row's misalignment): three aligned words and two funnel shifts.
__device__ __forceinline__ uint2 lds64_shifted(const uint8_t* aligned, int off, uint32_t sh) {
  const uint32_t* w = reinterpret_cast<const uint32_t*>(aligned + off);
  return make_uint2(__funnelshift_r(w[0], w[1], sh), __funnelshift_r(w[1], w[2], sh));
}

// One Q6_K quant word for the MMA: 4 values as 4 (q - 32), signed bytes, from a word of ql (low
// nibbles: kNib 0, high: 4) and of qh (bits kHb, kHb + 1). With q = lo + 16 h, 4 q - 128 is, mod 256,
// lo in bits 2..5, h0 in bit 6 and NOT h1 in bit 7, which is also its sign: two LOP3s and the shifts,
// no borrow across bytes (an exact - 32 costs three more). The factor 4 goes back into d.
template <int kNib, int kHb>
__device__ __forceinline__ uint32_t q6_quants_x4(uint32_t ql, uint32_t qh) {
  const uint32_t lo = kNib == 0 ? ql << 2 : ql >> 2;
  const uint32_t hs = qh << (6 - kHb);
  return (lo & 0x3C3C3C3Cu) | (hs & 0x40404040u) | (~hs & 0x80808080u);
}

// Q6_K items (one 210-byte block per row, starting at the even offsets o0 / o1 of rows g / g + 8 in
// the slot). ql[0..127], qh[128..191], scales[192..207], d at 208; half n of the block (values
// 128n..128n+127) is made of the runs ql[64n + l], ql[64n + 32 + l], qh[32n + l], l = 0..31, and its
// quarter tq (a Q8_1 block, values 128n + 32tq + l) takes the low (tq < 2) or high nibbles of the
// first (tq even) or second run and bits 2tq, 2tq+1 of qh, with scale groups 8n + 2tq + (l >= 16).
// The quants go into the MMA as 4 (q - 32) (q6_quants_x4): |sumi| <= 16 * 128 * 127 per group, the
// item's integer per block and element sc_e sumi_e + sc_o sumi_o stays below 2^26 (int32-safe; its
// float conversion rounds once, 2^-24 relative), and d / 4 multiplies the item's sum.
__device__ __forceinline__ void compute_q6k_item(const uint8_t* slot, int o0, int o1, const DirectAct& act,
                                                 int lane, float (&r)[4]) {
  const int g = lane >> 2, t = lane & 3;
  const uint8_t* r0 = slot + g * kDirectQ6KRowStride;
  const uint8_t* r1 = r0 + 8 * kDirectQ6KRowStride;
  // Every piece a lane reads sits at o + (a multiple of 4): one aligned base and shift per row.
  const uint32_t sh0 = static_cast<uint32_t>(o0 & 3) * 8u, sh1 = static_cast<uint32_t>(o1 & 3) * 8u;
  const uint8_t* q0 = r0 + ((o0 + 8 * t) & ~3);  // the lane's bytes of each 32-byte run
  const uint8_t* q1 = r1 + ((o1 + 8 * t) & ~3);
  const uint8_t* s0 = r0 + (o0 & ~3);  // scales, d
  const uint8_t* s1 = r1 + (o1 & ~3);
  const bool first_group = t < 2;  // this lane's values 8t..8t+7 lie in the block's first 16
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
  for (int n = 0; n < 2; ++n) {
    const uint2 sc0 = lds64_shifted(s0, 192 + 8 * n, sh0), sc1 = lds64_shifted(s1, 192 + 8 * n, sh1);
    const uint2 A0 = lds64_shifted(q0, 64 * n, sh0), B0 = lds64_shifted(q0, 64 * n + 32, sh0);
    const uint2 H0 = lds64_shifted(q0, 128 + 32 * n, sh0);
    const uint2 A1 = lds64_shifted(q1, 64 * n, sh1), B1 = lds64_shifted(q1, 64 * n + 32, sh1);
    const uint2 H1 = lds64_shifted(q1, 128 + 32 * n, sh1);
#pragma unroll
    for (int tq = 0; tq < 4; ++tq) {
      const uint2 L0 = (tq & 1) ? B0 : A0, L1 = (tq & 1) ? B1 : A1;
      uint32_t a[4];
      if (tq == 0) {
        a[0] = q6_quants_x4<0, 0>(L0.x, H0.x), a[1] = q6_quants_x4<0, 0>(L1.x, H1.x);
        a[2] = q6_quants_x4<0, 0>(L0.y, H0.y), a[3] = q6_quants_x4<0, 0>(L1.y, H1.y);
      } else if (tq == 1) {
        a[0] = q6_quants_x4<0, 2>(L0.x, H0.x), a[1] = q6_quants_x4<0, 2>(L1.x, H1.x);
        a[2] = q6_quants_x4<0, 2>(L0.y, H0.y), a[3] = q6_quants_x4<0, 2>(L1.y, H1.y);
      } else if (tq == 2) {
        a[0] = q6_quants_x4<4, 4>(L0.x, H0.x), a[1] = q6_quants_x4<4, 4>(L1.x, H1.x);
        a[2] = q6_quants_x4<4, 4>(L0.y, H0.y), a[3] = q6_quants_x4<4, 4>(L1.y, H1.y);
      } else {
        a[0] = q6_quants_x4<4, 6>(L0.x, H0.x), a[1] = q6_quants_x4<4, 6>(L1.x, H1.x);
        a[2] = q6_quants_x4<4, 6>(L0.y, H0.y), a[3] = q6_quants_x4<4, 6>(L1.y, H1.y);
      }
      const int blk = 4 * n + tq;
      // B of the first group only (lanes t >= 2 zeroed), then of the second only.
      const uint32_t bf0 = first_group ? act.b[blk][0] : 0u, bf1 = first_group ? act.b[blk][1] : 0u;
      int ce[4], co[4];
      mma_k32_z(ce, a, bf0, bf1);
      mma_k32_z(co, a, act.b[blk][0] ^ bf0, act.b[blk][1] ^ bf1);
      const int sb = 2 * (tq & 1);  // group 8n + 2tq: byte sb of word tq >> 1 of the half's scales
      const uint32_t sw0 = (tq >> 1) ? sc0.y : sc0.x, sw1 = (tq >> 1) ? sc1.y : sc1.x;
      const int se0 = byte_s(sw0, sb), so0 = byte_s(sw0, sb + 1);
      const int se1 = byte_s(sw1, sb), so1 = byte_s(sw1, sb + 1);
      acc[0] = fmaf(__int2float_rn(se0 * ce[0] + so0 * co[0]), act.dx0[blk], acc[0]);
      acc[1] = fmaf(__int2float_rn(se0 * ce[1] + so0 * co[1]), act.dx1[blk], acc[1]);
      acc[2] = fmaf(__int2float_rn(se1 * ce[2] + so1 * co[2]), act.dx0[blk], acc[2]);
      acc[3] = fmaf(__int2float_rn(se1 * ce[3] + so1 * co[3]), act.dx1[blk], acc[3]);
    }
  }
  const float d0 = 0.25f * h2f(lds16at(r0, o0 + 208)), d1 = 0.25f * h2f(lds16at(r1, o1 + 208));
  r[0] = d0 * acc[0];
  r[1] = d0 * acc[1];
  r[2] = d1 * acc[2];
  r[3] = d1 * acc[3];
}

// The fused norm: rms_norm_mul_q8_1 of the launch's batch rows, computed by this CTA into `act`
// (Q8_1 rows, the bytes the standalone kernel writes; norm.cuh). Out of line: it runs once per CTA,
// and inlining nine instantiations would crowd the main loop.
__device__ __noinline__ void norm_phase(const Params& p, uint8_t* act) {
  uint32_t* words = reinterpret_cast<uint32_t*>(act);  // rows of 9-word blocks, 4-byte aligned
  const int nb = p.x_blocks;
  cta_norm_q8_1(p.norm, p.batch, static_cast<int64_t>(nb) * kQK,
                [&](int b, int64_t blk, int j, uint32_t word, uint32_t ds, uint32_t) {
                  uint32_t* o = words + 9 * (static_cast<int64_t>(b) * nb + blk);
                  o[1 + j] = word;
                  if (j == 0) o[0] = ds;
                });
}

template <int kCols, int kMask>
__global__ void __launch_bounds__(kThreads, 1) mat_vec_kernel(const __grid_constant__ Params p) {
  extern __shared__ __align__(16) uint8_t smem[];
  // Let the next kernel in the stream be scheduled now: it reads only weights before its own wait.
  allow_dependent_launch();

  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const int32_t tile0 = p.cta_tile[blockIdx.x];
  const int32_t tile1 = p.cta_tile[blockIdx.x + 1];
  const int32_t n_tiles = tile1 - tile0;
  if (n_tiles <= 0) return;  // nothing read, nothing written

  TileInfo* tiles = reinterpret_cast<TileInfo*>(smem);
  uint8_t* stage_base = smem + static_cast<size_t>(p.max_tiles) * sizeof(TileInfo);
  float* partials = reinterpret_cast<float*>(stage_base + static_cast<size_t>(kWarps) * p.stages * p.stage_bytes);
  float* scratch = partials + static_cast<size_t>(p.max_tiles) * p.k_groups * 32 * 4 +
                   static_cast<size_t>(threadIdx.x >> 5) * kScratchFloats;

  build_tile_table(p, tile0, n_tiles, tiles);

  // Bulk L2 prefetch of this CTA's weight bytes (capped), one chunk per lane of warp 0.
  if (warp == 0 && p.prefetch_cap != 0) {
    uint32_t budget = p.prefetch_cap;
    int chunk = 0;
    for (int s = 0; s < p.n_seg && budget != 0; ++s) {
      const SegDesc& sd = p.seg[s];
      const int32_t seg_tiles = (sd.rows + kTileRows - 1) / kTileRows;
      const int32_t a = max(tile0, sd.tile_begin), b = min(tile1, sd.tile_begin + seg_tiles);
      if (a >= b) continue;
      const int64_t begin = sd.byte_offset + static_cast<int64_t>(a - sd.tile_begin) * kTileRows * sd.row_bytes;
      const int64_t end = sd.byte_offset + min64(static_cast<int64_t>(b - sd.tile_begin) * kTileRows, sd.rows) * sd.row_bytes;
      const int64_t bytes = min64((end - begin) & ~int64_t{15}, budget);
      budget -= static_cast<uint32_t>(bytes);
      constexpr int64_t kChunk = 32 * 1024;
      for (int64_t off = 0; off < bytes; off += kChunk, ++chunk) {
        if ((chunk & 31) == lane) {
          prefetch_l2_bulk(p.weight + begin + off, static_cast<uint32_t>(min64(kChunk, bytes - off)));
        }
      }
    }
  }
  __syncthreads();  // the tile table

  const WarpShare ws = warp_share(p, warp, n_tiles);
  const int kg = ws.kg, tg = ws.tg, kw = ws.kw, tw = ws.tw, n_my_tiles = ws.n_my_tiles, n_items = ws.n_items;
  uint8_t* stages = stage_base + static_cast<size_t>(warp) * p.stages * p.stage_bytes;

  // Prologue: weights of the first stages - 1 items, before waiting for the producer of x.
  int is = 0, it = 0;  // issue cursor: (step index, tile index) of the next item to copy
  for (int j = 0; j < p.stages - 1; ++j) {
    if (j < n_items) {
      issue_item<kMask>(p, tiles[tw + it * tg], kw + is * kg, stages + j * p.stage_bytes, lane);
      if (++it == n_my_tiles) { it = 0; ++is; }
    }
    cp_async_commit();
  }

  grid_dependency_wait();

  // The Q8_1 activations: the caller's rows, or this CTA's own norm of x.
  const uint8_t* xq = p.x;
  if (p.norm.x != nullptr) {
    norm_phase(p, smem + p.act_offset);
    xq = smem + p.act_offset;
  }

  StepAct<kCols> act;
  int cs = 0, ct = 0;  // compute cursor
  // Ring positions of the stage being computed and of the one being refilled (stages - 1 ahead).
  int slot_compute = 0, slot_issue = p.stages - 1;
  for (int j = 0; j < n_items; ++j) {
    __syncwarp();  // every lane is done with the stage about to be refilled
    if (j + p.stages - 1 < n_items) {
      issue_item<kMask>(p, tiles[tw + it * tg], kw + is * kg, stages + slot_issue * p.stage_bytes, lane);
      if (++it == n_my_tiles) { it = 0; ++is; }
    }
    if (++slot_issue == p.stages) slot_issue = 0;
    cp_async_commit();
    const int step = kw + cs * kg;
    if (ct == 0) load_step<kCols>(p, xq, step, lane, act);  // in flight while the stage lands
    cp_async_wait_dyn(p.stages - 1);  // all but the newest stages - 1 groups: item j has landed
    __syncwarp();                     // ... for every lane's copies

    const int tl = tw + ct * tg;
    const TileInfo ti = tiles[tl];
    const SegDesc& sd = p.seg[ti.seg];
    const uint8_t* stage = stages + slot_compute * p.stage_bytes;
    if (++slot_compute == p.stages) slot_compute = 0;
    float r[4] = {0.f, 0.f, 0.f, 0.f};
    switch (sd.type) {
      case kQ4_0: if constexpr (kMask & 1) compute_item_typed<kQ4_0, kCols>(p, sd, ti, step, stage, scratch, act, lane, r); break;
      case kQ5_0: if constexpr (kMask & 2) compute_item_typed<kQ5_0, kCols>(p, sd, ti, step, stage, scratch, act, lane, r); break;
      case kQ8_0: if constexpr (kMask & 4) compute_item_typed<kQ8_0, kCols>(p, sd, ti, step, stage, scratch, act, lane, r); break;
      case kQ4_K: if constexpr (kMask & 8) compute_item_typed<kQ4_K, kCols>(p, sd, ti, step, stage, scratch, act, lane, r); break;
      case kQ5_K: if constexpr (kMask & 16) compute_item_typed<kQ5_K, kCols>(p, sd, ti, step, stage, scratch, act, lane, r); break;
      case kQ6_K: if constexpr (kMask & 32) compute_item_typed<kQ6_K, kCols>(p, sd, ti, step, stage, scratch, act, lane, r); break;
      default: break;
    }
    add_partial(partials, partial_slot(tl, kg, kw, 1, 0), lane, cs == 0, r);
    if (++ct == n_my_tiles) { ct = 0; ++cs; }
  }
  cp_async_wait<0>();
  __syncthreads();

  store_tiles(p, tiles, partials, n_tiles);
}

// Registers per thread of the direct kernel. With 96, a CTA (512 threads: 48 K registers) leaves room
// on its SM for one CTA of the norm kernel (256 threads x 56: 14 K of the 64 K), so the next layer's
// norm starts as soon as the PDL trigger allows instead of when this kernel's CTAs exit: H200, QKV
// B = 8 with norm, 12.48-12.66 us at 95 registers, 15.34 when the compiler took 122.
constexpr int kDirectMaxRegisters = 96;
// The same cap for the launches of several batch chunks (an experiment knob: -DGGFUSE_DIRECT_CHUNKED_MAXREG=N).
#ifndef GGFUSE_DIRECT_CHUNKED_MAXREG
#define GGFUSE_DIRECT_CHUNKED_MAXREG 96
#endif
constexpr int kDirectChunkedMaxRegisters = GGFUSE_DIRECT_CHUNKED_MAXREG;

// The direct kernel (kMask: one of the kDirect* type sets): the staged kernel's work split (CTA tile
// ranges, K groups, partial slots, store); each warp's items go through its ring of p.stages slots of
// p.stage_bytes, the first p.stages issued before the PDL wait, so they overlap the producer of x.
// kChunked: the launch has p.col_chunks > 1 batch chunks of 8 rows, and each item, once in shared
// memory, is computed against every chunk (the activations loaded per item and chunk: too many to
// keep in registers), with a partial slot per (tile, K group, chunk). One launch then reads and
// stages each weight byte once for up to 64 batch rows, where a launch per 8 rows reads it 8 times;
// launch_direct says where that measured faster.
template <int kMask, bool kChunked>
__global__ void __maxnreg__(kChunked ? kDirectChunkedMaxRegisters : kDirectMaxRegisters) mat_vec_direct_kernel(const __grid_constant__ Params p) {
  extern __shared__ __align__(16) uint8_t smem[];
  allow_dependent_launch();

  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const int32_t tile0 = p.cta_tile[blockIdx.x];
  const int32_t n_tiles = p.cta_tile[blockIdx.x + 1] - tile0;
  if (n_tiles <= 0) return;

  TileInfo* tiles = reinterpret_cast<TileInfo*>(smem);
  float* partials = reinterpret_cast<float*>(smem + direct_partials_offset(p.max_tiles));
  DirectTile* dtiles = reinterpret_cast<DirectTile*>(smem + direct_dtiles_offset(p.max_tiles, p.k_groups, p.col_chunks));
  build_tile_table(p, tile0, n_tiles, tiles);
  // Each thread reads back only the entries it wrote itself (same i stride): no barrier needed here.
  for (int i = threadIdx.x; i < n_tiles; i += blockDim.x) {
    const TileInfo ti = tiles[i];
    const SegDesc& sd = p.seg[ti.seg];
    DirectTile dt;
    dt.row0 = p.weight + sd.byte_offset + static_cast<int64_t>(ti.row0) * sd.row_bytes;
    dt.seg_end = p.weight + sd.byte_offset + static_cast<int64_t>(sd.rows) * sd.row_bytes;
    dt.row_bytes = static_cast<int32_t>(sd.row_bytes);
    dt.rows_valid = static_cast<int16_t>(ti.rows_valid);
    dt.type = static_cast<int16_t>(sd.type);
    dtiles[i] = dt;
  }
  __syncthreads();

  const WarpShare ws = warp_share(p, warp, n_tiles);
  const int kg = ws.kg, tg = ws.tg, kw = ws.kw, tw = ws.tw, n_my_tiles = ws.n_my_tiles, n_items = ws.n_items;

  int is = 0, it = 0;  // issue cursor (step index, tile index)
  const int slots = p.stages;
  uint8_t* ring = smem + p.act_offset + static_cast<size_t>(warp) * slots * p.stage_bytes;
  auto issue = [&](uint8_t* slot) {
    const DirectTile& dt = dtiles[tw + it * tg];
    const int step = kw + is * kg;
    if ((kMask & type_bit(kQ6_K)) != 0 && dt.type == kQ6_K) {
      stage_q6k_item(dt, step, lane, slot);
    } else {
      stage_aligned_item(dt, step, lane, slot);
    }
    if (++it == n_my_tiles) { it = 0; ++is; }
  };
  for (int j = 0; j < slots; ++j) {
    if (j < n_items) issue(ring + j * p.stage_bytes);
    cp_async_commit();
  }

  grid_dependency_wait();

  DirectAct act;
  int cs = 0, ct = 0;  // compute cursor
  int slot = 0;
  for (int j = 0; j < n_items; ++j) {
    cp_async_wait_dyn(slots - 1);  // item j's group has landed (slots - 1 newer ones may be pending)
    __syncwarp();                  // ... for every lane's copies
    const int step = kw + cs * kg;
    const uint8_t* s = ring + slot * p.stage_bytes;
    const int tl = tw + ct * tg;
    // One chunk of 8 batch rows at a time: the kChunked launch's p.col_chunks, or this launch's only one.
    const int n_chunks = kChunked ? p.col_chunks : 1;
    for (int c = 0; c < n_chunks; ++c) {
      if (kChunked || ct == 0) {
        const int cols = kChunked ? min(kMaxCols, p.batch - kMaxCols * c) : p.batch;
        load_direct_act<kMask>(p, p.x + static_cast<int64_t>(kMaxCols) * c * p.x_row_bytes, cols, step, lane, act);
      }
      float r[4];
      if constexpr (kMask == kDirectQ4_0) {
        compute_q4_0_item(s, act, lane, r);
      } else if constexpr (kMask == kDirectQ4K) {
        compute_q4k_item(s, act, lane, r);
      } else {
        const DirectTile& dt = dtiles[tl];
        if (dt.type == kQ6_K) {
          const int g = lane >> 2;
          compute_q6k_item(s, q6k_row_offset(dt, step, g), q6k_row_offset(dt, step, g + 8), act, lane, r);
        } else {
          compute_q4k_item(s, act, lane, r);
        }
      }
      add_partial(partials, partial_slot(tl, kg, kw, n_chunks, c), lane, cs == 0, r);
    }
    if (++ct == n_my_tiles) { ct = 0; ++cs; }
    __syncwarp();  // every lane has read the slot before it is refilled
    if (j + slots < n_items) issue(ring + slot * p.stage_bytes);
    cp_async_commit();
    if (++slot == slots) slot = 0;
  }
  cp_async_wait<0>();
  __syncthreads();
  store_tiles(p, tiles, partials, n_tiles);
}

// Tiles of the busiest CTA for a grid size (host copy of the kernel's split).
int max_tiles_for(const Params& p, int grid) {
  int max_tiles = 0;
  for (int c = 0; c < grid; ++c) {
    const int32_t a = first_tile_at(p, cta_cost_bound(p, c, grid));
    const int32_t b = first_tile_at(p, cta_cost_bound(p, c + 1, grid));
    max_tiles = std::max(max_tiles, b - a);
  }
  return max_tiles;
}

// K groups: the split of the 16 warps that gives the busiest warp the fewest items, within the shared
// memory for partial sums (partial_cap bytes); ties go to more K groups (fewer activation loads per warp).
int best_k_groups(const Params& p, size_t partial_cap = kMaxPartialBytes) {
  int best_kg = 1;
  int64_t best_items = INT64_MAX;
  for (int kg = kWarps; kg >= 1; kg /= 2) {
    const int tg = kWarps / kg;
    const int64_t items = static_cast<int64_t>((p.steps + kg - 1) / kg) * ((p.max_tiles + tg - 1) / tg);
    const size_t partial_bytes = static_cast<size_t>(p.max_tiles) * kg * p.col_chunks * 32 * 16;
    if (partial_bytes > partial_cap && kg > 1) continue;
    if (items < best_items) { best_items = items; best_kg = kg; }
  }
  return best_kg;
}

// Tuning knobs for experiments (docs/PERFORMANCE.md has the measurements), read once:
// GGFUSE_MV_STAGES (2..4 stages of the staged kernel, 1..8 slots per warp of the direct one; default
// 2), GGFUSE_MV_KGROUPS (1..16, a power of two; default chosen per launch), GGFUSE_MV_PREFETCH=1 (bulk L2 prefetch of each CTA's weights; default off: it measured
// 13% slower), GGFUSE_FUSED_NORM=1 (rms_norm_mat_vec_q8_1 normalizes inside the mat-vec kernel;
// default off: with PDL the separate norm kernel measured faster), GGFUSE_MV_DP4A (the largest
// batch chunk that runs mat_vec_dp4a.cu's kernel for every type; 0: never; unset: the measured rule
// above kDp4aAutoMaxBatch), GGFUSE_MV_STAGED (0/1: the dp4a kernel never / always stages its rows in
// shared memory; unset: the measured rule above), GGFUSE_MV_DIRECT=0 (weights the direct kernel handles
// take the staged kernel instead of mat_vec_direct_kernel), GGFUSE_MV_Q6K_COST (the direct kernel's
// CTA balance: a Q6_K item's work in quarters of a Q4_K item; unset: q6k_cost_for; 0: by weight bytes).
struct Overrides {
  int stages = env_int("GGFUSE_MV_STAGES", 2);
  int k_groups = env_int("GGFUSE_MV_KGROUPS", 0);
  bool prefetch = env_int("GGFUSE_MV_PREFETCH", 0) != 0;
  bool fused_norm = env_int("GGFUSE_FUSED_NORM", 0) != 0;
  int dp4a_forced = env_int("GGFUSE_MV_DP4A", -1);  // -1: the measured rule
  int staged_forced = env_int("GGFUSE_MV_STAGED", -1);  // -1: the measured rule
  bool direct = env_int("GGFUSE_MV_DIRECT", 1) != 0;
  int q6k_cost = env_int("GGFUSE_MV_Q6K_COST", -1);  // direct kernel: a Q6_K item's work in quarter Q4_K items; 0: balance by bytes; -1: q6k_cost_for
  // Direct kernel: 8-row batch chunks per launch above 8 rows. 0 (unset): up to kMaxChunks where the
  // launch's busiest warp has one item (launch_direct); N: N for every launch (1: never several).
  int chunks = std::clamp(env_int("GGFUSE_MV_CHUNKS", 0), 0, kMaxChunks);
  bool stream = env_int("GGFUSE_MV_STREAM", 0) > 0;  // the opt-in streaming kernel keeps every 8-row chunk it takes
  // The wide kernel (mat_vec_wide_kernel) for batch chunks of at least this many rows (0: never).
  int wide_min = env_int("GGFUSE_MV_WIDE", kMaxCols + 1);
  int wide_split = env_int("GGFUSE_MV_WIDE_SPLIT", 0);  // its CTAs per cluster (0: launch_wide's rule)
};
const Overrides& overrides() {
  static const Overrides o;
  return o;
}

// Whether a batch chunk of `batch` rows of weights with these types (type_bit set) runs the dp4a
// kernel, and with which rows staged (the measured rule above, or the GGFUSE_MV_DP4A / _STAGED knobs).
// `direct`: the direct MMA kernel takes these weights; it beats the staged dp4a kernel from B = 3
// on the 2-byte aligned types it handles (H200, QKV 4096 -> 6144 with norm, B = 3 / 4: Q4_0 12.29 /
// 12.58 us against 12.17 / 13.38, Q4_K+Q6_K 13.64 / 13.99 against 14.16 / 15.47; gate|up Q4_0
// 29.99 / 30.30 against 35.92 / 40.58).
bool use_dp4a(int types, int batch, bool direct, DpStaging* staging) {
  const Overrides& ov = overrides();
  *staging = ov.staged_forced == 0 ? DpStaging::kNone
             : ov.staged_forced > 0 ? DpStaging::kAll
                                    : DpStaging::kTwoByteTypes;
  if (ov.dp4a_forced >= 0) return batch <= ov.dp4a_forced;
  if ((types & kMask2ByteAligned) != 0) return batch <= (direct ? kDp4aAutoMaxBatch : kDp4aStagedMaxBatch);
  return batch <= kDp4aAutoMaxBatch && (types & ~kDp4aAutoTypes) == 0;
}

template <int kCols, int kMask>
cudaError_t launch_cols(Params& p, int device, cudaStream_t stream) {
  const Overrides& ov = overrides();
  const int sms = std::max(1, device_attribute(device, cudaDevAttrMultiProcessorCount));
  // The dynamic share's limit: the opt-in maximum less the norm's static scratch (fused norm only).
  const int smem_optin = device_attribute(device, cudaDevAttrMaxSharedMemoryPerBlockOptin) -
                         (p.norm.x != nullptr ? kNormScratchBytes : 0);
  const int l2 = device_attribute(device, cudaDevAttrL2CacheSize);
  int grid = std::min({sms, p.total_tiles, kMaxGrid});
  size_t smem = 0;
  for (;;) {
    p.max_tiles = max_tiles_for(p, grid);
    p.k_groups = ov.k_groups > 0 ? ov.k_groups : best_k_groups(p);
    const size_t before_act = static_cast<size_t>(p.max_tiles) * sizeof(TileInfo) +
                              static_cast<size_t>(p.max_tiles) * p.k_groups * 32 * 16 +
                              static_cast<size_t>(kWarps) * kScratchFloats * sizeof(float);
    // Fused norm: the CTA's Q8_1 rows follow the scratch.
    size_t norm_bytes = 0;
    if (p.norm.x != nullptr) norm_bytes = (static_cast<size_t>(p.batch) * p.x_row_bytes + 15) & ~size_t{15};
    const size_t fixed = before_act + norm_bytes;
    const size_t per_stage = static_cast<size_t>(kWarps) * p.stage_bytes;
    const size_t room = smem_optin > static_cast<int>(fixed) ? smem_optin - fixed : 0;
    p.stages = static_cast<int32_t>(std::clamp<size_t>(ov.stages > 0 ? ov.stages : room / per_stage, 2, 4));
    smem = fixed + per_stage * p.stages;
    if (smem <= static_cast<size_t>(smem_optin) || grid >= p.total_tiles) break;
    if (grid >= kMaxGrid) break;
    grid = std::min({p.total_tiles, grid * 2, kMaxGrid});  // more CTAs, fewer tiles (and slots) each
  }
  if (smem > static_cast<size_t>(smem_optin)) {
    return p.norm.x != nullptr ? cudaErrorNotSupported : cudaErrorInvalidConfiguration;
  }
  if (p.norm.x != nullptr) {  // the kernel's layout: tiles | stages | partials | scratch | act
    p.act_offset = static_cast<int32_t>(static_cast<size_t>(p.max_tiles) * sizeof(TileInfo) +
                                        static_cast<size_t>(kWarps) * p.stages * p.stage_bytes +
                                        static_cast<size_t>(p.max_tiles) * p.k_groups * 32 * 16 +
                                        static_cast<size_t>(kWarps) * kScratchFloats * sizeof(float));
  }
  for (int c = 0; c <= grid; ++c) p.cta_tile[c] = first_tile_at(p, cta_cost_bound(p, c, grid));
  // Prefetch at most half the L2 across the grid, so a layer larger than the L2 does not evict its
  // own prefetched bytes before they are read.
  p.prefetch_cap = ov.prefetch ? static_cast<uint32_t>(std::min<int64_t>(int64_t{1} << 20, static_cast<int64_t>(l2) / 2 / grid)) & ~15u : 0u;
  static int smem_set[64] = {};  // per device and variant: the dynamic shared memory limit raised
  const cudaError_t err = allow_smem(mat_vec_kernel<kCols, kMask>, smem, smem_set);
  if (err != cudaSuccess) return err;
  return launch_kernel(mat_vec_kernel<kCols, kMask>, dim3(grid), dim3(kThreads), smem, stream, p);
}

// The direct kernel: shared memory holds the tile tables, the partial slots and the warps' slot rings.
// InvalidConfiguration when not even one slot per warp fits (the caller then runs the staged kernel;
// p is left as it was for it).
// The direct kernel is bound by its instructions, not by the bytes: a Q6_K item costs about 1.75x a
// Q4_K one (H200, gate|up Q4_K | Q6_K at B = 8: 40.0 us against 25.7 for Q4_K alone, with the Q6_K
// CTAs the last to finish), not the 1.46x of its bytes. Balancing CTAs by bytes gave four CTAs of the
// mixed QKV three Q6_K tiles (~5.3 Q4_K tiles of work where the others had at most 4). Measured
// (H200, norm -> mat-vec, B = 8, Q6_K cost 0 (bytes) / 6 / 7 / 8 / 9 / 10 quarters): QKV 4096 14.20 /
// 14.17 / 13.60 / 13.39 / 13.25 / 13.08 us, gate|up 43.83 / 43.79 / 40.62 / 43.97 / 42.70 / 45.79, QKV
// 8192 32.41 / - / 30.45 / 30.33 / 30.24 / 30.38: 7 is the best compromise (the tile-count rounding
// of each split moves the stragglers between the Q4_K and the Q6_K CTAs).
// v16 measured it again with today's norm (H200, B = 4 / 8, costs 7..12; docs/PERFORMANCE.md v16):
// where the Q6_K rows are a minority (QKV with a Q6_K V), a higher cost, which gives the Q6_K CTAs
// less than their share, lets the next layer's norm overlap this layer again (QKV 4096 at B = 8,
// norm -> mat-vec: 11.60 us at 7, 10.78 at 11; mat-vec alone 10.00 / 9.96), and 2048 / 5120-wide
// QKV gain 1.3-3 us; where they are half the rows (gate | up) the same shift overloads the Q4_K CTAs
// (37.87 -> 44.63). Hence 11 when at most a quarter of the rows are Q6_K, else 7.
int q6k_cost_for(const Params& q) {
  int64_t q6k_rows = 0, rows = 0;
  for (int s = 0; s < q.n_seg; ++s) {
    rows += q.seg[s].rows;
    if (q.seg[s].type == kQ6_K) q6k_rows += q.seg[s].rows;
  }
  return 4 * q6k_rows <= rows ? 11 : 7;
}

void balance_direct_by_work(Params& q, int q6k_cost) {
  int64_t cost = 0;
  for (int s = 0; s < q.n_seg; ++s) {
    SegDesc& sd = q.seg[s];
    sd.row_cost = static_cast<int64_t>(q.steps) * (sd.type == kQ6_K ? q6k_cost : 4);
    sd.cost_begin = cost;
    cost += static_cast<int64_t>(sd.rows) * sd.row_cost;
  }
  q.total_cost = cost;
}

// Launches one instance of the direct kernel, raising its dynamic shared memory limit first where needed.
template <int kMask, bool kChunked>
cudaError_t launch_direct_kernel(int device, int grid, size_t smem, cudaStream_t stream, const Params& q) {
  auto* kernel = mat_vec_direct_kernel<kMask, kChunked>;
  static int smem_set[64] = {};  // per device (and instance): the dynamic shared memory limit raised
  const cudaError_t err = allow_smem(kernel, smem, smem_set);
  if (err != cudaSuccess) return err;
  return launch_kernel(kernel, dim3(grid), dim3(kThreads), smem, stream, q);
}

// The direct kernel's shared-memory plan for a grid: the busiest CTA's tiles, the K groups, the
// slots per warp (GGFUSE_MV_STAGES, default 2, at most the busiest warp's items and what fits; two
// measured best on the H200: QKV Q4_K B = 8 with norm 12.48 us against 13.28 with all three of a
// warp's items in flight and 21.24 with one; gate|up 30.17 against 32.04 with 4 slots). Returns the
// dynamic shared memory; `enough` says whether the slots per warp reached min(items, 2).
size_t plan_direct(Params& q, int grid, int smem_optin, bool* enough, int64_t* busiest_items = nullptr) {
  const Overrides& ov = overrides();
  const size_t per_slot = static_cast<size_t>(kWarps) * q.stage_bytes;
  // The partial slots' share: 64 KB for one batch chunk (the measured default); with several, what
  // two slots per warp leave of the opt-in maximum (the tables take at most a few KB).
  const size_t partial_cap =
      q.col_chunks == 1 ? kMaxPartialBytes
                        : std::max<size_t>(kMaxPartialBytes, smem_optin > static_cast<int>(2 * per_slot + 8192)
                                                                 ? smem_optin - 2 * per_slot - 8192 : 0);
  q.max_tiles = max_tiles_for(q, grid);
  q.k_groups = ov.k_groups > 0 ? ov.k_groups : best_k_groups(q, partial_cap);
  const size_t fixed = direct_slots_offset(q.max_tiles, q.k_groups, q.col_chunks);
  const int tg = kWarps / q.k_groups;
  const int64_t items = static_cast<int64_t>((q.steps + q.k_groups - 1) / q.k_groups) * ((q.max_tiles + tg - 1) / tg);
  const size_t room = smem_optin > static_cast<int>(fixed) ? smem_optin - fixed : 0;
  const int cap = std::clamp(ov.stages, 1, kDirectMaxSlots);
  q.stages = static_cast<int32_t>(std::min<int64_t>({items, cap, static_cast<int64_t>(room / per_slot)}));
  q.act_offset = static_cast<int32_t>(fixed);  // the slots follow the tables and partial slots
  *enough = q.stages >= std::min<int64_t>(items, 2);
  if (busiest_items != nullptr) *busiest_items = items;
  return fixed + per_slot * std::max(q.stages, 1);
}

// Launches the direct kernel for p.batch rows (up to kMaxChunks * 8); *cols_done: the batch rows it
// took, fewer than p.batch where the partial slots of that many chunks do not fit next to two slots
// per warp in a grid of one CTA per SM (the chunks are then halved, not the CTAs made smaller), and
// only 8 unless every warp of the launch has a single item (or GGFUSE_MV_CHUNKS forces chunks). A
// chunked launch loads the activations per item and chunk, where one launch per 8 rows loads them
// once per step for all the warp's tiles, and its warps do their chunks one after the other: H200,
// mat-vec alone, 8 launches -> one (docs/PERFORMANCE.md v19): QKV 2048 (one item per warp) B = 64
// 46.4 -> 23.0 us, B = 16 11.4 -> 8.3; QKV 4096 (3 items) B = 64 70.3 -> 61.3 but B = 16 18.2 ->
// 19.7; QKV 8192 and gate|up (10-32 items) 1.3-1.45x slower.
template <int kMask>
cudaError_t launch_direct(Params& p, int device, cudaStream_t stream, int* cols_done) {
  const Overrides& ov = overrides();
  const int sms = std::max(1, device_attribute(device, cudaDevAttrMultiProcessorCount));
  const int smem_optin = device_attribute(device, cudaDevAttrMaxSharedMemoryPerBlockOptin);
  Params q = p;
  q.stage_bytes = direct_slot_bytes(kMask);
  q.col_chunks = static_cast<int32_t>((q.batch + kMaxCols - 1) / kMaxCols);
  const int q6k_cost = ov.q6k_cost >= 0 ? ov.q6k_cost : q6k_cost_for(q);
  if (q6k_cost > 0) balance_direct_by_work(q, q6k_cost);
  int grid = std::min({sms, q.total_tiles, kMaxGrid});
  bool enough = false;
  int64_t busiest = 0;
  size_t smem = plan_direct(q, grid, smem_optin, &enough, &busiest);
  if (q.col_chunks > 1 && ov.chunks == 0 && busiest > 1) {  // the measured rule (above): 8 rows
    q.col_chunks = 1;
    q.batch = std::min(q.batch, kMaxCols);
    smem = plan_direct(q, grid, smem_optin, &enough);
  }
  while (!enough && q.col_chunks > 1) {
    q.col_chunks = (q.col_chunks + 1) / 2;
    q.batch = std::min(q.batch, q.col_chunks * kMaxCols);
    smem = plan_direct(q, grid, smem_optin, &enough);
  }
  while (!enough && grid < std::min(q.total_tiles, kMaxGrid)) {
    grid = std::min({q.total_tiles, grid * 2, kMaxGrid});  // more CTAs, fewer tiles (and slots) each
    smem = plan_direct(q, grid, smem_optin, &enough);
  }
  if (q.stages < 1 || smem > static_cast<size_t>(smem_optin)) return cudaErrorInvalidConfiguration;
  for (int c = 0; c <= grid; ++c) q.cta_tile[c] = first_tile_at(q, cta_cost_bound(q, c, grid));
  *cols_done = q.batch;
  return q.col_chunks > 1 ? launch_direct_kernel<kMask, true>(device, grid, smem, stream, q)
                          : launch_direct_kernel<kMask, false>(device, grid, smem, stream, q);
}

// The direct kernel's type set for a launch, or 0 where it does not apply (other types, or K not a
// multiple of 256: its items are whole 256-value steps).
int direct_mask(const Params& p, int types) {
  if (p.x_blocks % kStepBlocks != 0) return 0;
  if (types == kDirectQ4K) return kDirectQ4K;
  if ((types & ~kDirectKQuants) == 0) return kDirectKQuants;
  if (types == kDirectQ4_0) return kDirectQ4_0;
  return 0;
}

// The launch parameters common to both entry points; returns the type_bit set of the segments, or -1.
int fill_params(Params& p, const uint8_t* weight, const SegmentTable& table, int64_t k, int64_t n_out) {
  p.weight = weight;
  p.steps = static_cast<int32_t>((k + kStepValues - 1) / kStepValues);
  p.x_blocks = static_cast<int32_t>(k / kQK);
  p.x_row_bytes = k / kQK * static_cast<int64_t>(sizeof(BlockQ8_1));
  p.n_out = static_cast<int32_t>(n_out);
  p.n_seg = table.count;
  p.col_chunks = 1;
  int max_stride = 0;
  int types = 0;  // type_bit of every segment
  int64_t cost = 0;
  int32_t tiles = 0;
  for (int s = 0; s < table.count; ++s) {
    const Segment& in = table.seg[s];
    SegDesc& sd = p.seg[s];
    sd.byte_offset = in.byte_offset;
    sd.row_bytes = row_bytes(in.type, k);
    if (sd.row_bytes <= 0 || stage_row_stride(in.type) == 0 || in.rows <= 0) return -1;
    sd.type = in.type;
    sd.rows = in.rows;
    sd.col_begin = in.row_begin;
    sd.tile_begin = tiles;
    sd.row_cost = sd.row_bytes;
    sd.cost_begin = cost;
    tiles += (in.rows + kTileRows - 1) / kTileRows;
    cost += static_cast<int64_t>(in.rows) * sd.row_cost;
    max_stride = std::max(max_stride, stage_row_stride(in.type));
    types |= type_bit(in.type);
  }
  p.total_tiles = tiles;
  p.total_cost = cost;
  p.stage_bytes = kTileRows * max_stride;
  return types;
}

cudaError_t launch_direct_any(Params& p, int dmask, int device, cudaStream_t stream, int* cols_done) {
  return dmask == kDirectQ4K    ? launch_direct<kDirectQ4K>(p, device, stream, cols_done)
         : dmask == kDirectQ4_0 ? launch_direct<kDirectQ4_0>(p, device, stream, cols_done)
                                : launch_direct<kDirectKQuants>(p, device, stream, cols_done);
}

// ---- batches of more than 8 rows: mat_vec_wide_kernel ----
// The direct kernel is built for B <= 8: each warp takes K steps of several tiles and loads one K
// step's activations (8 columns) into registers. Above 8 rows it runs once per 8 rows (each launch
// reading every weight byte again and costing about the B = 8 time: QKV 4096 at B = 64 70 us on the
// H200 where torch bf16 takes 24), or, where each warp has one item, computes each staged item
// against every 8-row chunk (v19: only the 2048-wide QKV gained). This kernel is shaped like a GEMM:
//   * a CTA of 8 warps owns 8 tiles (128 rows), one per warp, for a contiguous range of K steps; the
//     warp keeps its sums for every chunk of 8 batch rows in registers across its steps, so it needs
//     no partial slots in shared memory;
//   * each K step's activations of all the batch rows (up to 64) are copied once per CTA into shared
//     memory (cp.async), then rewritten once into the B-fragment order of the direct kernel (each
//     lane's two words of a block side by side), with the per-column products of the epilogue (d_x,
//     the Q4_K min product's TF32 parts, Q4_0's s_x): a warp reads a chunk's DirectAct with 22
//     shared loads instead of the direct kernel's global loads, shuffles and dp4a sums;
//   * each warp stages its tile's item of the next K steps (a ring of 2-3 slots, the first issued
//     before the PDL wait) and computes it against every chunk: Q4_K items unpack each A fragment
//     once for all chunks (wide_q4k_item), Q6_K and Q4_0 items go through the direct kernel's item
//     functions once per chunk; the chunk count (1, 2, 4, 8) is a template parameter, so the sums
//     stay in registers;
//   * K is split over a cluster of `split` CTAs (sm_90, distributed shared memory) so that layers of
//     few row groups still fill the SMs (QKV 4096: 48 groups, 4 CTAs per cluster); at the end every
//     CTA puts its sums in its shared memory and each CTA of the cluster adds a share of the outputs
//     over the cluster's CTAs in rank order (deterministic), and stores them.
constexpr int kWideWarps = 8;                              // tiles (of 16 rows) per CTA
constexpr int kWideThreads = kWideWarps * 32;
constexpr int kWideMaxCols = kMaxCols * kMaxChunks;        // batch rows per launch (64)
constexpr int kWideMaxSplit = 8;                           // CTAs per cluster (the portable limit)
constexpr double kWideSplitOverhead = 4.0;                // launch_wide's cost model: a CTA's fixed cost in steps
constexpr int kStepActBytes = kStepBlocks * static_cast<int>(sizeof(BlockQ8_1));  // 288: 16-byte granules

struct WideSeg {
  int64_t byte_offset;
  int32_t row_bytes;
  int32_t rows;
  int32_t col_begin;  // first output column
  int32_t tile_begin;
  int32_t type;
  int32_t pad;
};

struct WideParams {
  WideSeg seg[kMaxSegments];
  const uint8_t* weight;
  const uint8_t* x;       // Q8_1 rows of this launch's batch (16-byte aligned)
  float* out;             // [batch, n_out] of this launch
  int64_t x_row_bytes;    // K / 32 * 36 (a multiple of 288)
  int32_t n_seg;
  int32_t total_tiles;
  int32_t steps;          // K / 256
  int32_t batch;          // 1..64
  int32_t chunks;         // ceil(batch / 8)
  int32_t n_out;
  int32_t split;          // CTAs per cluster, each a contiguous share of the K steps (1..8)
  int32_t slots;          // weight slots per warp (2 or 3)
  int32_t slot_bytes;     // one slot: 16 rows at the direct kernel's row stride
};

// Shared memory of the wide kernel, in this order (every part 16-byte aligned): the warps' weight
// slots (after the main loop: the per-CTA sums of the cluster reduction), one step's raw Q8_1 rows,
// the B fragments [chunk][block][lane] (uint2), and four [block][column] float tables: d_x, the min
// product's TF32 hi and lo parts, s_x.
struct WideSmem {
  size_t raw, frag, dx, total;
};
__host__ __device__ constexpr WideSmem wide_smem(int slots, int slot_bytes, int batch, int chunks) {
  const size_t slot_part = static_cast<size_t>(kWideWarps) * slots * slot_bytes;
  const size_t red_part = static_cast<size_t>(kWideWarps) * chunks * 32 * 16;
  WideSmem s{};
  s.raw = slot_part > red_part ? slot_part : red_part;
  s.frag = s.raw + ((static_cast<size_t>(batch) * kStepActBytes + 15) & ~size_t{15});
  s.dx = s.frag + static_cast<size_t>(chunks) * kStepBlocks * 32 * 8;
  s.total = s.dx + 4 * static_cast<size_t>(kStepBlocks) * chunks * kMaxCols * 4;
  return s;
}

// The output of lane `lane`'s C fragment of chunk `chunk` of tile `tile`: rows g, g + 8, columns 2t, 2t + 1.
__device__ __forceinline__ void wide_store(const WideParams& p, int tile, int chunk, int lane, float4 v) {
  int s = 0;
  while (s + 1 < p.n_seg && tile >= p.seg[s + 1].tile_begin) ++s;
  const WideSeg& sd = p.seg[s];
  store_c_fragment(p.out + sd.col_begin, (tile - sd.tile_begin) * kTileRows, sd.rows, chunk, lane, p.batch,
                   p.n_out, v);
}

// One K step's activations in shared memory, as the prep phase of mat_vec_wide_kernel leaves them.
struct WideAct {
  const uint2* frag;    // [chunk][block][lane]: the lane's B fragment words of the block
  const float* dx;      // [block][column]: d_x
  const uint32_t* mbh;  // [block][column]: the Q4_K min product's column factor d_x * sumq, TF32 hi part
  const uint32_t* mbl;  //   ... and lo part
  const float* sx;      // [block][column]: s_x (Q4_0)
  int cols8;            // columns of the tables: 8 per chunk
};

// The direct kernel's DirectAct of chunk c, read from the shared tables.
template <int kMask>
__device__ __forceinline__ void wide_chunk_act(const WideAct& wa, int c, int lane, DirectAct& act) {
  const int g = lane >> 2, t = lane & 3;
  const uint2* fr = wa.frag + c * kStepBlocks * 32 + lane;
#pragma unroll
  for (int j = 0; j < kStepBlocks; ++j) {
    const uint2 v = fr[j * 32];
    act.b[j][0] = v.x;
    act.b[j][1] = v.y;
    const float2 d = *reinterpret_cast<const float2*>(wa.dx + j * wa.cols8 + kMaxCols * c + 2 * t);
    act.dx0[j] = d.x;
    act.dx1[j] = d.y;
  }
  const int cg = kMaxCols * c + g;
  if constexpr ((kMask & type_bit(kQ4_K)) != 0) {
    act.mb_hi[0] = wa.mbh[t * wa.cols8 + cg];
    act.mb_hi[1] = wa.mbh[(t + 4) * wa.cols8 + cg];
    act.mb_lo[0] = wa.mbl[t * wa.cols8 + cg];
    act.mb_lo[1] = wa.mbl[(t + 4) * wa.cols8 + cg];
  }
  if constexpr ((kMask & type_bit(kQ4_0)) != 0) {
    act.sx[0] = __float_as_uint(wa.sx[t * wa.cols8 + cg]);
    act.sx[1] = __float_as_uint(wa.sx[(t + 4) * wa.cols8 + cg]);
  }
}

// A Q4_K item against kChunks chunks, added into acc: compute_q4k_item's arithmetic with the loops
// turned around, so each A fragment is unpacked once for every chunk (not once per chunk) and each
// sub-block's MMAs of all chunks are independent. d multiplies each term here (the per-item form
// multiplies the item's sum once), so every element and sub-block costs one instruction more.
template <int kChunks>
__device__ __forceinline__ void wide_q4k_item(const uint8_t* slot, const WideAct& wa, int lane,
                                              float (&acc)[kChunks][4]) {
  const int g = lane >> 2, t = lane & 3;
  const uint8_t* r0 = slot + g * kDirectRowStride;
  const uint8_t* r1 = r0 + 8 * kDirectRowStride;
  const uint4 h0 = *reinterpret_cast<const uint4*>(r0), h1 = *reinterpret_cast<const uint4*>(r1);
  uint32_t sc0[2], m0[2], sc1[2], m1[2];
  unpack_k_scales(h0, sc0, m0);
  unpack_k_scales(h1, sc1, m1);
  const float d0 = h2f(h0.x), d1 = h2f(h1.x);
#pragma unroll
  for (int c = 0; c < 4; ++c) {
    const uint2 q0 = *reinterpret_cast<const uint2*>(r0 + 16 + 32 * c + 8 * t);
    const uint2 q1 = *reinterpret_cast<const uint2*>(r1 + 16 + 32 * c + 8 * t);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int j = 2 * c + h;
      const uint32_t a[4] = {(q0.x >> (4 * h)) & kNibbles, (q1.x >> (4 * h)) & kNibbles,
                             (q0.y >> (4 * h)) & kNibbles, (q1.y >> (4 * h)) & kNibbles};
      const int s0 = byte_u(sc0[j >> 2], j & 3), s1 = byte_u(sc1[j >> 2], j & 3);
#pragma unroll
      for (int ch = 0; ch < kChunks; ++ch) {
        const uint2 b = wa.frag[(ch * kStepBlocks + j) * 32 + lane];
        const float2 dx = *reinterpret_cast<const float2*>(wa.dx + j * wa.cols8 + kMaxCols * ch + 2 * t);
        int cc[4];
        mma_k32_z(cc, a, b.x, b.y);
        acc[ch][0] = fmaf(i2f_exact(cc[0] * s0) * dx.x, d0, acc[ch][0]);
        acc[ch][1] = fmaf(i2f_exact(cc[1] * s0) * dx.y, d0, acc[ch][1]);
        acc[ch][2] = fmaf(i2f_exact(cc[2] * s1) * dx.x, d1, acc[ch][2]);
        acc[ch][3] = fmaf(i2f_exact(cc[3] * s1) * dx.y, d1, acc[ch][3]);
      }
    }
  }
  // The mins, as in compute_q4k_item: A = m of rows g, g + 8 at sub-blocks t, t + 4.
  const uint32_t m_sel = 0x7650u + static_cast<uint32_t>(t);
  const uint32_t am[4] = {__float_as_uint(__uint_as_float(__byte_perm(m0[0], 0x4B000000u, m_sel)) - 8388608.0f),
                          __float_as_uint(__uint_as_float(__byte_perm(m1[0], 0x4B000000u, m_sel)) - 8388608.0f),
                          __float_as_uint(__uint_as_float(__byte_perm(m0[1], 0x4B000000u, m_sel)) - 8388608.0f),
                          __float_as_uint(__uint_as_float(__byte_perm(m1[1], 0x4B000000u, m_sel)) - 8388608.0f)};
  const float dmin0 = h2f(h0.x >> 16), dmin1 = h2f(h1.x >> 16);
#pragma unroll
  for (int ch = 0; ch < kChunks; ++ch) {
    const int cg = kMaxCols * ch + g;
    float accm[4] = {0.f, 0.f, 0.f, 0.f};
    mma_tf32(accm, am, wa.mbh[t * wa.cols8 + cg], wa.mbh[(t + 4) * wa.cols8 + cg]);
    mma_tf32(accm, am, wa.mbl[t * wa.cols8 + cg], wa.mbl[(t + 4) * wa.cols8 + cg]);
    acc[ch][0] = fmaf(-dmin0, accm[0], acc[ch][0]);
    acc[ch][1] = fmaf(-dmin0, accm[1], acc[ch][1]);
    acc[ch][2] = fmaf(-dmin1, accm[2], acc[ch][2]);
    acc[ch][3] = fmaf(-dmin1, accm[3], acc[ch][3]);
  }
}

template <int kMask, int kChunks>
__global__ void __launch_bounds__(kWideThreads, 2) mat_vec_wide_kernel(const __grid_constant__ WideParams p) {
  extern __shared__ __align__(16) uint8_t smem[];
  allow_dependent_launch();

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2;
  const int split = p.split;
  const int rank = blockIdx.x % split;  // == the cluster rank: clusters are `split` consecutive CTAs
  const int tile = (blockIdx.x / split) * kWideWarps + warp;
  const bool has_tile = tile < p.total_tiles;
  const int s_begin = rank * p.steps / split, s_end = (rank + 1) * p.steps / split;
  constexpr int cols8 = kChunks * kMaxCols;
  const WideSmem sm = wide_smem(p.slots, p.slot_bytes, p.batch, kChunks);
  uint8_t* ring = smem + static_cast<size_t>(warp) * p.slots * p.slot_bytes;
  uint8_t* raw = smem + sm.raw;
  uint2* frag = reinterpret_cast<uint2*>(smem + sm.frag);
  float* dxf = reinterpret_cast<float*>(smem + sm.dx);
  uint32_t* mbh = reinterpret_cast<uint32_t*>(dxf + kStepBlocks * cols8);
  uint32_t* mbl = mbh + kStepBlocks * cols8;
  float* sxf = reinterpret_cast<float*>(mbl + kStepBlocks * cols8);

  DirectTile dt{};
  if (has_tile) {
    int s = 0;
    while (s + 1 < p.n_seg && tile >= p.seg[s + 1].tile_begin) ++s;
    const WideSeg& sd = p.seg[s];
    const int32_t row0 = (tile - sd.tile_begin) * kTileRows;
    dt.row0 = p.weight + sd.byte_offset + static_cast<int64_t>(row0) * sd.row_bytes;
    dt.seg_end = p.weight + sd.byte_offset + static_cast<int64_t>(sd.rows) * sd.row_bytes;
    dt.row_bytes = sd.row_bytes;
    dt.rows_valid = static_cast<int16_t>(min(kTileRows, sd.rows - row0));
    dt.type = static_cast<int16_t>(sd.type);
  }
  const bool q6k = (kMask & type_bit(kQ6_K)) != 0 && dt.type == kQ6_K;
  auto issue_weights = [&](int s) {
    if (has_tile && s < s_end) {
      uint8_t* slot = ring + ((s - s_begin) % p.slots) * p.slot_bytes;
      if (q6k) {
        stage_q6k_item(dt, s, lane, slot);
      } else {
        stage_aligned_item(dt, s, lane, slot);
      }
    }
    cp_async_commit();
  };
  auto issue_x = [&](int s) {
    if (s < s_end) {
      constexpr int kRowGranules = kStepActBytes / 16;  // 18
      const uint8_t* src = p.x + static_cast<int64_t>(s) * kStepActBytes;
      for (int i = threadIdx.x; i < p.batch * kRowGranules; i += kWideThreads) {
        const int b = i / kRowGranules, c = i - b * kRowGranules;
        cp_async_16(raw + b * kStepActBytes + 16 * c, src + b * p.x_row_bytes + 16 * c);
      }
    }
    cp_async_commit();
  };

  // cp.async groups, oldest first: W(s0) [before the wait], X(s0), W(s0 + 1) [3 slots]; then per step s
  // X(s + 1), W(s + slots - 1). At the top of step s only the newest slots - 2 groups may be pending.
  issue_weights(s_begin);
  grid_dependency_wait();
  issue_x(s_begin);
  for (int a = 1; a < p.slots - 1; ++a) issue_weights(s_begin + a);

  float acc[kChunks][4];
#pragma unroll
  for (int c = 0; c < kChunks; ++c) acc[c][0] = acc[c][1] = acc[c][2] = acc[c][3] = 0.f;
  const WideAct wa{frag, dxf, mbh, mbl, sxf, cols8};

  for (int s = s_begin; s < s_end; ++s) {
    cp_async_wait_dyn(p.slots - 2);
    __syncthreads();  // step s's rows and items have landed; every warp is done with step s - 1
    // The raw rows -> B fragments and the per-column tables (columns past the batch repeat its last row).
    for (int i = threadIdx.x; i < kStepBlocks * cols8; i += kWideThreads) {
      const int j = i / cols8, col = i - j * cols8;
      const uint32_t* w = reinterpret_cast<const uint32_t*>(raw + min(col, p.batch - 1) * kStepActBytes +
                                                            j * static_cast<int>(sizeof(BlockQ8_1)));
      const int chunk = col >> 3, gc = col & 7;
      uint2* f = frag + (chunk * kStepBlocks + j) * 32 + 4 * gc;
      int sumq = 0;
#pragma unroll
      for (int tt = 0; tt < 4; ++tt) {
        const uint32_t b0 = w[1 + 2 * tt], b1 = w[2 + 2 * tt];
        f[tt] = make_uint2(b0, b1);
        sumq = __dp4a(static_cast<int>(b0), static_cast<int>(kOnes), __dp4a(static_cast<int>(b1), static_cast<int>(kOnes), sumq));
      }
      const uint32_t ds = w[0];
      const float dx = h2f(ds);
      dxf[i] = dx;
      const float q = dx * i2f_exact(sumq);
      const uint32_t hi = tf32_round(q);
      mbh[i] = hi;
      mbl[i] = tf32_round(q - __uint_as_float(hi));
      sxf[i] = h2f(ds >> 16);
    }
    __syncthreads();  // the fragments are ready; the raw rows may be refilled
    issue_x(s + 1);
    issue_weights(s + p.slots - 1);
    if (has_tile) {
      const uint8_t* slot = ring + ((s - s_begin) % p.slots) * p.slot_bytes;
      if (kMask != kDirectQ4_0 && !q6k) {
        wide_q4k_item<kChunks>(slot, wa, lane, acc);
      } else {
        const int o0 = q6k ? q6k_row_offset(dt, s, g) : 0, o1 = q6k ? q6k_row_offset(dt, s, g + 8) : 0;
#pragma unroll
        for (int c = 0; c < kChunks; ++c) {
          DirectAct act;
          wide_chunk_act<kMask>(wa, c, lane, act);
          float r[4];
          if constexpr (kMask == kDirectQ4_0) {
            compute_q4_0_item(slot, act, lane, r);
          } else {
            compute_q6k_item(slot, o0, o1, act, lane, r);
          }
#pragma unroll
          for (int e = 0; e < 4; ++e) acc[c][e] += r[e];
        }
      }
    }
  }
  cp_async_wait<0>();

  if (split == 1) {
    if (has_tile) {
#pragma unroll
      for (int c = 0; c < kChunks; ++c) wide_store(p, tile, c, lane, make_float4(acc[c][0], acc[c][1], acc[c][2], acc[c][3]));
    }
    return;
  }
  // The cluster's sums: this CTA's in its slot area ([warp][chunk][lane] float4), then each CTA adds
  // 1/split of the entries over the ranks in order and stores them.
  __syncthreads();  // every warp is done with its slots
  float4* red = reinterpret_cast<float4*>(smem);
#pragma unroll
  for (int c = 0; c < kChunks; ++c) red[(warp * kChunks + c) * 32 + lane] = make_float4(acc[c][0], acc[c][1], acc[c][2], acc[c][3]);
  cluster_sync_all();
  constexpr int entries = kWideWarps * kChunks * 32;
  const int e0 = rank * entries / split, e1 = (rank + 1) * entries / split;
  const uint32_t base = static_cast<uint32_t>(__cvta_generic_to_shared(red));
  const int tile0 = (blockIdx.x / split) * kWideWarps;
  for (int e = e0 + static_cast<int>(threadIdx.x); e < e1; e += kWideThreads) {
    const int wc = e >> 5, w = wc / kChunks, c = wc - w * kChunks;
    if (tile0 + w >= p.total_tiles) continue;
    float4 sum = make_float4(0.f, 0.f, 0.f, 0.f);
    for (int q = 0; q < split; ++q) {
      const float4 v = cluster_load_f4(cluster_map_shared(base + 16u * static_cast<uint32_t>(e), q));
      sum.x += v.x; sum.y += v.y; sum.z += v.z; sum.w += v.w;
    }
    wide_store(p, tile0 + w, c, e & 31, sum);
  }
  cluster_sync_all();  // no CTA leaves while another still reads its shared memory
}

// Occupancy facts of a wide kernel instance per (device, dynamic shared memory): how many clusters of
// n CTAs can be resident at once (n = 1: CTAs per SM x SMs; n > 1 from the occupancy API, sm_90,
// which knows how CTAs of a cluster must share a GPC). Cached: launches ask every call.
struct WideFit {
  int resident[kWideMaxSplit + 1];
};
template <int kMask, int kChunks>
WideFit wide_fit(int device, size_t smem) {
  struct Entry {
    int device;
    size_t smem;
    WideFit fit;
  };
  static Entry cache[32];
  static int used = 0;
  for (int i = 0; i < used; ++i) {
    if (cache[i].device == device && cache[i].smem == smem) return cache[i].fit;
  }
  auto* kernel = mat_vec_wide_kernel<kMask, kChunks>;
  WideFit fit{};
  int per_sm = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kWideThreads, smem) != cudaSuccess) {
    (void)cudaGetLastError();
    per_sm = 0;
  }
  fit.resident[1] = per_sm * std::max(1, device_attribute(device, cudaDevAttrMultiProcessorCount));
  if (device_attribute(device, cudaDevAttrComputeCapabilityMajor) >= 9) {
    for (int n = 2; n <= kWideMaxSplit; ++n) {
      cudaLaunchConfig_t cfg{};
      cfg.gridDim = dim3(n);
      cfg.blockDim = dim3(kWideThreads);
      cfg.dynamicSmemBytes = smem;
      cudaLaunchAttribute a[1];
      a[0].id = cudaLaunchAttributeClusterDimension;
      a[0].val.clusterDim.x = static_cast<unsigned>(n);
      a[0].val.clusterDim.y = 1;
      a[0].val.clusterDim.z = 1;
      cfg.attrs = a;
      cfg.numAttrs = 1;
      int clusters = 0;
      if (cudaOccupancyMaxActiveClusters(&clusters, kernel, &cfg) != cudaSuccess) {
        (void)cudaGetLastError();
        clusters = 0;
      }
      fit.resident[n] = clusters;
    }
  }
  if (used < 32) cache[used++] = Entry{device, smem, fit};
  return fit;
}

// Launches the wide kernel for min(p.batch, 64) rows of p (fill_params'd, K a multiple of 256, the
// direct kernel's types); *cols_done: the rows it took. NotSupported, having launched nothing, where
// x is not 16-byte aligned or the shared memory does not fit.
// The K split (CTAs per cluster, up to 8 and the steps; one on GPUs without clusters): the least of
// a cost model fitted to the H200's forced splits (docs/PERFORMANCE.md v20; mat-vec alone, Q4_K,
// split 1 / 2 / 3 / 4 / 8, us): QKV 4096 B = 64 100.6 / 74.3 / - / 40.1 / 43.9; QKV 8192 B = 16
// 78.7 / 42.3 / 47.9 / 37.2 / 39.2, B = 64 230.1 / 126.3 / 131.5 / 99.0 / 100.8; gate|up B = 16
// 41.4 / 45.6 / 52.2 / 50.7 / 60.7, B = 64 124.9 / 129.1 / 143.7 / 132.6 / 137.3. The model picks 4,
// 4 and 1 for these (and 8 for QKV 2048, 4 for 5120). GGFUSE_MV_WIDE_SPLIT=N forces N (or the largest below it that can be resident).
template <int kMask, int kChunks>
cudaError_t launch_wide(const Params& p, int device, cudaStream_t stream, int* cols_done) {
  if ((reinterpret_cast<uintptr_t>(p.x) & 15u) != 0 || p.steps <= 0) return cudaErrorNotSupported;
  WideParams w{};
  for (int s = 0; s < p.n_seg; ++s) {
    const SegDesc& sd = p.seg[s];
    WideSeg& ws = w.seg[s];
    ws.byte_offset = sd.byte_offset;
    ws.row_bytes = static_cast<int32_t>(sd.row_bytes);
    ws.rows = sd.rows;
    ws.col_begin = sd.col_begin;
    ws.tile_begin = sd.tile_begin;
    ws.type = sd.type;
  }
  w.weight = p.weight;
  w.x = p.x;
  w.out = p.out;
  w.x_row_bytes = p.x_row_bytes;
  w.n_seg = p.n_seg;
  w.total_tiles = p.total_tiles;
  w.steps = p.steps;
  w.n_out = p.n_out;
  w.batch = std::min(p.batch, kMaxCols * kChunks);
  w.chunks = kChunks;
  w.slot_bytes = direct_slot_bytes(kMask);
  const int sms = std::max(1, device_attribute(device, cudaDevAttrMultiProcessorCount));
  const int smem_optin = device_attribute(device, cudaDevAttrMaxSharedMemoryPerBlockOptin);
  const int smem_sm = device_attribute(device, cudaDevAttrMaxSharedMemoryPerMultiprocessor);
  const int reserved = device_attribute(device, cudaDevAttrReservedSharedMemoryPerBlock);
  // Three slots per warp where two CTAs still fit on an SM, else two.
  w.slots = 3;
  size_t smem = wide_smem(w.slots, w.slot_bytes, w.batch, w.chunks).total;
  if (2 * (smem + reserved) > static_cast<size_t>(smem_sm)) {
    w.slots = 2;
    smem = wide_smem(w.slots, w.slot_bytes, w.batch, w.chunks).total;
  }
  if (smem > static_cast<size_t>(smem_optin)) return cudaErrorNotSupported;
  auto* kernel = mat_vec_wide_kernel<kMask, kChunks>;
  static int smem_set[64] = {};  // per device (and instance): the dynamic shared memory limit raised
  const cudaError_t err = allow_smem(kernel, smem, smem_set);
  if (err != cudaSuccess) return err;
  const WideFit fit = wide_fit<kMask, kChunks>(device, smem);
  if (fit.resident[1] <= 0) return cudaErrorNotSupported;
  const int groups = (w.total_tiles + kWideWarps - 1) / kWideWarps;
  const int cap = std::min(kWideMaxSplit, w.steps);
  int split = 1;
  if (overrides().wide_split > 0) {
    split = std::min(overrides().wide_split, cap);
    while (split > 1 && fit.resident[split] <= 0) --split;
  } else {
    // Each cluster size's time in units of one step of one CTA: its steps per CTA plus a fixed cost
    // of kWideSplitOverhead steps (the prologue, the last step's wait, the reduction), times the
    // groups over the clusters that fit the CTA slots where they are more (not rounded up to waves:
    // shorter CTAs fill in as others leave). The least; ties to fewer CTAs per cluster. (The
    // occupancy API's resident clusters only rule sizes out: with them in the load, QKV 8192 got
    // 3 CTAs per cluster, 47.6 us at B = 16, where 4 measured 37.2.) Powers of two only: 3 CTAs
    // per cluster measured slower than 2 and 4 there.
    double best = 1e300;
    for (int n = 1; n <= cap; n *= 2) {
      if (fit.resident[n] <= 0) continue;
      const double load = std::max(1.0, static_cast<double>(groups) * n / fit.resident[1]);
      const double cost = (static_cast<double>((w.steps + n - 1) / n) + kWideSplitOverhead) * load;
      if (cost < best * (1.0 - 1e-9)) {
        best = cost;
        split = n;
      }
    }
  }
  w.split = split;
  *cols_done = w.batch;
  return launch_kernel_clustered(split, kernel, dim3(groups * split), dim3(kWideThreads), smem, stream, w);
}

// The instance by batch chunks: 1, 2, 4 or 8 of 8 rows (the unused columns of the last chunk repeat
// the batch's last row and are not stored).
template <int kMask>
cudaError_t launch_wide_chunks(const Params& p, int device, cudaStream_t stream, int* cols_done) {
  return p.batch <= kMaxCols       ? launch_wide<kMask, 1>(p, device, stream, cols_done)
         : p.batch <= 2 * kMaxCols ? launch_wide<kMask, 2>(p, device, stream, cols_done)
         : p.batch <= 4 * kMaxCols ? launch_wide<kMask, 4>(p, device, stream, cols_done)
                                   : launch_wide<kMask, 8>(p, device, stream, cols_done);
}
cudaError_t launch_wide_any(const Params& p, int dmask, int device, cudaStream_t stream, int* cols_done) {
  return dmask == kDirectQ4K    ? launch_wide_chunks<kDirectQ4K>(p, device, stream, cols_done)
         : dmask == kDirectQ4_0 ? launch_wide_chunks<kDirectQ4_0>(p, device, stream, cols_done)
                                : launch_wide_chunks<kDirectKQuants>(p, device, stream, cols_done);
}

cudaError_t launch_any(Params& p, int types, int device, cudaStream_t stream) {
  const bool one = p.batch == 1;  // a lone row takes the one-column kernel
  const int dmask = p.norm.x == nullptr && overrides().direct ? direct_mask(p, types) : 0;
  if (dmask != 0) {
    // InvalidConfiguration: not even one slot per warp fits next to the partial sums (a CTA with a
    // very large share of tiles); the staged kernel then gets its chance.
    int cols_done = 0;  // == p.batch (<= 8 here: one chunk)
    const cudaError_t err = launch_direct_any(p, dmask, device, stream, &cols_done);
    if (err != cudaErrorInvalidConfiguration) return err;
  }
  if ((types & ~kMaskKQuants) == 0) {
    return one ? launch_cols<1, kMaskKQuants>(p, device, stream) : launch_cols<8, kMaskKQuants>(p, device, stream);
  }
  if ((types & ~kMaskBlocks32) == 0) {
    return one ? launch_cols<1, kMaskBlocks32>(p, device, stream) : launch_cols<8, kMaskBlocks32>(p, device, stream);
  }
  return one ? launch_cols<1, kMaskAll>(p, device, stream) : launch_cols<8, kMaskAll>(p, device, stream);
}

bool valid_args(const SegmentTable& table, int64_t k) {
  return table.count > 0 && table.count <= kMaxSegments && k > 0 && k % kQK == 0 && k <= (int64_t{1} << 30);
}

}  // namespace

cudaError_t mat_vec_q8_1(const uint8_t* weight, int64_t weight_bytes, const SegmentTable& table, int64_t k,
                         const uint8_t* x_q8, int64_t batch, float* out, int64_t n_out,
                         cudaStream_t stream) {
  if (batch <= 0 || table.count <= 0) return cudaSuccess;
  if (!valid_args(table, k)) return cudaErrorInvalidValue;
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  Params p{};
  const int types = fill_params(p, weight, table, k, n_out);
  if (types < 0) return cudaErrorInvalidValue;
  const int dmask = overrides().direct ? direct_mask(p, types) : 0;
  const bool direct = dmask != 0;
  // Batch rows 8 at a time (the N of the MMA); small chunks take the dp4a kernel. Where the direct
  // kernel applies, more than 8 remaining rows go to the wide kernel, up to 64 per launch (or, with
  // GGFUSE_MV_WIDE=0, to the direct kernel, which takes up to 64 of them in one launch where
  // launch_direct says so, each weight item computed against all of them).
  for (int64_t b0 = 0; b0 < batch;) {
    p.x = x_q8 + b0 * p.x_row_bytes;
    p.out = out + b0 * n_out;
    // (Not with the streaming kernel or the dp4a kernel forced for 8-row chunks: they keep theirs.)
    const bool others_forced = overrides().stream || overrides().dp4a_forced >= kMaxCols;
    if (direct && overrides().wide_min > 0 && batch - b0 >= overrides().wide_min && !others_forced) {
      p.batch = static_cast<int32_t>(std::min<int64_t>(kWideMaxCols, batch - b0));
      int cols_done = 0;
      err = launch_wide_any(p, dmask, device, stream, &cols_done);
      if (err == cudaSuccess) {
        b0 += cols_done;
        continue;
      }
      if (err != cudaErrorNotSupported) return err;
    }
    const int chunks = overrides().chunks > 0 ? overrides().chunks : kMaxChunks;
    const int64_t chunked = std::min<int64_t>(static_cast<int64_t>(kMaxCols) * chunks, batch - b0);
    if (direct && chunked > kMaxCols && !others_forced) {
      p.batch = static_cast<int32_t>(chunked);
      int cols_done = 0;
      err = launch_direct_any(p, dmask, device, stream, &cols_done);
      if (err == cudaSuccess) {
        b0 += cols_done;
        continue;
      }
      if (err != cudaErrorInvalidConfiguration) return err;
    }
    p.batch = static_cast<int32_t>(std::min<int64_t>(kMaxCols, batch - b0));
    b0 += p.batch;
    // NotSupported: not sm_90, GGFUSE_MV_STREAM, or x / a row does not fit in shared memory
    err = mat_vec_q8_1_stream(weight, weight_bytes, table, k, p.x, p.batch, p.out, n_out, stream);
    if (err != cudaErrorNotSupported) {
      if (err != cudaSuccess) return err;
      continue;
    }
    DpStaging staging;
    if (use_dp4a(types, p.batch, direct, &staging)) {  // NotSupported: x (or, staged, x and the rows) does not fit
      err = mat_vec_q8_1_dp4a(weight, weight_bytes, table, k, p.x, p.batch, p.out, n_out, staging, stream);
    }
    if (err == cudaErrorNotSupported) err = launch_any(p, types, device, stream);
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

cudaError_t rms_norm_mat_vec_q8_1(const void* x, FloatType x_type, const void* norm_w, FloatType w_type,
                                  float eps, const uint8_t* weight, int64_t weight_bytes,
                                  const SegmentTable& table, int64_t k, int64_t batch, float* out,
                                  int64_t n_out, cudaStream_t stream) {
  if (batch <= 0 || table.count <= 0) return cudaSuccess;
  const cudaError_t stream_err = rms_norm_mat_vec_q8_1_stream(x, x_type, norm_w, w_type, eps, weight, weight_bytes,
                                                              table, k, batch, out, n_out, stream);
  if (stream_err != cudaErrorNotSupported) return stream_err;
  if (batch > kMaxCols || !overrides().fused_norm) return cudaErrorNotSupported;
  if (!valid_args(table, k)) return cudaErrorInvalidValue;
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  Params p{};
  const int types = fill_params(p, weight, table, k, n_out);
  if (types < 0) return cudaErrorInvalidValue;
  p.x = nullptr;
  p.out = out;
  p.batch = static_cast<int32_t>(batch);
  p.norm = make_norm_args(x, x_type, norm_w, w_type, eps);
  return launch_any(p, types, device, stream);
}

}  // namespace cuda
}  // namespace ggfuse

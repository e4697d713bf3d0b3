// Small-batch (B = 1..8) fused multi-segment mat-vec with Q8_1 activations: dp4a instead of tensor
// cores (SPEC §2, §3). Same contract as mat_vec.cu's kernel; mat_vec_q8_1 picks one per launch by
// batch chunk and types (measured: this one for Q4_K-only weights at <= 2 rows; docs/PERFORMANCE.md v7).
//
// Design (docs/PERFORMANCE.md has the measurements):
//   * each warp owns one weight row, its 32 lanes split K into "units": a Q4_K / Q5_K / Q6_K unit is
//     two 32-value sub-blocks of one super-block (4 units per super-block), a Q4_0 / Q5_0 / Q8_0 unit
//     one block (Q4_0 at B = 1 with K % 256 == 0: four blocks read in 16-byte loads, dp4a_units.cuh
//     UnitQ4_0x4, kept in registers instead of staged). Every lane does useful work at every batch
//     size (no MMA columns or lanes idle).
//   * weights go global -> registers through the read-only path, allocating in L1: 16-byte loads for
//     Q4_K / Q5_K (always 16-byte aligned) and Q4_0's 4-block units, aligned 4-byte words + funnel
//     shifts for the 2-byte aligned types (Q4_0, Q5_0, Q8_0, Q6_K), never reading outside the segment
//     (dp4a_units.cuh GlobalLd says why; those types are staged by default, see below). The next
//     unit's weights are loaded while the current one is computed (software pipelining: two units in
//     flight per lane). A warp's two rows of one type read in 16-byte units (Q4_K, Q5_K at B <= 2;
//     Q4_0's wide units at B = 1) run as one sequence of units, so the pipelining continues from
//     one row into the next instead of restarting after each row's reduction (dp4a_pair, v18; at
//     B = 2, and at B = 1 for grids of up to 1.25 waves: row_pairs_for has the measurements).
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
//   * 8 warps per CTA, 2 rows per warp: a CTA per 16 rows, 72-80 registers, ~3 CTAs per SM; where
//     the segments' types differ the CTAs take interleaved rows (dp4a_row_index), so the costlier
//     type's rows are spread over every CTA of the (about one) wave.
//   * staged variant (mat_vec.cu decides: by default for weights with a 2-byte aligned type): before
//     the PDL wait each warp copies the whole of its rows into its own shared-memory slots with
//     16-byte cp.async (the enclosing granules, so every byte keeps its address mod 16 and the units
//     read them with the same code through SharedLd); the granule crossing the end of the weight
//     buffer is copied byte by byte (nothing past it is read). Rows per warp drop to 1 when 16 rows'
//     slots would leave fewer than 3 CTAs per SM. The 2-byte aligned types (Q4_0, Q6_K, ...) are then
//     fetched once, in 16-byte granules, instead of in 4-byte words that each fetch their sectors:
//     QKV Q4_0 at B=1 6.7 us instead of 11.8 (H200). For Q4_K, whose units are already 16-byte loads,
//     it measured slower (6.5 against 5.3): all of a CTA's bytes are requested at once and arrive
//     together near the end of the layer's transfer, so the arithmetic starts late; waiting per
//     32-unit chunk instead of per row was slower still (7.6: no software pipelining of the
//     shared-memory loads). docs/PERFORMANCE.md v9 has the table.
#include <algorithm>

#include "dp4a_units.cuh"
#include "ggfuse/kernels_cuda.h"

namespace ggfuse {
namespace cuda {
namespace {

using dp4a::kDpMaxCols;
using dp4a::kDpThreads;
using dp4a::kDpWarps;
using dp4a::kQ8Bytes;

struct DpSeg {
  int64_t byte_offset;
  int64_t row_bytes;
  int32_t type;
  int32_t rows;
  int32_t col_begin;
  int32_t row_start;  // first global row (warp) index of this segment
  int32_t staged;     // staged kernel: 1 when this segment's rows are copied into shared memory
  int32_t wide;       // 1: Q4_0 rows read in 4-block units of 16-byte loads (dp4a::wide_units_ok)
};

struct DpParams {
  DpSeg seg[kMaxSegments];
  const uint8_t* weight;
  int64_t weight_bytes;
  const uint8_t* x;
  float* out;
  int64_t x_row_bytes;
  int32_t n_seg;
  int32_t total_rows;
  int32_t x_blocks;  // K / 32
  int32_t n_out;
  int32_t rows_per_warp;  // staged kernel: 1 or 2 (the slots per warp)
  int32_t slot_bytes;     // staged kernel: bytes per row slot (a multiple of 16)
  int32_t x_words;        // staged kernel: words of the x copy (a multiple of 4; the slots follow)
  int32_t interleave;     // 1: CTA c takes rows c, c + grid, c + 2 grid, ... (dp4a_row_index)
  int32_t row_pairs;      // 1: a warp's two rows as one sequence of units where it can (dp4a_pair;
                          // launch_dp4a sets it: row_pairs_for)
};

constexpr int kDpRowsPerWarp = 2;  // rows a warp takes in turn: a CTA covers 16 rows
constexpr int kDpCtaRows = kDpWarps * kDpRowsPerWarp;
constexpr int kDpMinCtasPerSm = 3;  // the occupancy the register path reaches (72-80 registers)

// The global row of a CTA's local row `local` (0 .. rows per CTA - 1, warp-major). Contiguous by
// default; interleaved for launches whose segments have different types, so that every CTA gets
// its share of each type's rows: with contiguous rows the CTAs of the costlier segment (the Q6_K V
// of a QKV layer: 1/6 of the rows, staged, ~2x a Q4_K row's time) were the last of the one wave to
// finish (docs/PERFORMANCE.md v16). Each row is still computed by one warp in the one order: the
// outputs do not depend on the mapping.
__device__ __forceinline__ int dp4a_row_index(const DpParams& p, int local, int cta_rows) {
  return p.interleave ? static_cast<int>(blockIdx.x) + static_cast<int>(gridDim.x) * local
                      : static_cast<int>(blockIdx.x) * cta_rows + local;
}

// Segment of global row `grow` (rows are numbered across segments in table order).
__device__ __forceinline__ int segment_of(const DpParams& p, int grow) {
  int s = 0;
  while (s + 1 < p.n_seg && grow >= p.seg[s + 1].row_start) ++s;
  return s;
}

// Row r of segment sd's totals (every lane holds them) into its output column, by lane 0.
template <int kCols>
__device__ __forceinline__ void store_row(const DpParams& p, const DpSeg& sd, int r, const float (&acc)[kCols],
                                          int lane) {
  if (lane != 0) return;
#pragma unroll
  for (int c = 0; c < kCols; ++c) p.out[static_cast<int64_t>(c) * p.n_out + sd.col_begin + r] = acc[c];
}

// One row (warp-wide): kFirst also does the CTA's PDL wait and activation copy (after the row's
// first weight loads).
template <int kCols, bool kFirst, typename Stage>
__device__ __forceinline__ void dp4a_row(const DpParams& p, const uint32_t* sx, int grow, int lane, Stage stage) {
  const int nb = p.x_blocks;
  const bool first = kFirst;
  const DpSeg& sd = p.seg[segment_of(p, grow)];
  const int r = grow - sd.row_start;
  const uint8_t* row = p.weight + sd.byte_offset + r * sd.row_bytes;
  float acc[kCols];
#pragma unroll
  for (int c = 0; c < kCols; ++c) acc[c] = 0.0f;
  dp4a::row_dot<kCols, dp4a::GlobalLd>(sd.type, row, nb, sx, lane, acc, first, stage, sd.wide != 0);
  store_row(p, sd, r, acc, lane);
}

// A warp's two rows as one sequence of units (dp4a::run_row_pair) where both are in one segment of
// a type read in 16-byte units; false, having done nothing, otherwise (the caller then runs them one
// after the other). With interleaved rows the two may be in different segments.
template <int kCols, typename Stage>
__device__ __forceinline__ bool dp4a_pair(const DpParams& p, const uint32_t* sx, int row0, int row1, int lane,
                                          Stage stage) {
  const DpSeg& sd = p.seg[segment_of(p, row0)];
  if (row1 >= p.total_rows || row1 < sd.row_start || row1 - sd.row_start >= sd.rows ||
      !dp4a::pair_ok(sd.type, sd.wide != 0, kCols)) {
    return false;
  }
  const int ra = row0 - sd.row_start, rb = row1 - sd.row_start;
  float acc0[kCols], acc1[kCols];
#pragma unroll
  for (int c = 0; c < kCols; ++c) acc0[c] = acc1[c] = 0.0f;
  const uint8_t* seg = p.weight + sd.byte_offset;
  dp4a::row_pair_dot<kCols, dp4a::GlobalLd>(sd.type, seg + ra * sd.row_bytes, seg + rb * sd.row_bytes, p.x_blocks,
                                            sx, lane, acc0, acc1, true, stage);
  store_row(p, sd, ra, acc0, lane);
  store_row(p, sd, rb, acc1, lane);
  return true;
}

template <int kCols>
__global__ void __launch_bounds__(kDpThreads) mat_vec_dp4a_kernel(const DpParams p) {
  extern __shared__ uint32_t sx[];
  allow_dependent_launch();
  const int lane = threadIdx.x & 31;
  auto stage = [&] { dp4a::stage_x(p.x, kCols * p.x_blocks, sx); };
  const int local0 = (threadIdx.x >> 5) * kDpRowsPerWarp;
  const int row0 = dp4a_row_index(p, local0, kDpCtaRows);
  if (row0 >= p.total_rows) {  // no row here: only take part in the CTA's copy of x
    stage();
    return;
  }
  if constexpr (kCols <= 2) {  // (at B >= 3 the pair's second accumulators cost registers: 99-101 at 7-8)
    if (p.row_pairs && dp4a_pair<kCols>(p, sx, row0, dp4a_row_index(p, local0 + 1, kDpCtaRows), lane, stage)) return;
  }
  dp4a_row<kCols, true>(p, sx, row0, lane, stage);
#pragma unroll 1
  for (int j = 1; j < kDpRowsPerWarp; ++j) {
    const int row = dp4a_row_index(p, local0 + j, kDpCtaRows);
    if (row >= p.total_rows) break;
    dp4a_row<kCols, false>(p, sx, row, lane, stage);
  }
}

// Staged variant. Warp w's rows are its local rows w * rows_per_warp + j (dp4a_row_index); row j
// lands in slot j of the warp's slots, its first byte at slot + (its buffer offset mod 16).
__device__ __forceinline__ int64_t staged_row_offset(const DpParams& p, int grow, const DpSeg** sd_out) {
  const DpSeg& sd = p.seg[segment_of(p, grow)];
  *sd_out = &sd;
  return sd.byte_offset + static_cast<int64_t>(grow - sd.row_start) * sd.row_bytes;
}

// The warp's copy of one row: the 16-byte granules enclosing it, lanes taking every 32nd granule.
__device__ __forceinline__ void copy_row_to_slot(const DpParams& p, int64_t off, int64_t bytes, uint8_t* slot,
                                                 int lane) {
  const int64_t g0 = off & ~int64_t{15};
  const int n_gran = static_cast<int>((off + bytes - g0 + 15) >> 4);
  for (int gi = lane; gi < n_gran; gi += 32) {
    const int64_t src = g0 + 16 * static_cast<int64_t>(gi);
    if (src + 16 <= p.weight_bytes) {
      cp_async_16(slot + 16 * gi, p.weight + src);
    } else {  // the last granule of a buffer that ends mid-granule: only the bytes inside it
      for (int64_t i = 0; i < p.weight_bytes - src; ++i) slot[16 * gi + i] = p.weight[src + i];
    }
  }
}

// Row `grow`, whose copy this lane has waited for, from its slot (warp-wide).
template <int kCols>
__device__ __forceinline__ void staged_row(const DpParams& p, const uint32_t* sx, const uint8_t* slot, int grow,
                                           int lane) {
  __syncwarp();  // every lane's copies of the row have landed
  const DpSeg* sd;
  const int64_t off = staged_row_offset(p, grow, &sd);
  float acc[kCols];
#pragma unroll
  for (int c = 0; c < kCols; ++c) acc[c] = 0.0f;
  dp4a::row_dot<kCols, dp4a::SharedLd>(sd->type, slot + (off & 15), p.x_blocks, sx, lane, acc, false, [] {},
                                       sd->wide != 0);
  if (lane == 0) {
    const int r = grow - sd->row_start;
#pragma unroll
    for (int c = 0; c < kCols; ++c) p.out[static_cast<int64_t>(c) * p.n_out + sd->col_begin + r] = acc[c];
  }
}

template <int kCols>
__global__ void __launch_bounds__(kDpThreads) mat_vec_dp4a_staged_kernel(const DpParams p) {
  extern __shared__ __align__(16) uint32_t smem_words[];
  uint32_t* sx = smem_words;
  allow_dependent_launch();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int rpw = p.rows_per_warp;
  const int row0 = dp4a_row_index(p, warp * rpw, kDpWarps * rpw);
  const int row1 = dp4a_row_index(p, warp * rpw + 1, kDpWarps * rpw);  // used when rpw == 2
  uint8_t* slots = reinterpret_cast<uint8_t*>(smem_words + p.x_words) +
                   static_cast<int64_t>(warp) * rpw * p.slot_bytes;
  const int rows = row0 >= p.total_rows ? 0 : rpw == 2 && row1 < p.total_rows ? 2 : 1;
  // Rows of staged segments are copied whole; every lane commits one group per row (empty for a
  // row read from global memory), so group j is row j's copy for every lane.
  bool staged0 = false, staged1 = false;
#pragma unroll
  for (int j = 0; j < kDpRowsPerWarp; ++j) {
    if (j < rows) {
      const DpSeg* sd;
      const int64_t off = staged_row_offset(p, j == 0 ? row0 : row1, &sd);
      if (sd->staged) copy_row_to_slot(p, off, sd->row_bytes, slots + j * p.slot_bytes, lane);
      (j == 0 ? staged0 : staged1) = sd->staged != 0;
      cp_async_commit();
    }
  }
  auto stage = [&] { dp4a::stage_x(p.x, kCols * p.x_blocks, sx); };  // the PDL wait, then x
  // Straight-line calls, not a loop: with the six-type switch inside a loop the compiler kept every
  // type's registers live across the back edge (225 registers instead of 80).
  if (rows == 0) {
    stage();
    return;
  }
  if (staged0) {
    stage();
    if (rows == 2) cp_async_wait<1>(); else cp_async_wait<0>();
    staged_row<kCols>(p, sx, slots, row0, lane);
  } else {  // a row of an unstaged segment: its first unit is loaded before the wait, as in the
            // register kernel
    dp4a_row<kCols, true>(p, sx, row0, lane, stage);
  }
  if (rows < 2) return;
  if (staged1) {
    cp_async_wait<0>();
    staged_row<kCols>(p, sx, slots + p.slot_bytes, row1, lane);
  } else {
    dp4a_row<kCols, false>(p, sx, row1, lane, stage);
  }
}

// The staged kernel when its slots fit at >= kDpMinCtasPerSm CTAs per SM (2 rows per warp, else 1);
// cudaErrorNotSupported, having launched nothing, otherwise.
template <int kCols>
cudaError_t launch_dp4a_staged(DpParams p, cudaStream_t stream) {
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  const int per_sm = device_attribute(device, cudaDevAttrMaxSharedMemoryPerMultiprocessor);
  const int reserved = device_attribute(device, cudaDevAttrReservedSharedMemoryPerBlock);
  const int optin = device_attribute(device, cudaDevAttrMaxSharedMemoryPerBlockOptin);
  if (per_sm <= 0 || optin <= 0) return cudaErrorNotSupported;
  int64_t max_row = 0;
  for (int s = 0; s < p.n_seg; ++s) {
    if (p.seg[s].staged) max_row = std::max(max_row, p.seg[s].row_bytes);
  }
  p.slot_bytes = static_cast<int32_t>((max_row + 15 + 15) & ~int64_t{15});  // any phase mod 16
  const int64_t x_words = static_cast<int64_t>(kCols) * p.x_blocks * 10;  // 9 words + half sums per block
  p.x_words = static_cast<int32_t>((x_words + 3) & ~int64_t{3});
  for (int rpw = kDpRowsPerWarp; rpw >= 1; --rpw) {
    const int64_t smem = int64_t{4} * p.x_words + int64_t{kDpWarps} * rpw * p.slot_bytes;
    if (smem > optin || (smem + reserved) * kDpMinCtasPerSm > per_sm) continue;
    p.rows_per_warp = rpw;
    static int smem_set[64] = {};
    err = allow_smem(mat_vec_dp4a_staged_kernel<kCols>, static_cast<size_t>(smem), smem_set);
    if (err != cudaSuccess) return err;
    const int cta_rows = kDpWarps * rpw;
    const int grid = (p.total_rows + cta_rows - 1) / cta_rows;
    return launch_kernel(mat_vec_dp4a_staged_kernel<kCols>, dim3(grid), dim3(kDpThreads),
                         static_cast<size_t>(smem), stream, p);
  }
  return cudaErrorNotSupported;
}

// Whether the register kernel runs a warp's rows as pairs (dp4a_pair): at B = 2 always, at B = 1 for
// grids of up to 1.25 waves (of kDpMinCtasPerSm CTAs per SM). Measured (v18, A/B on one machine,
// mat-vec alone, B = 1, in turn -> paired): one wave (QKV 4096) and 1.13 waves (5120) gain on the
// H200 (Q4_K 5.53 -> 5.33, 11.13 -> 9.66 us) and mostly on the H100 (Q4_K 6.24 -> 6.47 at 4096 the
// exception; 12.25 -> 11.26 at 5120; Q4_0 6.51 -> 6.13); at 1.6 waves (8192) and 4.5 (gate|up) pairs
// gave nothing or lost (H100 gate|up Q4_K 24.73 -> 26.39, Q4_0 8192 17.37 -> 18.51), since a CTA's
// bubble between rows is hidden there by the other CTAs on its SM. At B = 2 they gained at every
// shape on the H200 (5-12%) and on the H100 but for gate|up (+1%). GGFUSE_MV_ROW_PAIRS: 0 never,
// 2 at every B <= 2 launch (experiment knob, read once).
inline bool row_pairs_for(int kcols, int grid) {
  static const int forced = env_int("GGFUSE_MV_ROW_PAIRS", 1);
  if (forced != 1) return forced >= 2;
  if (kcols == 2) return true;
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return false;
  const int64_t slots = int64_t{kDpMinCtasPerSm} * device_attribute(device, cudaDevAttrMultiProcessorCount);
  return kcols == 1 && 4 * static_cast<int64_t>(grid) <= 5 * slots;
}

template <int kCols>
cudaError_t launch_dp4a(DpParams p, bool any_staged, cudaStream_t stream) {
  // Staged or not at all: where the slots do not fit, the unstaged kernel measured slower than the
  // MMA kernel for the types that ask for staging (QKV 8192 Q4_0 at B=4: 39.7 against 30.3 us).
  if (any_staged) return launch_dp4a_staged<kCols>(p, stream);
  const int grid = (p.total_rows + kDpCtaRows - 1) / kDpCtaRows;
  p.row_pairs = row_pairs_for(kCols, grid) ? 1 : 0;
  const size_t smem = static_cast<size_t>(kCols) * p.x_blocks * (kQ8Bytes + 4);
  static int smem_set[64] = {};
  const cudaError_t err = allow_smem(mat_vec_dp4a_kernel<kCols>, smem, smem_set);
  if (err != cudaSuccess) return err;  // NotSupported: the caller runs the MMA kernel
  return launch_kernel(mat_vec_dp4a_kernel<kCols>, dim3(grid), dim3(kDpThreads), smem, stream, p);
}

}  // namespace

cudaError_t mat_vec_q8_1_dp4a(const uint8_t* weight, int64_t weight_bytes, const SegmentTable& table, int64_t k,
                              const uint8_t* x_q8, int64_t batch, float* out, int64_t n_out,
                              DpStaging staging, cudaStream_t stream) {
  if (batch <= 0 || table.count <= 0) return cudaSuccess;
  if (batch > kDpMaxCols || table.count > kMaxSegments || k <= 0 || k % kQK != 0 ||
      k > (int64_t{1} << 30)) {
    return cudaErrorInvalidValue;
  }
  DpParams p{};
  p.weight = weight;
  p.weight_bytes = weight_bytes;
  p.x = x_q8;
  p.out = out;
  p.x_row_bytes = k / kQK * kQ8Bytes;
  p.x_blocks = static_cast<int32_t>(k / kQK);
  p.n_out = static_cast<int32_t>(n_out);
  p.n_seg = table.count;
  int64_t rows = 0;
  bool staged = false;  // any segment
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
    // Q4_0 in its 16-byte-load units reads like Q4_K, so it stays in registers as Q4_K does
    // (staging is for the rows read in 2- and 4-byte words).
    sd.wide = dp4a::wide_units_ok(in.type, k, in.byte_offset, batch) ? 1 : 0;
    sd.staged = staging == DpStaging::kAll ||
                        (staging == DpStaging::kTwoByteTypes && !blocks_16_aligned(in.type) && sd.wide == 0)
                    ? 1 : 0;
    staged = staged || sd.staged != 0;
    rows += in.rows;
  }
  if (rows > (int64_t{1} << 30)) return cudaErrorInvalidValue;
  p.total_rows = static_cast<int32_t>(rows);
  // GGFUSE_MV_INTERLEAVE (read once): 0 never, 2 always; unset: where the segments' types differ.
  static const int interleave = env_int("GGFUSE_MV_INTERLEAVE", 1);
  bool mixed = false;
  for (int s = 1; s < table.count; ++s) mixed = mixed || table.seg[s].type != table.seg[0].type;
  p.interleave = interleave >= 2 || (interleave == 1 && mixed) ? 1 : 0;
  switch (batch) {
    case 1: return launch_dp4a<1>(p, staged, stream);
    case 2: return launch_dp4a<2>(p, staged, stream);
    case 3: return launch_dp4a<3>(p, staged, stream);
    case 4: return launch_dp4a<4>(p, staged, stream);
    case 5: return launch_dp4a<5>(p, staged, stream);
    case 6: return launch_dp4a<6>(p, staged, stream);
    case 7: return launch_dp4a<7>(p, staged, stream);
    default: return launch_dp4a<8>(p, staged, stream);
  }
}

}  // namespace cuda
}  // namespace ggfuse

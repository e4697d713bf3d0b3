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
  dp4a::row_dot<kCols, dp4a::GlobalLd>(sd.type, row, nb, sx, lane, acc, first, stage);
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
  auto stage = [&] { dp4a::stage_x(p.x, kCols * p.x_blocks, sx); };
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

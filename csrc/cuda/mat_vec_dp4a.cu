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
//   * weights go global -> registers through the read-only path: 16-byte loads past L1 for Q4_K / Q5_K
//     (always 16-byte aligned), aligned 4-byte words + funnel shifts, allocating in L1, for the 2-byte
//     aligned types (Q4_0, Q5_0, Q8_0, Q6_K), never reading outside the segment (dp4a_units.cuh
//     GlobalLd says why; those types are staged by default, see below). The next unit's weights are loaded
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
#include <map>
#include <mutex>
#include <tuple>

#include "dp4a_units.cuh"
#include "ggfuse/kernels_cuda.h"
#include "norm.cuh"

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
  NormArgs norm;          // norm kernels: x [kCols, K] to normalize (p.x unused)
  int32_t cluster;        // norm kernels: CTAs per cluster (1, 2, 4 or 8)
};

constexpr int kDpRowsPerWarp = 2;  // rows a warp takes in turn: a CTA covers 16 rows
constexpr int kDpCtaRows = kDpWarps * kDpRowsPerWarp;
constexpr int kDpMinCtasPerSm = 3;  // the occupancy the register path reaches (72-80 registers)
// Rows of x the norm kernels take (rms_norm_mat_vec_q8_1_dp4a): the batches the dp4a kernel runs for
// Q4_K (1 and 2); each row's norm is serial inside a CTA.
constexpr int kDpNormMaxCols = 2;

// ---- the norm in the mat-vec's CTAs (rms_norm_mat_vec_q8_1_dp4a) ----
// In place of stage_x: x [kCols, K] normalized and quantized into the CTA's shared copy, the bytes
// rms_norm_mul_q8_1 writes, in stage_x's layout. A cluster of `cluster` CTAs (the row's 1024-value
// rounds rounded up to a power of two, at most 8) shares the work as the standalone norm kernel's
// split CTAs share a row (norm.cuh norm_row_q8_1): every CTA computes each row's whole sum of squares
// in the one order, then quantizes the rounds r with r % cluster == its rank and stores every block
// into the x copy of each CTA of its cluster (distributed shared memory). A CTA thus quantizes
// 1/cluster of x: the v10 attempt, where each of the 384 CTAs of a QKV layer quantized all of it,
// spent ~3 us per row on that redundant work (docs/PERFORMANCE.md v10, v16).
// Every thread of the CTA calls it once; the kernel has arrived on the cluster barrier at its start,
// and the wait here (phase 0) makes sure every CTA of the cluster is running before any CTA writes
// into another's shared memory. Ends with the cluster barrier of phase 1: every block is in every
// CTA's copy, and no CTA touches another's shared memory afterwards (so any may exit).
template <int kCluster, typename T, typename W>
__device__ __forceinline__ void cluster_norm_typed(const NormArgs& n, int cols, int nb, uint32_t* sx,
                                                   float* wsum) {
  const int t = threadIdx.x;
  const int64_t k = static_cast<int64_t>(nb) * kQK;
  const int rank = cluster_rank();
  const T* x = static_cast<const T*>(n.x);
  const W* w = static_cast<const W*>(n.w);
  if (n.prefetch) prefetch_norm_weight(w, k, t, rank, kCluster);
  grid_dependency_wait();
  cluster_wait();
  const int nblk = cols * nb;
  uint32_t dst[kCluster];  // sx in each CTA of the cluster
  const uint32_t local = static_cast<uint32_t>(__cvta_generic_to_shared(sx));
#pragma unroll
  for (int d = 0; d < kCluster; ++d) dst[d] = cluster_map_shared(local, d);
#pragma unroll 1
  for (int b = 0; b < cols; ++b) {
    norm_row_q8_1<kCluster>(x + b * k, w, k, n.eps, (n.vec & 1) != 0, (n.vec & 2) != 0, t, rank, 0, 1, wsum,
                            [&](int64_t blk, int j, uint32_t word, uint32_t ds, uint32_t sq) {
                              const uint32_t i = static_cast<uint32_t>(b * nb + static_cast<int>(blk));
#pragma unroll
                              for (int d = 0; d < kCluster; ++d) {
                                cluster_store(dst[d] + 4 * (9 * i + 1 + j), word);
                                if (j == 0) {
                                  cluster_store(dst[d] + 4 * (9 * i), ds);
                                  cluster_store(dst[d] + 4 * (9 * nblk + i), sq);
                                }
                              }
                            },
                            static_cast<T*>(nullptr));
  }
  cluster_arrive_release();
  cluster_wait();
}

template <int kCluster>
__device__ __forceinline__ void cluster_norm_types(const NormArgs& n, int cols, int nb, uint32_t* sx, float* wsum) {
  switch (n.types) {
    case 0: return cluster_norm_typed<kCluster, float, float>(n, cols, nb, sx, wsum);
    case 1: return cluster_norm_typed<kCluster, float, Half>(n, cols, nb, sx, wsum);
    case 2: return cluster_norm_typed<kCluster, float, Bf16>(n, cols, nb, sx, wsum);
    case 3: return cluster_norm_typed<kCluster, Half, float>(n, cols, nb, sx, wsum);
    case 4: return cluster_norm_typed<kCluster, Half, Half>(n, cols, nb, sx, wsum);
    case 5: return cluster_norm_typed<kCluster, Half, Bf16>(n, cols, nb, sx, wsum);
    case 6: return cluster_norm_typed<kCluster, Bf16, float>(n, cols, nb, sx, wsum);
    case 7: return cluster_norm_typed<kCluster, Bf16, Half>(n, cols, nb, sx, wsum);
    default: return cluster_norm_typed<kCluster, Bf16, Bf16>(n, cols, nb, sx, wsum);
  }
}

// Out of line: it runs once per CTA and holds 36 instantiations of the norm.
__device__ __forceinline__ void cluster_norm_x(const NormArgs n, int cluster, int cols, int nb, uint32_t* sx) {
  __shared__ float wsum[kNormWarps];
  switch (cluster) {
    case 2: return cluster_norm_types<2>(n, cols, nb, sx, wsum);
    case 4: return cluster_norm_types<4>(n, cols, nb, sx, wsum);
    default: return cluster_norm_types<8>(n, cols, nb, sx, wsum);
  }
}

// The activations of a launch into shared memory: copied (stage_x), or, kNorm, computed by the
// cluster (cluster_norm_x). Both do the PDL wait first and end with a barrier.
template <int kCols, bool kNorm>
__device__ __forceinline__ void stage_activations(const DpParams& p, uint32_t* sx) {
  if constexpr (kNorm) {
    cluster_norm_x(p.norm, p.cluster, kCols, p.x_blocks, sx);
  } else {
    dp4a::stage_x(p.x, kCols * p.x_blocks, sx);
  }
}

// Segment of global row `grow` (rows are numbered across segments in table order).
__device__ __forceinline__ int segment_of(const DpParams& p, int grow) {
  int s = 0;
  while (s + 1 < p.n_seg && grow >= p.seg[s + 1].row_start) ++s;
  return s;
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
  if (lane == 0) {
#pragma unroll
    for (int c = 0; c < kCols; ++c) p.out[static_cast<int64_t>(c) * p.n_out + sd.col_begin + r] = acc[c];
  }
}

// The norm kernels' replacement for the first unit loaded before the PDL wait: a unit held in
// registers across the inlined norm pushed the kernel past 80 registers (spills; the v10 attempt
// dropped that load for the same reason), so instead the bytes of the row's first 32 units (what the
// warp's lanes load first) are prefetched into L2, one 128-byte line per lane, before the wait. A
// prefetch is a hint: it returns nothing and cannot read stale data (weights are never written by a
// ggfuse kernel; common.cuh). Units: 64 values for the K-quants, 32 for the 32-value blocks, 128 for
// Q4_0's 16-byte units.
__device__ __forceinline__ void prefetch_first_units(const DpParams& p, int grow, int lane) {
  const DpSeg& sd = p.seg[segment_of(p, grow)];
  const int64_t k = static_cast<int64_t>(p.x_blocks) * kQK;
  const int64_t unit_values = sd.type == kQ4_K || sd.type == kQ5_K || sd.type == kQ6_K ? 64 : sd.wide ? 128 : 32;
  const int64_t bytes = sd.row_bytes * std::min<int64_t>(k, 32 * unit_values) / k;
  const int64_t off = sd.byte_offset + static_cast<int64_t>(grow - sd.row_start) * sd.row_bytes + 128 * lane;
  if (128 * lane < bytes && off < p.weight_bytes) asm volatile("prefetch.global.L2 [%0];" ::"l"(p.weight + off));
}

template <int kCols, bool kNorm>
__device__ __forceinline__ void dp4a_kernel_body(const DpParams& p, uint32_t* sx) {
  allow_dependent_launch();
  if constexpr (kNorm) cluster_arrive_relaxed();  // phase 0: this CTA runs (cluster_norm_x)
  const int lane = threadIdx.x & 31;
  auto stage = [&] { stage_activations<kCols, kNorm>(p, sx); };
  const int row0 = blockIdx.x * kDpCtaRows + (threadIdx.x >> 5) * kDpRowsPerWarp;
  if (row0 >= p.total_rows) {  // no row here: only take part in the CTA's copy of x
    stage();
    return;
  }
  if constexpr (kNorm) {
    prefetch_first_units(p, row0, lane);
    stage();
    dp4a_row<kCols, false>(p, sx, row0, lane, stage);
  } else {
    dp4a_row<kCols, true>(p, sx, row0, lane, stage);
  }
#pragma unroll 1
  for (int j = 1; j < kDpRowsPerWarp && row0 + j < p.total_rows; ++j) {
    dp4a_row<kCols, false>(p, sx, row0 + j, lane, stage);
  }
}

template <int kCols>
__global__ void __launch_bounds__(kDpThreads) mat_vec_dp4a_kernel(const DpParams p) {
  extern __shared__ __align__(16) uint32_t sx[];
  dp4a_kernel_body<kCols, false>(p, sx);
}
// The norm kernel: held to kDpMinCtasPerSm CTAs per SM (80 registers), the occupancy the one-wave
// rule of launch_dp4a_grid counts on.
template <int kCols>
__global__ void __launch_bounds__(kDpThreads, kDpMinCtasPerSm) mat_vec_dp4a_norm_kernel(const __grid_constant__ DpParams p) {
  extern __shared__ __align__(16) uint32_t sx[];
  dp4a_kernel_body<kCols, true>(p, sx);
}

// Staged variant. Warp w's rows are row0, row0 + 1 (rows_per_warp of them); row j lands in slot j
// of the warp's slots, its first byte at slot + (its buffer offset mod 16).
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

template <int kCols, bool kNorm>
__device__ __forceinline__ void dp4a_staged_body(const DpParams& p, uint32_t* smem_words) {
  uint32_t* sx = smem_words;
  allow_dependent_launch();
  if constexpr (kNorm) cluster_arrive_relaxed();  // phase 0: this CTA runs (cluster_norm_x)
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int rpw = p.rows_per_warp;
  const int row0 = (blockIdx.x * kDpWarps + warp) * rpw;
  uint8_t* slots = reinterpret_cast<uint8_t*>(smem_words + p.x_words) +
                   static_cast<int64_t>(warp) * rpw * p.slot_bytes;
  const int rows = max(0, min(rpw, p.total_rows - row0));
  // Rows of staged segments are copied whole; every lane commits one group per row (empty for a
  // row read from global memory), so group j is row j's copy for every lane.
  bool staged0 = false, staged1 = false;
#pragma unroll
  for (int j = 0; j < kDpRowsPerWarp; ++j) {
    if (j < rows) {
      const DpSeg* sd;
      const int64_t off = staged_row_offset(p, row0 + j, &sd);
      if (sd->staged) copy_row_to_slot(p, off, sd->row_bytes, slots + j * p.slot_bytes, lane);
      (j == 0 ? staged0 : staged1) = sd->staged != 0;
      cp_async_commit();
    }
  }
  auto stage = [&] { stage_activations<kCols, kNorm>(p, sx); };  // the PDL wait, then x
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
  } else if constexpr (kNorm) {  // a row of an unstaged segment, as in the register kernel
    prefetch_first_units(p, row0, lane);
    stage();
    dp4a_row<kCols, false>(p, sx, row0, lane, stage);
  } else {  // a row of an unstaged segment: its first unit is loaded before the wait, as in the
            // register kernel
    dp4a_row<kCols, true>(p, sx, row0, lane, stage);
  }
  if (rows < 2) return;
  if (staged1) {
    cp_async_wait<0>();
    staged_row<kCols>(p, sx, slots + p.slot_bytes, row0 + 1, lane);
  } else {
    dp4a_row<kCols, false>(p, sx, row0 + 1, lane, stage);
  }
}

template <int kCols>
__global__ void __launch_bounds__(kDpThreads) mat_vec_dp4a_staged_kernel(const DpParams p) {
  extern __shared__ __align__(16) uint32_t smem_words[];
  dp4a_staged_body<kCols, false>(p, smem_words);
}
template <int kCols>
__global__ void __launch_bounds__(kDpThreads, kDpMinCtasPerSm) mat_vec_dp4a_staged_norm_kernel(const __grid_constant__ DpParams p) {
  extern __shared__ __align__(16) uint32_t smem_words[];
  dp4a_staged_body<kCols, true>(p, smem_words);
}

// Raises a kernel's dynamic shared memory limit to the device's opt-in maximum once per device.
template <typename Kernel>
cudaError_t allow_smem(Kernel kernel, size_t smem, int* set_per_device) {
  if (smem <= 48 * 1024) return cudaSuccess;
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  const int optin = device_attribute(device, cudaDevAttrMaxSharedMemoryPerBlockOptin);
  if (smem > static_cast<size_t>(optin)) return cudaErrorNotSupported;
  if (device >= 64 || set_per_device[device] < static_cast<int>(smem)) {
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, optin);
    if (err != cudaSuccess) return err;
    if (device < 64) set_per_device[device] = optin;
  }
  return cudaSuccess;
}

// GGFUSE_MV_NORM_CLUSTER (read once): 0: rms_norm_mat_vec_q8_1 never normalizes in the dp4a kernel's
// CTAs; 1 (default): when all of the launch's CTAs are resident at once (each extra wave of CTAs
// would repeat the norm); 2: always (for measurements).
int norm_cluster_policy() {
  static const int policy = env_int("GGFUSE_MV_NORM_CLUSTER", 1);
  return policy;
}

// CTAs of `kernel` (256 threads, `smem` dynamic bytes, clusters of `cluster`) resident at once on
// `device`; cached, since launches ask on every call. 0 when it cannot be launched at all.
int resident_ctas(const void* kernel, int device, int cluster, size_t smem) {
  static std::mutex mu;
  static std::map<std::tuple<const void*, int, int, size_t>, int> cache;
  const auto key = std::make_tuple(kernel, device, cluster, smem);
  {
    const std::lock_guard<std::mutex> lock(mu);
    const auto it = cache.find(key);
    if (it != cache.end()) return it->second;
  }
  cudaLaunchConfig_t config{};
  config.gridDim = dim3(static_cast<unsigned>(cluster));
  config.blockDim = dim3(kDpThreads);
  config.dynamicSmemBytes = smem;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = static_cast<unsigned>(cluster);
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  config.attrs = attr;
  config.numAttrs = 1;
  int clusters = 0;
  if (cudaOccupancyMaxActiveClusters(&clusters, kernel, &config) != cudaSuccess) {
    (void)cudaGetLastError();
    clusters = 0;
  }
  const int ctas = clusters * cluster;
  const std::lock_guard<std::mutex> lock(mu);
  cache[key] = ctas;
  return ctas;
}

// Launches one of the four kernels: the norm kernels in clusters of p.cluster CTAs (the grid rounded
// up to a multiple of it; CTAs without rows still take part in the norm), and only where the
// policy allows (NotSupported otherwise, having launched nothing).
template <typename Kernel>
cudaError_t launch_dp4a_grid(Kernel kernel, bool norm, const DpParams& p, int cta_rows, size_t smem,
                             cudaStream_t stream) {
  int grid = (p.total_rows + cta_rows - 1) / cta_rows;
  if (!norm) return launch_kernel(kernel, dim3(grid), dim3(kDpThreads), smem, stream, p);
  grid = (grid + p.cluster - 1) / p.cluster * p.cluster;
  int device = 0;
  const cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  const int resident = resident_ctas(reinterpret_cast<const void*>(kernel), device, p.cluster, smem);
  if (resident <= 0 || (norm_cluster_policy() == 1 && grid > resident)) return cudaErrorNotSupported;
  return launch_kernel_clustered(p.cluster, kernel, dim3(grid), dim3(kDpThreads), smem, stream, p);
}

// The staged kernel when its slots fit at >= kDpMinCtasPerSm CTAs per SM (2 rows per warp, else 1);
// cudaErrorNotSupported, having launched nothing, otherwise.
template <int kCols, bool kNorm>
cudaError_t launch_dp4a_staged(DpParams p, cudaStream_t stream) {
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  const int per_sm = device_attribute(device, cudaDevAttrMaxSharedMemoryPerMultiprocessor);
  const int reserved = device_attribute(device, cudaDevAttrReservedSharedMemoryPerBlock) +
                       (kNorm ? kNormWarps * static_cast<int>(sizeof(float)) : 0);  // + cluster_norm_x's
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
    if (smem + reserved > optin || (smem + reserved) * kDpMinCtasPerSm > per_sm) continue;
    p.rows_per_warp = rpw;
    static int smem_set[64] = {};
    void (*kernel)(const DpParams) = nullptr;  // only the kernels of this kNorm instantiated
    if constexpr (kNorm) kernel = mat_vec_dp4a_staged_norm_kernel<kCols>; else kernel = mat_vec_dp4a_staged_kernel<kCols>;
    err = allow_smem(kernel, static_cast<size_t>(smem), smem_set);
    if (err != cudaSuccess) return err;
    return launch_dp4a_grid(kernel, kNorm, p, kDpWarps * rpw, static_cast<size_t>(smem), stream);
  }
  return cudaErrorNotSupported;
}

template <int kCols, bool kNorm>
cudaError_t launch_dp4a(const DpParams& p, bool any_staged, cudaStream_t stream) {
  // Staged or not at all: where the slots do not fit, the unstaged kernel measured slower than the
  // MMA kernel for the types that ask for staging (QKV 8192 Q4_0 at B=4: 39.7 against 30.3 us).
  if (any_staged) return launch_dp4a_staged<kCols, kNorm>(p, stream);
  const size_t smem = static_cast<size_t>(kCols) * p.x_blocks * (kQ8Bytes + 4);
  static int smem_set[64] = {};
  void (*kernel)(const DpParams) = nullptr;  // only the kernels of this kNorm instantiated
  if constexpr (kNorm) kernel = mat_vec_dp4a_norm_kernel<kCols>; else kernel = mat_vec_dp4a_kernel<kCols>;
  const cudaError_t err = allow_smem(kernel, smem, smem_set);
  if (err != cudaSuccess) return err;  // NotSupported: the caller runs the MMA kernel
  return launch_dp4a_grid(kernel, kNorm, p, kDpCtaRows, smem, stream);
}

// The launch parameters (segments, staging) of both entry points; sets *any_staged. InvalidValue for
// arguments no kernel takes.
cudaError_t fill_dp_params(DpParams& p, const uint8_t* weight, int64_t weight_bytes, const SegmentTable& table,
                           int64_t k, int64_t batch, float* out, int64_t n_out, DpStaging staging,
                           bool* any_staged) {
  if (batch > kDpMaxCols || table.count > kMaxSegments || k <= 0 || k % kQK != 0 || k > (int64_t{1} << 30)) {
    return cudaErrorInvalidValue;
  }
  p.weight = weight;
  p.weight_bytes = weight_bytes;
  p.out = out;
  p.x_row_bytes = k / kQK * kQ8Bytes;
  p.x_blocks = static_cast<int32_t>(k / kQK);
  p.n_out = static_cast<int32_t>(n_out);
  p.n_seg = table.count;
  p.cluster = 1;
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
  *any_staged = staged;
  return cudaSuccess;
}

}  // namespace

cudaError_t mat_vec_q8_1_dp4a(const uint8_t* weight, int64_t weight_bytes, const SegmentTable& table, int64_t k,
                              const uint8_t* x_q8, int64_t batch, float* out, int64_t n_out,
                              DpStaging staging, cudaStream_t stream) {
  if (batch <= 0 || table.count <= 0) return cudaSuccess;
  DpParams p{};
  bool staged = false;
  const cudaError_t err = fill_dp_params(p, weight, weight_bytes, table, k, batch, out, n_out, staging, &staged);
  if (err != cudaSuccess) return err;
  p.x = x_q8;
  switch (batch) {
    case 1: return launch_dp4a<1, false>(p, staged, stream);
    case 2: return launch_dp4a<2, false>(p, staged, stream);
    case 3: return launch_dp4a<3, false>(p, staged, stream);
    case 4: return launch_dp4a<4, false>(p, staged, stream);
    case 5: return launch_dp4a<5, false>(p, staged, stream);
    case 6: return launch_dp4a<6, false>(p, staged, stream);
    case 7: return launch_dp4a<7, false>(p, staged, stream);
    default: return launch_dp4a<8, false>(p, staged, stream);
  }
}

cudaError_t rms_norm_mat_vec_q8_1_dp4a(const void* x, FloatType x_type, const void* norm_w, FloatType w_type,
                                       float eps, const uint8_t* weight, int64_t weight_bytes,
                                       const SegmentTable& table, int64_t k, int64_t batch, float* out,
                                       int64_t n_out, DpStaging staging, cudaStream_t stream) {
  if (batch <= 0 || table.count <= 0) return cudaSuccess;
  if (batch > kDpNormMaxCols || norm_cluster_policy() == 0) return cudaErrorNotSupported;
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  if (device_attribute(device, cudaDevAttrComputeCapabilityMajor) < 9) return cudaErrorNotSupported;  // clusters
  DpParams p{};
  bool staged = false;
  err = fill_dp_params(p, weight, weight_bytes, table, k, batch, out, n_out, staging, &staged);
  if (err != cudaSuccess) return err;
  if (k >= (int64_t{1} << 31)) return cudaErrorNotSupported;  // norm_row_q8_1's 32-bit offsets
  p.norm = make_norm_args(x, x_type, norm_w, w_type, eps);
  const int64_t rounds = (k / 4 + kNormThreads - 1) / kNormThreads;
  // At least 2: a lone CTA would hold all 4 rounds of x and w in registers (norm_row_q8_1<1>: 64
  // registers against 40-48); with K <= 1024 the second CTA of the pair quantizes nothing.
  p.cluster = rounds <= 2 ? 2 : rounds <= 4 ? 4 : 8;
  return batch == 1 ? launch_dp4a<1, true>(p, staged, stream) : launch_dp4a<2, true>(p, staged, stream);
}

}  // namespace cuda
}  // namespace ggfuse

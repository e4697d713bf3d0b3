// The decode mat-vec for batch 1..8 on sm_90: the dp4a kernel's arithmetic (dp4a_units.cuh) fed
// from shared memory, which each CTA fills with bulk copies (TMA, cp.async.bulk) of its whole share
// of the weights, issued before the PDL wait. Optionally the CTA also runs the RMSNorm -> Q8_1 of x
// itself (rms_norm_mat_vec_q8_1): then a decode layer's norm + projection is one launch.
//
// Status: opt-in (GGFUSE_MV_STREAM=N), tested and sanitizer-clean, but measured about 2x slower
// than the default kernels on the H200 (QKV 4096 -> 6144 Q4_K, B = 1: 11.0 µs against 5.3), because
// the arithmetic, not the copies, is on the critical path: Nsight Compute of one launch shows 0.16
// instructions issued per scheduler, stalled on instruction fetch (the per-type row loops are
// out-of-line calls), on the per-chunk CTA barrier, and on register spills at the 128-register cap
// that two CTAs per SM impose. docs/PERFORMANCE.md (v8) has the numbers and what would fix it.
//
// Why (docs/PERFORMANCE.md has the measurements): a layer's mat-vec at B = 1 streams a few MB, which
// at 3-4.5 TB/s takes 3-5 µs, while the kernel boundary, the DRAM latency and the dependency on the
// previous kernel cost ~3 µs more per layer when each CTA only has a unit or two of loads in flight
// before its wait. Here:
//   * one CTA per SM, each using at most half of the SM's shared memory and registers, so the next
//     layer's CTAs become resident while this layer's run, and issue all of their copies at once:
//     the weight stream of layer i+1 overlaps the dependency wait, norm and arithmetic of layer i;
//   * a CTA's rows (an equal share of the weight bytes, whole rows) go through a ring of shared-memory
//     slots in chunks of whole rows of one segment (8 rows, one per warp, when a slot holds them); a
//     chunk is one bulk copy of its 16-byte aligned enclosing range (the bytes keep their address mod
//     16, so the 2-byte aligned types read as in global memory); a slot is refilled with the chunk
//     `slots` ahead once every warp has finished with it (a CTA barrier per chunk);
//   * the bytes past the last whole 16-byte granule of the weight buffer, if a chunk needs them, are
//     copied by one thread (a bulk copy would read past the buffer);
//   * weights are read before the PDL wait; x, the norm weight and the output after it (the norm
//     weight is only prefetched into L2 before it; the contract in common.cuh).
// Results: per row the lanes take the same units in the same order as the dp4a kernel, so both
// kernels produce the same bits.
#include <algorithm>
#include <cstdlib>

#include "dp4a_units.cuh"
#include "ggfuse/kernels_cuda.h"
#include "norm.cuh"

namespace ggfuse {
namespace cuda {
namespace {

using dp4a::kDpMaxCols;
using dp4a::kQ8Bytes;

constexpr int kStreamMaxSlots = 8;
// A chunk's copy starts up to 15 bytes before its first row and ends up to 15 after its last.
constexpr int64_t kSlotSlack = 32;

struct StreamSeg {
  int64_t byte_offset;
  int64_t row_bytes;
  int64_t cost_begin;  // weight bytes of the segments before this one (the CTA split is by bytes)
  int32_t type;
  int32_t rows;
  int32_t col_begin;
  int32_t row_start;  // first global row of this segment
  int32_t chunk_rows; // rows per chunk: as many as a slot holds, a multiple of 8 when >= 8
  int32_t pad;
};

struct StreamParams {
  StreamSeg seg[kMaxSegments];
  const uint8_t* weight;
  int64_t weight_bytes;  // bytes the weight buffer has (no copy reads past them)
  int64_t total_cost;
  const uint8_t* x;      // Q8_1 rows, or null: the CTA normalizes norm.x itself
  NormArgs norm;
  float* out;
  int32_t n_seg;
  int32_t total_rows;
  int32_t x_blocks;      // K / 32
  int32_t n_out;
  int32_t slots;         // 2..kStreamMaxSlots
  int32_t slot_bytes;    // a multiple of 16
  int32_t x_offset;      // shared-memory offset of the staged activations
};

// ---- mbarrier + bulk copy (sm_90) ----
template <typename T>  // a template: unreferenced where the sm_90 code below is compiled out
__device__ __forceinline__ uint32_t smem_addr(const T* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void mbar_init(uint64_t* bar, uint32_t count) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_addr(bar)), "r"(count) : "memory");
#endif
}
__device__ __forceinline__ void mbar_init_fence() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
#endif
}
// One arrival that also announces `bytes` of asynchronous copies still to land on the barrier.
__device__ __forceinline__ void mbar_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_addr(bar)), "r"(bytes)
               : "memory");
#endif
}
__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile(
      "{\n"
      ".reg .pred done;\n"
      "WAIT_%=:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra WAIT_%=;\n"
      "}\n" ::"r"(smem_addr(bar)),
      "r"(parity)
      : "memory");
#endif
}
// Global -> shared bulk copy completing on `bar`: 16-byte aligned addresses, bytes a multiple of 16.
__device__ __forceinline__ void bulk_copy(void* dst, const void* src, uint32_t bytes, uint64_t* bar) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
               ::"r"(smem_addr(dst)), "l"(src), "r"(bytes), "r"(smem_addr(bar))
               : "memory");
#endif
}
// Orders this thread's earlier shared-memory reads (generic proxy) before later bulk copies into the
// same bytes (async proxy).
__device__ __forceinline__ void fence_proxy_async() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
#endif
}

// ---- the CTA's rows and their chunks ----
// The first global row whose first byte is at or after `bound` (in the segments' byte order).
__device__ __forceinline__ int32_t first_row_at(const StreamParams& p, int64_t bound) {
  for (int s = 0; s < p.n_seg; ++s) {
    const StreamSeg& sd = p.seg[s];
    const int64_t rel = bound - sd.cost_begin;
    const int64_t r = rel <= 0 ? 0 : (rel + sd.row_bytes - 1) / sd.row_bytes;
    if (r < sd.rows) return sd.row_start + static_cast<int32_t>(r);
  }
  return p.total_rows;
}

struct Chunk {
  int32_t seg;    // segment index
  int32_t row;    // first row, within the segment
  int32_t n;      // rows
  int32_t skew;   // bytes from the slot start to the first row (its address mod 16)
};

// The chunk starting at global row g (< end).
__device__ __forceinline__ Chunk chunk_at(const StreamParams& p, int32_t g, int32_t end) {
  int s = 0;
  while (s + 1 < p.n_seg && g >= p.seg[s + 1].row_start) ++s;
  const StreamSeg& sd = p.seg[s];
  Chunk c;
  c.seg = s;
  c.row = g - sd.row_start;
  c.n = min(min(end - g, sd.rows - c.row), sd.chunk_rows);
  c.skew = static_cast<int32_t>((sd.byte_offset + c.row * sd.row_bytes) & 15);
  return c;
}

// Thread 0: copy chunk c into `slot`, completing on `bar`.
__device__ __forceinline__ void issue_chunk(const StreamParams& p, const Chunk& c, uint8_t* slot, uint64_t* bar) {
  const StreamSeg& sd = p.seg[c.seg];
  const int64_t begin = sd.byte_offset + c.row * sd.row_bytes;
  const int64_t end = begin + c.n * sd.row_bytes;
  const int64_t a0 = begin & ~int64_t{15};
  const int64_t last_granule = p.weight_bytes & ~int64_t{15};  // bytes past it: copied one by one
  const int64_t a1 = min((end + 15) & ~int64_t{15}, max(last_granule, a0));
  for (int64_t i = a1; i < end; ++i) slot[i - a0] = p.weight[i];  // before the arrival: released by it
  mbar_arrive_expect_tx(bar, static_cast<uint32_t>(a1 - a0));
  if (a1 > a0) bulk_copy(slot, p.weight + a0, static_cast<uint32_t>(a1 - a0), bar);
}

// ---- activations ----
// The fused norm in place of the copy: L2 prefetch of the norm weight, the PDL wait, then this CTA
// normalizes and quantizes the `cols` rows of n.x (K = nb * 32) into the layout dp4a::stage_x writes
// (norm.cuh: the standalone norm kernel's bytes); ends with a CTA barrier. Out of line: it runs
// once per CTA and holds nine type instantiations.
__device__ __noinline__ void stage_norm_x(const NormArgs n, int cols, int nb, uint32_t* sx) {
  const int nblk = cols * nb;
  cta_norm_q8_1(n, cols, static_cast<int64_t>(nb) * kQK,
                [&](int b, int64_t blk, int j, uint32_t word, uint32_t ds, uint32_t sq) {
                  const int i = b * nb + static_cast<int>(blk);
                  sx[9 * i + 1 + j] = word;
                  if (j == 0) {
                    sx[9 * i] = ds;
                    sx[9 * nblk + i] = sq;
                  }
                });
}

// ---- the kernel ----
// The rows of one chunk (in shared memory from `base`, row_bytes apart): warp w takes rows w, w + kWarps, ...
template <int kCols, int32_t kType, int kWarps>
__device__ __noinline__ void chunk_rows(const uint8_t* base, int64_t row_bytes, int n, int x_blocks,
                                           const uint32_t* sx, float* out, int32_t n_out) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
#pragma unroll 1
  for (int i = warp; i < n; i += kWarps) {
    float acc[kCols];
#pragma unroll
    for (int b = 0; b < kCols; ++b) acc[b] = 0.0f;
    dp4a::row_dot_typed<kCols, kType, dp4a::SharedLd>(base + i * row_bytes, x_blocks, sx, lane, acc, false,
                                                      [] {}, false);
    if (lane == 0) {
#pragma unroll
      for (int b = 0; b < kCols; ++b) out[b * static_cast<int64_t>(n_out) + i] = acc[b];
    }
  }
}

// Shared memory: [slots mbarriers (8 bytes each, 64 reserved)][slots x slot_bytes][x: batch x K/32 x
// 40 bytes].
template <int kCols, int kWarps>
__global__ void __launch_bounds__(kWarps * 32, 2) mat_vec_stream_kernel(const StreamParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
  __trap();  // the launcher runs this kernel on sm_90+ only (bulk copies and mbarrier transactions)
#endif
  extern __shared__ __align__(16) uint8_t smem[];
  allow_dependent_launch();
  uint64_t* bars = reinterpret_cast<uint64_t*>(smem);
  uint8_t* ring = smem + 64;
  uint32_t* sx = reinterpret_cast<uint32_t*>(smem + p.x_offset);
  const int64_t g = gridDim.x;
  const int32_t r_begin = first_row_at(p, p.total_cost * blockIdx.x / g);
  const int32_t r_end = first_row_at(p, p.total_cost * (blockIdx.x + 1) / g);
  const int nslots = p.slots;

  // Thread 0 is the producer: it fills every slot before the PDL wait, then refills slot j % slots
  // with chunk j + slots after the CTA is done with chunk j.
  int32_t produce_row = r_begin;
  if (threadIdx.x == 0) {
    for (int s = 0; s < nslots; ++s) mbar_init(&bars[s], 1);
    mbar_init_fence();
    for (int s = 0; s < nslots && produce_row < r_end; ++s) {
      const Chunk c = chunk_at(p, produce_row, r_end);
      issue_chunk(p, c, ring + static_cast<int64_t>(s) * p.slot_bytes, &bars[s]);
      produce_row += c.n;
    }
  }
  // The PDL wait, the activations (copied or normalized here), and a CTA barrier that also makes
  // the barriers' initialization visible to every thread.
  if (p.x != nullptr) {
    dp4a::stage_x(p.x, kCols * p.x_blocks, sx);
  } else {
    stage_norm_x(p.norm, kCols, p.x_blocks, sx);
  }

  int32_t row = r_begin;
  for (int j = 0; row < r_end; ++j) {
    const Chunk c = chunk_at(p, row, r_end);
    const int s = j % nslots;
    mbar_wait(&bars[s], static_cast<uint32_t>((j / nslots) & 1));
    const StreamSeg& sd = p.seg[c.seg];
    const uint8_t* base = ring + static_cast<int64_t>(s) * p.slot_bytes + c.skew;
    float* out = p.out + sd.col_begin + c.row;
    // A chunk is one segment: one type, switched on here, outside the row loop (a switch inside it
    // made the compiler keep every type's registers live at once: 200 instead of <= 80).
    switch (sd.type) {
      case kQ4_K: chunk_rows<kCols, kQ4_K, kWarps>(base, sd.row_bytes, c.n, p.x_blocks, sx, out, p.n_out); break;
      case kQ5_K: chunk_rows<kCols, kQ5_K, kWarps>(base, sd.row_bytes, c.n, p.x_blocks, sx, out, p.n_out); break;
      case kQ6_K: chunk_rows<kCols, kQ6_K, kWarps>(base, sd.row_bytes, c.n, p.x_blocks, sx, out, p.n_out); break;
      case kQ4_0: chunk_rows<kCols, kQ4_0, kWarps>(base, sd.row_bytes, c.n, p.x_blocks, sx, out, p.n_out); break;
      case kQ5_0: chunk_rows<kCols, kQ5_0, kWarps>(base, sd.row_bytes, c.n, p.x_blocks, sx, out, p.n_out); break;
      default: chunk_rows<kCols, kQ8_0, kWarps>(base, sd.row_bytes, c.n, p.x_blocks, sx, out, p.n_out); break;
    }
    row += c.n;
    __syncthreads();  // every warp is done with slot s
    if (threadIdx.x == 0 && produce_row < r_end) {
      fence_proxy_async();
      const Chunk nc = chunk_at(p, produce_row, r_end);
      issue_chunk(p, nc, ring + static_cast<int64_t>(s) * p.slot_bytes, &bars[s]);
      produce_row += nc.n;
    }
  }
}

// Opt-in, read once: GGFUSE_MV_STREAM=N runs this kernel for batch chunks of <= N rows of every type
// (unset or 0: never; it measured slower than the dp4a / MMA kernels, docs/PERFORMANCE.md v8).
constexpr int kStreamWarps = 8;  // 16 (at 64 registers) measured no faster at B = 1
int stream_max_batch() {
  static const int v = [] {
    const char* e = std::getenv("GGFUSE_MV_STREAM");
    return e != nullptr && *e != '\0' ? std::atoi(e) : 0;
  }();
  return v;
}

template <int kCols, int kWarps>
cudaError_t launch_stream(StreamParams& p, int64_t max_row_bytes, int device, cudaStream_t stream) {
  const int sms = std::max(1, device_attribute(device, cudaDevAttrMultiProcessorCount));
  const int optin = device_attribute(device, cudaDevAttrMaxSharedMemoryPerBlockOptin);
  const int per_sm = device_attribute(device, cudaDevAttrMaxSharedMemoryPerMultiprocessor);
  // Half an SM's shared memory (less the 1 KB the hardware reserves per CTA): two layers' CTAs fit.
  const int64_t budget = std::min<int64_t>(optin, per_sm / 2 - 1024);
  const int64_t x_bytes = (static_cast<int64_t>(kCols) * p.x_blocks * (kQ8Bytes + 4) + 15) & ~int64_t{15};
  const int64_t ring = budget - 64 - x_bytes - (p.x == nullptr ? kNormScratchBytes : 0);  // + the norm's static scratch
  // A slot holds a row per warp when it can (then every chunk keeps every warp busy).
  const int64_t want = ((kWarps * max_row_bytes + kSlotSlack) + 15) & ~int64_t{15};
  int64_t slot = 0;
  int slots = 0;
  if (ring >= 2 * want) {
    slot = want;
    slots = static_cast<int>(std::min<int64_t>(kStreamMaxSlots, ring / want));
  } else {
    slot = (ring / 2) & ~int64_t{15};
    slots = 2;
  }
  if (slot < max_row_bytes + kSlotSlack) return cudaErrorNotSupported;  // the caller runs another kernel
  p.slots = slots;
  p.slot_bytes = static_cast<int32_t>(slot);
  for (int s = 0; s < p.n_seg; ++s) {
    StreamSeg& sd = p.seg[s];
    int64_t fit = (slot - kSlotSlack) / sd.row_bytes;
    if (fit >= kWarps) fit -= fit % kWarps;
    sd.chunk_rows = static_cast<int32_t>(std::min<int64_t>(fit, sd.rows));
  }
  p.x_offset = static_cast<int32_t>(64 + slot * slots);
  const size_t smem = static_cast<size_t>(p.x_offset + x_bytes);
  const int grid = static_cast<int>(std::min<int64_t>(sms, std::max<int64_t>(1, p.total_rows / kWarps)));
  auto* kernel = mat_vec_stream_kernel<kCols, kWarps>;
  static int smem_set[64] = {};  // per device: the dynamic shared memory limit raised so far
  if (device >= 64 || smem_set[device] < static_cast<int>(smem)) {
    cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (err != cudaSuccess) return err;
    // All of the unified L1/shared memory as shared: without it the driver may pick a split that
    // holds one CTA per SM, and the next layer's CTAs could not start their copies early.
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                               static_cast<int>(cudaSharedmemCarveoutMaxShared));
    if (err != cudaSuccess) return err;
    if (device < 64) smem_set[device] = static_cast<int>(smem);
  }
  return launch_kernel(kernel, dim3(grid), dim3(kWarps * 32), smem, stream, p);
}

// Fills the segment table; returns the largest row size, or -1 (invalid arguments).
int64_t fill_stream_params(StreamParams& p, const uint8_t* weight, int64_t weight_bytes, const SegmentTable& table,
                           int64_t k, int64_t n_out) {
  if (table.count <= 0 || table.count > kMaxSegments || k <= 0 || k % kQK != 0 || k > (int64_t{1} << 30)) {
    return -1;
  }
  p.weight = weight;
  p.weight_bytes = weight_bytes;
  p.x_blocks = static_cast<int32_t>(k / kQK);
  p.n_out = static_cast<int32_t>(n_out);
  p.n_seg = table.count;
  int64_t rows = 0, cost = 0, max_rb = 0;
  for (int s = 0; s < table.count; ++s) {
    const Segment& in = table.seg[s];
    if (!is_mat_vec_type(in.type) || in.rows <= 0) return -1;
    const int64_t rb = row_bytes(in.type, k);
    if (rb <= 0 || in.byte_offset < 0 || in.byte_offset + in.rows * rb > weight_bytes) return -1;
    StreamSeg& sd = p.seg[s];
    sd.byte_offset = in.byte_offset;
    sd.row_bytes = rb;
    sd.cost_begin = cost;
    sd.type = in.type;
    sd.rows = in.rows;
    sd.col_begin = in.row_begin;
    sd.row_start = static_cast<int32_t>(rows);
    rows += in.rows;
    cost += in.rows * rb;
    max_rb = std::max(max_rb, rb);
  }
  if (rows > (int64_t{1} << 30)) return -1;
  p.total_rows = static_cast<int32_t>(rows);
  p.total_cost = cost;
  return max_rb;
}

template <int kWarps>
cudaError_t launch_cols(StreamParams& p, int64_t batch, int64_t max_rb, int device, cudaStream_t stream) {
  switch (batch) {
    case 1: return launch_stream<1, kWarps>(p, max_rb, device, stream);
    case 2: return launch_stream<2, kWarps>(p, max_rb, device, stream);
    case 3: return launch_stream<3, kWarps>(p, max_rb, device, stream);
    case 4: return launch_stream<4, kWarps>(p, max_rb, device, stream);
    case 5: return launch_stream<5, kWarps>(p, max_rb, device, stream);
    case 6: return launch_stream<6, kWarps>(p, max_rb, device, stream);
    case 7: return launch_stream<7, kWarps>(p, max_rb, device, stream);
    default: return launch_stream<8, kWarps>(p, max_rb, device, stream);
  }
}

cudaError_t launch_any_cols(StreamParams& p, int64_t batch, int64_t max_rb, cudaStream_t stream) {
  int device = 0;
  const cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  if (device_attribute(device, cudaDevAttrComputeCapabilityMajor) < 9) return cudaErrorNotSupported;
  return launch_cols<kStreamWarps>(p, batch, max_rb, device, stream);
}

// Both entry points: x_q8 (Q8_1 rows) or, when it is null, `norm`.
cudaError_t run_stream(const uint8_t* weight, int64_t weight_bytes, const SegmentTable& table, int64_t k,
                       const uint8_t* x_q8, NormArgs norm, int64_t batch, float* out, int64_t n_out,
                       cudaStream_t stream) {
  if (batch <= 0 || table.count <= 0) return cudaSuccess;
  if (batch > kDpMaxCols || batch > stream_max_batch()) return cudaErrorNotSupported;
  StreamParams p{};
  const int64_t max_rb = fill_stream_params(p, weight, weight_bytes, table, k, n_out);
  if (max_rb < 0) return cudaErrorInvalidValue;
  p.x = x_q8;
  p.out = out;
  p.norm = norm;
  return launch_any_cols(p, batch, max_rb, stream);
}

}  // namespace

cudaError_t mat_vec_q8_1_stream(const uint8_t* weight, int64_t weight_bytes, const SegmentTable& table, int64_t k,
                                const uint8_t* x_q8, int64_t batch, float* out, int64_t n_out,
                                cudaStream_t stream) {
  return run_stream(weight, weight_bytes, table, k, x_q8, NormArgs{}, batch, out, n_out, stream);
}

cudaError_t rms_norm_mat_vec_q8_1_stream(const void* x, FloatType x_type, const void* norm_w, FloatType w_type,
                                         float eps, const uint8_t* weight, int64_t weight_bytes,
                                         const SegmentTable& table, int64_t k, int64_t batch, float* out,
                                         int64_t n_out, cudaStream_t stream) {
  const NormArgs n = make_norm_args(x, x_type, norm_w, w_type, eps);
  return run_stream(weight, weight_bytes, table, k, nullptr, n, batch, out, n_out, stream);
}

}  // namespace cuda
}  // namespace ggfuse

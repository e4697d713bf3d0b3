// The benchmark's read-bandwidth probe (ggfuse/read_probe.h): every thread keeps kUnroll independent
// 16-byte loads in flight per iteration of a grid-stride loop over the buffer and folds what it read
// into one uint32 by XOR; the block then reduces its threads' words and XORs the result into *out,
// one atomic per block. The stored XOR depends on every loaded word, so no load can be dropped.
#include "ggfuse/read_probe.h"

#include <algorithm>

#include "common.cuh"

namespace ggfuse {
namespace cuda {
namespace {

constexpr int kThreads = 256;  // per block
// uint4 loads in flight per thread and iteration (64 bytes): 4 read 2 GiB ~0.8% faster than 8 or 16
// on both an H100 (3.13 TB/s) and an H200 (4.53 TB/s), with 256 to 1024 threads per block.
constexpr int kUnroll = 4;
constexpr int64_t kChunk = int64_t{kThreads} * kUnroll;  // uint4s a block reads per iteration

__device__ __forceinline__ uint32_t xor_words(const uint4& v) { return v.x ^ v.y ^ v.z ^ v.w; }

// vec: n_vec uint4s (the 16-byte aligned bulk of the buffer); tail: the n_tail (< 16) bytes after it.
__global__ void __launch_bounds__(kThreads)
    read_probe_kernel(const uint4* __restrict__ vec, int64_t n_vec, const uint8_t* __restrict__ tail,
                      int n_tail, uint32_t* __restrict__ out) {
  const int t = static_cast<int>(threadIdx.x);
  const int64_t stride = kChunk * gridDim.x;
  int64_t base = kChunk * blockIdx.x;  // block b reads chunks b, b + grid, b + 2 grid, ...
  uint32_t acc = 0;
  // Whole chunks, no bounds checks: all kUnroll loads are issued before the first is used. Each of
  // them is coalesced (the block's threads read 4 KiB of consecutive bytes). Streaming loads (evict
  // first): the data is read once.
  for (; base + kChunk <= n_vec; base += stride) {
    const uint4* p = vec + base + t;
    uint4 v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) v[u] = __ldcs(p + u * kThreads);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) acc ^= xor_words(v[u]);
  }
  // The partial last chunk, if any: exactly one block stops the loop at it.
  if (base < n_vec) {
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = base + u * kThreads + t;
      if (i < n_vec) acc ^= xor_words(__ldcs(vec + i));
    }
  }
  // Tail bytes, one per thread of block 0. The buffer starts 16-byte aligned, so tail byte j is byte
  // j % 4 (little-endian) of its 32-bit word.
  if (blockIdx.x == 0 && t < n_tail) acc ^= static_cast<uint32_t>(tail[t]) << (8 * (t & 3));

  // Block reduction: warps by shuffle, then the first warp over the warps' words.
  constexpr int kWarps = kThreads / 32;
  __shared__ uint32_t warp_acc[kWarps];
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) acc ^= __shfl_xor_sync(0xffffffffu, acc, off);
  const int lane = t & 31, warp = t >> 5;
  if (lane == 0) warp_acc[warp] = acc;
  __syncthreads();
  if (warp == 0) {
    acc = lane < kWarps ? warp_acc[lane] : 0u;
#pragma unroll
    for (int off = kWarps / 2; off > 0; off >>= 1) acc ^= __shfl_xor_sync(0xffffffffu, acc, off);
    if (lane == 0) atomicXor(out, acc);
  }
}

}  // namespace

cudaError_t read_probe(const uint8_t* buf, int64_t n_bytes, uint32_t* out, int grid,
                       cudaStream_t stream) {
  if (n_bytes < 0 || (reinterpret_cast<uintptr_t>(buf) & 15u) != 0) return cudaErrorInvalidValue;
  if (n_bytes == 0) return cudaSuccess;
  const int64_t n_vec = n_bytes / 16;
  const int n_tail = static_cast<int>(n_bytes % 16);
  if (grid <= 0) {
    // Fill the device: as many resident blocks per SM as the kernel's registers allow, on every SM.
    int device = 0;
    cudaError_t err = cudaGetDevice(&device);
    if (err != cudaSuccess) return err;
    int per_sm = 0;
    err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, read_probe_kernel, kThreads, 0);
    if (err != cudaSuccess) return err;
    grid = std::max(1, per_sm) * std::max(1, device_attribute(device, cudaDevAttrMultiProcessorCount));
  }
  // No more blocks than chunks (a block without a chunk would only add an atomic), at least one.
  const int64_t chunks = (n_vec + kChunk - 1) / kChunk;
  grid = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(grid, chunks)));
  read_probe_kernel<<<grid, kThreads, 0, stream>>>(reinterpret_cast<const uint4*>(buf), n_vec,
                                                   buf + n_vec * 16, n_tail, out);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace ggfuse

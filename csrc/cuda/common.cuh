// Device helpers shared by the CUDA kernels: programmatic dependent launch (PDL), cp.async, bulk L2
// prefetch, fp16 conversion, and the launch helper that attaches the PDL attribute.
//
// PDL contract of every ggfuse kernel (see launch_kernel below):
//   * each kernel calls grid_dependency_wait() before it reads any input other than a quantized
//     weight buffer and before it writes anything, so it never sees a half-written input and never
//     overwrites memory an earlier kernel still reads;
//   * each kernel calls allow_dependent_launch() first thing, so the next ggfuse kernel in the stream
//     can be scheduled while this one (and the one before it) runs; the only work any ggfuse kernel
//     does before its own wait is reading quantized weight bytes, which no ggfuse kernel ever writes
//     (a torch kernel that writes them does not trigger early, so it has finished by then), and
//     prefetching other inputs into L2 (a prefetch returns nothing: the loads come after the wait
//     and L2 is coherent, so they see the producer's writes);
//   * a kernel launched without the attribute (or after a kernel that never triggers) simply starts
//     after its predecessor finished, and the wait returns at once.
// Torch-free on purpose: these are compiled by nvcc only.
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <utility>

namespace ggfuse {
namespace cuda {

// ---- programmatic dependent launch (sm_90+; no-ops on older targets) ----
__device__ __forceinline__ void grid_dependency_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void allow_dependent_launch() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// ---- thread block clusters (sm_90+; launched in clusters only there, see launch_kernel_clustered) ----
// A CTA's rank in its cluster (0 outside a cluster launch, and on older targets).
__device__ __forceinline__ int cluster_rank() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  uint32_t r;
  asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(r));
  return static_cast<int>(r);
#else
  return 0;
#endif
}
// The cluster barrier, every thread of every CTA once per phase: the release / acquire pair orders
// this thread's shared-memory stores before the other CTAs' distributed loads after their wait. All
// lanes of a warp call it together (.aligned).
__device__ __forceinline__ void cluster_sync_all() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("barrier.cluster.arrive.release.aligned;\n"
               "barrier.cluster.wait.acquire.aligned;" ::: "memory");
#endif
}
// The shared::cluster address of a shared-memory location (a shared::cta address) in the CTA of
// rank `rank`, and a 16-byte load from there.
__device__ __forceinline__ uint32_t cluster_map_shared(uint32_t saddr, int rank) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  uint32_t r;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(r) : "r"(saddr), "r"(rank));
  return r;
#else
  return saddr;
#endif
}
__device__ __forceinline__ float4 cluster_load_f4(uint32_t caddr) {
  float4 v;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("ld.shared::cluster.v4.f32 {%0,%1,%2,%3}, [%4];"
               : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w) : "r"(caddr) : "memory");
#else
  asm volatile("ld.shared.v4.f32 {%0,%1,%2,%3}, [%4];"
               : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w) : "r"(caddr) : "memory");
#endif
  return v;
}

// ---- cp.async (sm_80+): 16-byte global -> shared copies that bypass registers and L1 ----
__device__ __forceinline__ void cp_async_16(void* smem_dst, const void* gmem_src) {
  const uint32_t dst = static_cast<uint32_t>(__cvta_generic_to_shared(smem_dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(gmem_src) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}
// cp.async.wait_group takes an immediate; the stage count is a run-time value (1..8).
__device__ __forceinline__ void cp_async_wait_dyn(int pending) {
  switch (pending) {
    case 0: cp_async_wait<0>(); break;
    case 1: cp_async_wait<1>(); break;
    case 2: cp_async_wait<2>(); break;
    case 3: cp_async_wait<3>(); break;
    case 4: cp_async_wait<4>(); break;
    case 5: cp_async_wait<5>(); break;
    case 6: cp_async_wait<6>(); break;
    default: cp_async_wait<7>(); break;
  }
}

// ---- bulk prefetch of a byte range into L2 (sm_90 copy engine; nothing on older targets) ----
// addr must be 16-byte aligned and bytes a multiple of 16.
__device__ __forceinline__ void prefetch_l2_bulk(const void* addr, uint32_t bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;\n" ::"l"(addr), "r"(bytes) : "memory");
#endif
}

// ---- small loads ----
// fp16 bits -> float through the hardware conversion: exact, so identical to formats.h's
// fp16_to_float (which the CPU uses), but one instruction instead of a dozen.
__device__ __forceinline__ float h2f(uint32_t bits16) {
  return __half2float(__ushort_as_half(static_cast<unsigned short>(bits16 & 0xffffu)));
}
__device__ __forceinline__ uint32_t lds32(const uint8_t* p) { return *reinterpret_cast<const uint32_t*>(p); }

// ---- host side ----
// A device attribute, cached per (device, attribute) since launches ask on every call; 0 on error.
inline int device_attribute(int device, cudaDeviceAttr attr) {
  constexpr int kMaxDevices = 64;
  constexpr int kSlots = 6;
  static const cudaDeviceAttr kCached[kSlots] = {
      cudaDevAttrComputeCapabilityMajor, cudaDevAttrMultiProcessorCount, cudaDevAttrL2CacheSize,
      cudaDevAttrMaxSharedMemoryPerBlockOptin, cudaDevAttrMaxSharedMemoryPerMultiprocessor,
      cudaDevAttrReservedSharedMemoryPerBlock};
  static int cache[kMaxDevices][kSlots] = {};  // 0 = not read yet (an attribute that is 0 is read again)
  int slot = -1;
  for (int i = 0; i < kSlots; ++i) {
    if (kCached[i] == attr) slot = i;
  }
  if (slot >= 0 && device >= 0 && device < kMaxDevices && cache[device][slot] != 0) {
    return cache[device][slot];
  }
  int value = 0;
  if (cudaDeviceGetAttribute(&value, attr, device) != cudaSuccess) {
    (void)cudaGetLastError();  // leave no sticky error behind for the launch check
    return 0;
  }
  if (slot >= 0 && device >= 0 && device < kMaxDevices) cache[device][slot] = value;
  return value;
}

// Raises a kernel's dynamic shared memory limit to `smem` where that is above the default 48 KB and
// above what this call site raised it to before on the current device (`raised`: the call site's
// own record, one entry per device). NotSupported where `smem` is above the device's opt-in maximum.
template <typename Kernel>
cudaError_t allow_smem(Kernel kernel, size_t smem, int (&raised)[64]) {
  if (smem <= 48 * 1024) return cudaSuccess;
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  if (smem > static_cast<size_t>(device_attribute(device, cudaDevAttrMaxSharedMemoryPerBlockOptin))) {
    return cudaErrorNotSupported;
  }
  if (device >= 64 || raised[device] < static_cast<int>(smem)) {
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (err != cudaSuccess) return err;
    if (device < 64) raised[device] = static_cast<int>(smem);
  }
  return cudaSuccess;
}

// An integer knob from the environment (experiments; docs/PERFORMANCE.md lists them), or `fallback`
// when unset or empty.
inline int env_int(const char* name, int fallback) {
  const char* v = std::getenv(name);
  return v != nullptr && *v != '\0' ? std::atoi(v) : fallback;
}

// Whether launches carry the PDL attribute: on for sm_90+, off with GGFUSE_PDL=0 (for comparisons).
inline bool pdl_enabled(int device) {
  static const bool env_on = [] {
    const char* e = std::getenv("GGFUSE_PDL");
    return !(e != nullptr && std::strcmp(e, "0") == 0);
  }();
  if (!env_on) return false;
  return device_attribute(device, cudaDevAttrComputeCapabilityMajor) >= 9;
}

// GGFUSE_SMEM_CARVEOUT=P (0..100, read once; an experiment knob): every ggfuse kernel prefers P% of the
// SM's L1/shared storage as shared memory (cudaFuncAttributePreferredSharedMemoryCarveout); unset:
// the driver's choice. For the question whether kernels whose shared-memory configurations differ
// can co-reside under PDL (docs/PERFORMANCE.md v16).
inline int smem_carveout() {
  static const int percent = env_int("GGFUSE_SMEM_CARVEOUT", -1);
  return percent;
}

// Launches kernel<<<grid, block, smem, stream>>>(args...) with the programmatic-stream-serialization
// attribute when PDL is enabled, in clusters of `cluster` CTAs along x when cluster > 1 (sm_90+;
// grid.x a multiple of it), and returns the launch status.
template <typename... KArgs, typename... Args>
cudaError_t launch_kernel_clustered(int cluster, void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem,
                                    cudaStream_t stream, Args&&... args) {
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  cudaLaunchConfig_t config{};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  cudaLaunchAttribute attr[2];
  int n = 0;
  if (pdl_enabled(device)) {
    attr[n].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[n].val.programmaticStreamSerializationAllowed = 1;
    ++n;
  }
  if (cluster > 1) {
    attr[n].id = cudaLaunchAttributeClusterDimension;
    attr[n].val.clusterDim.x = static_cast<unsigned>(cluster);
    attr[n].val.clusterDim.y = 1;
    attr[n].val.clusterDim.z = 1;
    ++n;
  }
  config.attrs = attr;
  config.numAttrs = n;
  if (smem_carveout() >= 0 && smem_carveout() <= 100) {
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout, smem_carveout());
    if (err != cudaSuccess) return err;
  }
  err = cudaLaunchKernelEx(&config, kernel, static_cast<KArgs>(args)...);
  if (err != cudaSuccess) return err;
  return cudaGetLastError();
}
template <typename... KArgs, typename... Args>
cudaError_t launch_kernel(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                          Args&&... args) {
  return launch_kernel_clustered(1, kernel, grid, block, smem, stream, std::forward<Args>(args)...);
}

}  // namespace cuda
}  // namespace ggfuse

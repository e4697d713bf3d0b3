// What would a norm computed once per layer *inside* the mat-vec launch cost, against today's norm
// kernel + mat-vec kernel? (docs/PERFORMANCE.md, "What limits the remaining gap".) A stand-alone
// probe with the shapes of the B=1 QKV layer (K = 4096, 6144 rows of 2304 bytes, 384 CTAs of 8
// warps, two rows per warp) and simplified arithmetic, timed per layer over a CUDA graph of many
// layers with distinct weights, every launch chained by programmatic dependent launch:
//   matvec     the mat-vec alone (its activations already there): the floor of the other two;
//   norm       the one-CTA norm kernel alone, chained;
//   two        norm kernel, then mat-vec kernel (what ggfuse runs);
//   ggnorm     ggfuse's norm (norm.cuh) in the same chain: bf16 x and a norm weight per layer;
//              -nopf without its L2 prefetch of the weight, -samew with one weight for all layers,
//              -rtk with K a kernel argument (as in the library) instead of a compile-time constant;
//   handoff    one kernel: the first CTA past the PDL wait (an atomic ticket, so it is always a
//              resident one) normalizes x and publishes the activations with a release flag, the
//              others acquire it; the last CTA out resets the ticket, the counter and the flag.
// It also checks that "two" and "handoff" write the same outputs (the flag really orders the reads).
// Build and run on a Hopper GPU:  nvcc -std=c++17 -O3 -arch=sm_90 -Icsrc benchmarks/handoff_probe.cu
//                                 -o /tmp/handoff_probe && /tmp/handoff_probe [layers]
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "cuda/common.cuh"
#include "cuda/dp4a_units.cuh"
#include "cuda/norm.cuh"

namespace {

using ggfuse::cuda::allow_dependent_launch;
using ggfuse::cuda::grid_dependency_wait;
using ggfuse::cuda::launch_kernel;
using ggfuse::Bf16;

constexpr int kK = 4096;            // activations per row
constexpr int kRows = 6144;         // weight rows (Q | K | V)
constexpr int kRowBytes = 2304;     // a Q4_K row of 4096 values
constexpr int kChunks = kRowBytes / 16;
constexpr int kThreads = 256;       // 8 warps, two rows each: 16 rows per CTA
constexpr int kCtaRows = 16;
constexpr int kGrid = kRows / kCtaRows;
constexpr int kActBytes = kK;       // one int8 per activation (a stand-in for the Q8_1 rows)

#define CHECK(x)                                                                          \
  do {                                                                                    \
    cudaError_t e_ = (x);                                                                 \
    if (e_ != cudaSuccess) {                                                              \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_)); \
      std::exit(1);                                                                       \
    }                                                                                     \
  } while (0)

struct Workspace {
  int ticket;
  int done;
  int flag;
};

// The norm of one row of x by one CTA of 256 threads: 16 values per thread, the sum of squares over
// the CTA, then int8 activations (x * rsqrt(mean + eps) * 16, rounded) written to act.
__device__ void norm_cta(const float* __restrict__ x, int8_t* __restrict__ act) {
  __shared__ float warp_sums[kThreads / 32];
  float v[16];
  const float4* x4 = reinterpret_cast<const float4*>(x) + threadIdx.x * 4;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float4 f = x4[i];
    v[4 * i] = f.x, v[4 * i + 1] = f.y, v[4 * i + 2] = f.z, v[4 * i + 3] = f.w;
  }
  float s = 0.0f;
#pragma unroll
  for (int i = 0; i < 16; ++i) s += v[i] * v[i];
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
  if ((threadIdx.x & 31) == 0) warp_sums[threadIdx.x >> 5] = s;
  __syncthreads();
  float total = 0.0f;
#pragma unroll
  for (int i = 0; i < kThreads / 32; ++i) total += warp_sums[i];
  const float scale = 16.0f / sqrtf(total / kK + 1e-6f);
  uint32_t w[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    uint32_t word = 0;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int q = max(-127, min(127, __float2int_rn(v[4 * i + j] * scale)));
      word |= (static_cast<uint32_t>(q) & 0xffu) << (8 * j);
    }
    w[i] = word;
  }
  reinterpret_cast<uint4*>(act)[threadIdx.x] = make_uint4(w[0], w[1], w[2], w[3]);
}

__global__ void __launch_bounds__(kThreads) norm_kernel(const float* x, int8_t* act) {
  allow_dependent_launch();
  grid_dependency_wait();
  norm_cta(x, act);
}

// ggfuse's own norm (norm.cuh, as q8_1.cu's kernel runs it): bf16 x and norm weight, Q8_1 out.
// kRuntimeK: K the kernel argument, as in the library; else the compile-time constant kK.
template <bool kRuntimeK>
__global__ void __launch_bounds__(kThreads) gg_norm_kernel(const Bf16* x, const Bf16* w, bool prefetch,
                                                           int64_t k_arg, uint8_t* out) {
  const int64_t k = kRuntimeK ? k_arg : int64_t{kK};
  __shared__ float warp_sums[ggfuse::cuda::kNormWarps];
  allow_dependent_launch();
  if (prefetch) ggfuse::cuda::prefetch_norm_weight(w, k, threadIdx.x);
  grid_dependency_wait();
  uint32_t* o = reinterpret_cast<uint32_t*>(out);
  ggfuse::cuda::norm_row_q8_1<1>(x, w, k, 1e-6f, true, true, threadIdx.x, 0, 0, 1, warp_sums,
                                 [&](int64_t blk, int j, uint32_t word, uint32_t ds, uint32_t) {
                                   o[9 * blk + 1 + j] = word;
                                   if (j == 0) o[9 * blk] = ds;
                                 },
                                 static_cast<Bf16*>(nullptr));
}

// Weights: read once, past L1 (the dp4a kernel's loads).
__device__ __forceinline__ uint4 ld_weights(const uint8_t* p) { return ggfuse::cuda::dp4a::GlobalLd::ld16(p); }
// Activations written by another CTA of the same grid: read at L2 (never a stale L1 line).
__device__ __forceinline__ uint4 ld_act(const int8_t* p) {
  uint4 v;
  asm volatile("ld.global.cg.v4.u32 {%0,%1,%2,%3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

// kHandoff = false: act is ready when the PDL wait returns. true: this launch's first CTA computes it.
template <bool kHandoff>
__global__ void __launch_bounds__(kThreads) matvec_kernel(const uint8_t* __restrict__ weights, const float* x,
                                                          int8_t* act, Workspace* ws, float* out) {
  __shared__ uint4 s_act[kActBytes / 16];
  __shared__ int s_ticket;
  allow_dependent_launch();
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int row0 = blockIdx.x * kCtaRows + warp * 2;
  // Weights are not written by any kernel here: their first chunk is read before the wait.
  uint4 first = ld_weights(weights + static_cast<size_t>(row0) * kRowBytes + 16 * lane);
  grid_dependency_wait();
  if constexpr (kHandoff) {
    if (threadIdx.x == 0) s_ticket = atomicAdd(&ws->ticket, 1);
    __syncthreads();
    if (s_ticket == 0) {
      norm_cta(x, act);
      __syncthreads();  // every thread's act stores issued
      if (threadIdx.x == 0) {
        __threadfence();
        asm volatile("st.release.gpu.global.b32 [%0], %1;" ::"l"(&ws->flag), "r"(1) : "memory");
      }
    }
    if (threadIdx.x == 0) {
      int f = 0;
      for (;;) {
        asm volatile("ld.acquire.gpu.global.b32 %0, [%1];" : "=r"(f) : "l"(&ws->flag) : "memory");
        if (f != 0) break;
        __nanosleep(32);
      }
    }
    __syncthreads();
  }
  s_act[threadIdx.x] = ld_act(act + 16 * threadIdx.x);
  __syncthreads();
  const uint32_t* xa = reinterpret_cast<const uint32_t*>(s_act);
  for (int r = 0; r < 2; ++r) {
    const uint8_t* row = weights + static_cast<size_t>(row0 + r) * kRowBytes;
    int acc = 0;
    for (int c = lane; c < kChunks; c += 32) {
      const uint4 w = (r == 0 && c == lane) ? first : ld_weights(row + 16 * c);
      const int base = (4 * c) & (kActBytes / 4 - 1);
      acc = __dp4a(static_cast<int>(w.x), static_cast<int>(xa[base]), acc);
      acc = __dp4a(static_cast<int>(w.y), static_cast<int>(xa[base + 1]), acc);
      acc = __dp4a(static_cast<int>(w.z), static_cast<int>(xa[base + 2]), acc);
      acc = __dp4a(static_cast<int>(w.w), static_cast<int>(xa[base + 3]), acc);
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
    if (lane == 0) out[row0 + r] = static_cast<float>(acc);
  }
  if constexpr (kHandoff) {
    __syncthreads();  // this CTA is done with the flag
    if (threadIdx.x == 0 && atomicAdd(&ws->done, 1) == static_cast<int>(gridDim.x) - 1) {
      ws->ticket = 0;  // the last CTA out: the next launch finds a clean workspace (it reads it
      ws->done = 0;    // only after its PDL wait, i.e. after this grid has completed)
      ws->flag = 0;
    }
  }
}

enum Mode { kMatvec, kNorm, kTwo, kHandoffMode, kGgNorm, kGgNormNoPrefetch, kGgNormSameW, kGgNormRuntimeK };
const char* kModeNames[] = {"matvec", "norm", "two", "handoff", "ggnorm", "ggnorm-nopf", "ggnorm-samew",
                            "ggnorm-rtk"};

struct GgNorm {
  const Bf16* x;
  const Bf16* w;  // [layers][K]
  uint8_t* out;
};
GgNorm g_gg{};

void enqueue(Mode m, int layers, const uint8_t* w, const float* x, int8_t* act, Workspace* ws, float* out,
             cudaStream_t s) {
  for (int l = 0; l < layers; ++l) {
    if (m >= kGgNorm) {
      const Bf16* wl = g_gg.w + (m == kGgNormSameW ? 0 : static_cast<size_t>(l) * kK);
      CHECK(launch_kernel(m == kGgNormRuntimeK ? gg_norm_kernel<true> : gg_norm_kernel<false>, dim3(1),
                          dim3(kThreads), 0, s, g_gg.x, wl, m != kGgNormNoPrefetch, int64_t{kK}, g_gg.out));
      continue;
    }
    const uint8_t* wl = w + static_cast<size_t>(l) * kRows * kRowBytes;
    if (m == kNorm || m == kTwo) CHECK(launch_kernel(norm_kernel, dim3(1), dim3(kThreads), 0, s, x, act));
    if (m == kMatvec || m == kTwo) {
      CHECK(launch_kernel(matvec_kernel<false>, dim3(kGrid), dim3(kThreads), 0, s, wl, x, act, ws, out));
    }
    if (m == kHandoffMode) {
      CHECK(launch_kernel(matvec_kernel<true>, dim3(kGrid), dim3(kThreads), 0, s, wl, x, act, ws, out));
    }
  }
}

float time_per_layer(Mode m, int layers, const uint8_t* w, const float* x, int8_t* act, Workspace* ws, float* out,
                     cudaStream_t s) {
  cudaGraph_t g;
  cudaGraphExec_t ge;
  CHECK(cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal));
  enqueue(m, layers, w, x, act, ws, out, s);
  CHECK(cudaStreamEndCapture(s, &g));
  CHECK(cudaGraphInstantiate(&ge, g, 0));
  cudaEvent_t a, b;
  CHECK(cudaEventCreate(&a));
  CHECK(cudaEventCreate(&b));
  std::vector<float> ms;
  for (int rep = 0; rep < 23; ++rep) {
    CHECK(cudaEventRecord(a, s));
    CHECK(cudaGraphLaunch(ge, s));
    CHECK(cudaEventRecord(b, s));
    CHECK(cudaEventSynchronize(b));
    float t = 0;
    CHECK(cudaEventElapsedTime(&t, a, b));
    if (rep >= 3) ms.push_back(t);
  }
  std::sort(ms.begin(), ms.end());
  CHECK(cudaGraphExecDestroy(ge));
  CHECK(cudaGraphDestroy(g));
  return ms[ms.size() / 2] * 1000.0f / layers;
}

}  // namespace

int main(int argc, char** argv) {
  const int layers = argc > 1 ? std::atoi(argv[1]) : 64;
  cudaDeviceProp prop{};
  CHECK(cudaGetDeviceProperties(&prop, 0));
  std::printf("%s, %d layers of %d x %d bytes (%.1f MB each), grid %d x %d threads\n", prop.name, layers, kRows,
              kRowBytes, kRows * kRowBytes / 1e6, kGrid, kThreads);
  uint8_t* w;
  float *x, *out;
  int8_t* act;
  Workspace* ws;
  const size_t wbytes = static_cast<size_t>(layers) * kRows * kRowBytes;
  CHECK(cudaMalloc(&w, wbytes));
  CHECK(cudaMalloc(&x, kK * sizeof(float)));
  CHECK(cudaMalloc(&act, kActBytes));
  CHECK(cudaMalloc(&ws, sizeof(Workspace)));
  CHECK(cudaMalloc(&out, kRows * sizeof(float)));
  CHECK(cudaMemset(w, 0x35, wbytes));
  std::vector<float> hx(kK);
  for (int i = 0; i < kK; ++i) hx[i] = static_cast<float>((i * 7919) % 101 - 50) / 17.0f;
  CHECK(cudaMemcpy(x, hx.data(), kK * sizeof(float), cudaMemcpyHostToDevice));
  CHECK(cudaMemset(ws, 0, sizeof(Workspace)));
  cudaStream_t s;
  CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));

  // Correctness: the handoff path writes what the two kernels write.
  std::vector<float> ref(kRows), got(kRows);
  CHECK(cudaMemset(act, 0, kActBytes));
  CHECK(cudaMemset(out, 0, kRows * sizeof(float)));
  enqueue(kTwo, 1, w, x, act, ws, out, s);
  CHECK(cudaStreamSynchronize(s));
  CHECK(cudaMemcpy(ref.data(), out, kRows * sizeof(float), cudaMemcpyDeviceToHost));
  CHECK(cudaMemset(act, 0, kActBytes));
  CHECK(cudaMemset(out, 0, kRows * sizeof(float)));
  enqueue(kHandoffMode, 3, w, x, act, ws, out, s);
  CHECK(cudaStreamSynchronize(s));
  CHECK(cudaMemcpy(got.data(), out, kRows * sizeof(float), cudaMemcpyDeviceToHost));
  Workspace hws{};
  CHECK(cudaMemcpy(&hws, ws, sizeof(hws), cudaMemcpyDeviceToHost));
  const bool same = ref == got && ref[0] != 0.0f;
  std::printf("handoff output equals two-kernel output: %s; workspace reset: %s\n", same ? "yes" : "NO",
              hws.ticket == 0 && hws.done == 0 && hws.flag == 0 ? "yes" : "NO");

  CHECK(cudaMalloc(&g_gg.x, kK * sizeof(Bf16)));
  CHECK(cudaMalloc(&g_gg.w, static_cast<size_t>(layers) * kK * sizeof(Bf16)));
  CHECK(cudaMalloc(&g_gg.out, kK / 32 * 36));
  CHECK(cudaMemset(const_cast<Bf16*>(g_gg.x), 0x3f, kK * sizeof(Bf16)));
  CHECK(cudaMemset(const_cast<Bf16*>(g_gg.w), 0x3f, static_cast<size_t>(layers) * kK * sizeof(Bf16)));
  for (Mode m : {kMatvec, kNorm, kTwo, kHandoffMode, kGgNorm, kGgNormNoPrefetch, kGgNormSameW, kGgNormRuntimeK}) {
    std::printf("%-8s %7.2f us per layer\n", kModeNames[m], time_per_layer(m, layers, w, x, act, ws, out, s));
  }
  return same ? 0 : 1;
}

// Q8_1 activation quantization and the fused RMSNorm -> Q8_1 pass on CUDA (SPEC §1, §3).
//
// quantize_q8_1: one thread owns one Q8_1 block (32 values); rms_norm_mul_q8_1: 1, 2, 4 or 8 blocks of
// 256 threads per row (norm.cuh). Both sum in the orders the CPU reference uses (formats.h's
// q8_1_block_sum for s, norm.cuh's for the sum of squares), so they write the CPU's bytes, bit for bit.
//
// Every float step that nvcc would contract into an FMA or approximate is spelled with an explicit
// IEEE intrinsic (__fmul_rn, __fadd_rn, __fdiv_rn, __fsqrt_rn), matching the CPU build, which compiles
// with -ffp-contract=off.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common.cuh"
#include "ggfuse/kernels_cuda.h"
#include "norm.cuh"

namespace ggfuse {
namespace cuda {
namespace {

constexpr int kQuantThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kQuantThreads)
    quantize_q8_1_kernel(const T* __restrict__ x, int64_t n_blocks, bool vec, uint8_t* __restrict__ out) {
  allow_dependent_launch();  // see common.cuh: the dependent touches only weights before its wait
  grid_dependency_wait();
  const int64_t blk = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (blk >= n_blocks) return;
  float v[kQK];
  load_block(x + blk * kQK, vec, v);
  quantize_block(v, out + blk * static_cast<int64_t>(sizeof(BlockQ8_1)));
}

// kSubs thread blocks of 256 threads per row (gridDim.y), block (row, sub) quantizing the row's
// rounds r with r % kSubs == sub (norm.cuh has the arithmetic and the order of the sums, shared with
// the norm that mat-vec CTAs run for themselves, so both write the same bytes). A block whose `sub`
// has no round (kSubs rounded up to a power of two past the row's rounds) leaves at once.
template <int kSubs, bool kVec, typename T, typename W>
__global__ void __launch_bounds__(kNormThreads)
    rms_norm_q8_1_kernel(const T* __restrict__ x, const W* __restrict__ w, int64_t k, float eps, bool prefetch_w,
                         uint8_t* __restrict__ out, T* __restrict__ y) {
  __shared__ float warp_sums[kNormWarps];
  allow_dependent_launch();  // see common.cuh: the dependent touches only weights before its wait
  const int sub = kSubs == 1 ? 0 : static_cast<int>(blockIdx.y);
  if (kSubs > 1 && static_cast<int64_t>(sub) * kNormThreads * 4 >= k) return;  // no round of its own
  if (prefetch_w) prefetch_norm_weight(w, k, threadIdx.x, sub, kSubs);  // the rounds it quantizes
  grid_dependency_wait();
  const int64_t row = blockIdx.x;
  uint32_t* orow = reinterpret_cast<uint32_t*>(out + row * (k / kQK) * static_cast<int64_t>(sizeof(BlockQ8_1)));
  norm_row_q8_1<kSubs>(x + row * k, w, k, eps, kVec, kVec, threadIdx.x, sub, 0, 1, warp_sums,
                       [&](int64_t blk, int j, uint32_t word, uint32_t ds, uint32_t) {
                         uint32_t* o = orow + 9 * blk;  // 36-byte blocks: word-aligned
                         o[1 + j] = word;
                         if (j == 0) o[0] = ds;
                       },
                       y != nullptr ? y + row * k : nullptr);
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// Thread blocks per row. A row of R rounds (K / 1024, rounded up) given to R blocks (up to 8) leaves
// each of them one round (or ceil(R / 8)) to quantize instead of R, for a sum of squares that every
// block computes (loads and adds of x, from L2). The count is a template parameter of the kernel, so
// it is R rounded up to a power of two; the blocks past R leave at once. Decode batches (<= 64 rows)
// take that; more rows fill the GPU anyway and keep one block per row. GGFUSE_NORM_SUBS (1 to 8,
// rounded up to a power of two) fixes the number instead (an experiment knob, read once).
constexpr int kNormMaxSubs = 8;
inline int pow2_at_least(int64_t n) {
  int p = 1;
  while (p < n && p < kNormMaxSubs) p *= 2;
  return p;
}
inline int norm_subs(int64_t rows, int64_t k) {
  static const int forced = env_int("GGFUSE_NORM_SUBS", 0);
  if (forced >= 1 && forced <= kNormMaxSubs) return pow2_at_least(forced);
  const int64_t rounds = (k / 4 + kNormThreads - 1) / kNormThreads;
  return rows > 64 ? 1 : pow2_at_least(rounds);
}

template <int kSubs, bool kVec, typename T, typename W>
cudaError_t launch_norm_subs(const void* x, const void* w, int64_t rows, int64_t k, float eps, uint8_t* out,
                             void* y, cudaStream_t stream) {
  return launch_kernel(rms_norm_q8_1_kernel<kSubs, kVec, T, W>, dim3(static_cast<unsigned>(rows), kSubs),
                       dim3(kNormThreads), 0, stream, static_cast<const T*>(x), static_cast<const W*>(w), k, eps,
                       norm_prefetch_enabled(), out, static_cast<T*>(y));
}

// Vector loads (kVec) need x and w on 16-byte boundaries, as torch allocates them; a tensor that is
// not (a view at an odd offset) takes the scalar-load kernel with one block per row, a rare path kept
// out of the common one (a runtime choice between the two load forms made nvcc branch around every
// load).
template <typename T, typename W>
cudaError_t launch_norm(const void* x, const void* w, int64_t rows, int64_t k, float eps,
                        uint8_t* out, void* y, cudaStream_t stream) {
  if (!aligned16(x) || !aligned16(w)) return launch_norm_subs<1, false, T, W>(x, w, rows, k, eps, out, y, stream);
  switch (norm_subs(rows, k)) {
    case 1: return launch_norm_subs<1, true, T, W>(x, w, rows, k, eps, out, y, stream);
    case 2: return launch_norm_subs<2, true, T, W>(x, w, rows, k, eps, out, y, stream);
    case 4: return launch_norm_subs<4, true, T, W>(x, w, rows, k, eps, out, y, stream);
    default: return launch_norm_subs<8, true, T, W>(x, w, rows, k, eps, out, y, stream);
  }
}

template <typename T>
cudaError_t launch_norm_w(const void* x, const void* w, FloatType w_type, int64_t rows, int64_t k,
                          float eps, uint8_t* out, void* y, cudaStream_t stream) {
  switch (w_type) {
    case FloatType::kF32: return launch_norm<T, float>(x, w, rows, k, eps, out, y, stream);
    case FloatType::kF16: return launch_norm<T, Half>(x, w, rows, k, eps, out, y, stream);
    case FloatType::kBF16: return launch_norm<T, Bf16>(x, w, rows, k, eps, out, y, stream);
  }
  return cudaErrorInvalidValue;
}

template <typename T>
cudaError_t launch_quantize(const void* x, int64_t rows, int64_t k, uint8_t* out, cudaStream_t stream) {
  const int64_t n_blocks = rows * (k / kQK);
  const int64_t grid = (n_blocks + kQuantThreads - 1) / kQuantThreads;
  return launch_kernel(quantize_q8_1_kernel<T>, dim3(static_cast<unsigned>(grid)), dim3(kQuantThreads),
                       0, stream, static_cast<const T*>(x), n_blocks, aligned16(x), out);
}

}  // namespace

cudaError_t quantize_q8_1(const void* x, FloatType x_type, int64_t rows, int64_t k, uint8_t* out,
                          cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  switch (x_type) {
    case FloatType::kF32: return launch_quantize<float>(x, rows, k, out, stream);
    case FloatType::kF16: return launch_quantize<Half>(x, rows, k, out, stream);
    case FloatType::kBF16: return launch_quantize<Bf16>(x, rows, k, out, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t rms_norm_mul_q8_1(const void* x, FloatType x_type, const void* w, FloatType w_type,
                              int64_t rows, int64_t k, float eps, uint8_t* out, void* y_out,
                              cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  switch (x_type) {
    case FloatType::kF32: return launch_norm_w<float>(x, w, w_type, rows, k, eps, out, y_out, stream);
    case FloatType::kF16: return launch_norm_w<Half>(x, w, w_type, rows, k, eps, out, y_out, stream);
    case FloatType::kBF16: return launch_norm_w<Bf16>(x, w, w_type, rows, k, eps, out, y_out, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace ggfuse

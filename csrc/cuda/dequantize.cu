// GGUF bytes -> float32 on CUDA, bit-exact with the CPU reference and gguf-py (SPEC §1).
//
// The integer unpacking comes from decode.h (q4_k_quant, ...), shared with the CPU. The float steps
// are written here with explicit IEEE intrinsics instead of calling decode.h's dequant_value: nvcc
// would contract `dsc * q - dmn` into one FMA, which rounds once instead of twice and so differs from
// gguf-py's float32 arithmetic in the last bit.
#include "common.cuh"
#include "ggfuse/decode.h"
#include "ggfuse/kernels_cuda.h"

namespace ggfuse {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kPerThread = 8;  // consecutive values of one block per thread

// fp16 field at any byte address: a uint8 view of GGUF data may start at an odd offset, so two byte
// loads rather than one 2-byte load.
__device__ __forceinline__ float f16_at(const uint8_t* p) {
  return h2f(static_cast<uint32_t>(p[0]) | (static_cast<uint32_t>(p[1]) << 8));
}

template <int32_t kType>
__device__ __forceinline__ float value(const uint8_t* block, int j) {
  if constexpr (kType == kQ4_0) {
    const auto& b = *reinterpret_cast<const BlockQ4_0*>(block);
    return __fmul_rn(f16_at(block), static_cast<float>(q4_0_quant(b, j) - 8));
  } else if constexpr (kType == kQ5_0) {
    const auto& b = *reinterpret_cast<const BlockQ5_0*>(block);
    return __fmul_rn(f16_at(block), static_cast<float>(q5_0_quant(b, j) - 16));
  } else if constexpr (kType == kQ8_0) {
    const auto& b = *reinterpret_cast<const BlockQ8_0*>(block);
    return __fmul_rn(f16_at(block), static_cast<float>(b.qs[j]));
  } else if constexpr (kType == kQ8_1) {
    const auto& b = *reinterpret_cast<const BlockQ8_1*>(block);
    return __fmul_rn(f16_at(block), static_cast<float>(b.qs[j]));
  } else if constexpr (kType == kQ4_K || kType == kQ5_K) {
    using Block = std::conditional_t<kType == kQ4_K, BlockQ4_K, BlockQ5_K>;
    const auto& b = *reinterpret_cast<const Block*>(block);
    int sc, m;
    k_scale_min(b.scales, j >> 5, &sc, &m);
    const float dsc = __fmul_rn(f16_at(block), static_cast<float>(sc));
    const float dmn = __fmul_rn(f16_at(block + 2), static_cast<float>(m));
    int q;
    if constexpr (kType == kQ4_K) q = q4_k_quant(b, j); else q = q5_k_quant(b, j);
    return __fsub_rn(__fmul_rn(dsc, static_cast<float>(q)), dmn);
  } else if constexpr (kType == kQ6_K) {
    const auto& b = *reinterpret_cast<const BlockQ6_K*>(block);
    const float dsc = __fmul_rn(f16_at(block + offsetof(BlockQ6_K, d)), static_cast<float>(b.scales[j >> 4]));
    return __fmul_rn(dsc, static_cast<float>(q6_k_quant(b, j)));
  } else if constexpr (kType == kF32) {
    uint32_t u = 0;
#pragma unroll
    for (int i = 0; i < 4; ++i) u |= static_cast<uint32_t>(block[i]) << (8 * i);
    return __uint_as_float(u);
  } else if constexpr (kType == kF16) {
    return f16_at(block);
  } else {  // kBF16
    return __uint_as_float((static_cast<uint32_t>(block[0]) | (static_cast<uint32_t>(block[1]) << 8)) << 16);
  }
}

// Thread i writes values [8i, 8i + 8) of the flattened output. For quantized types a group of 8
// never straddles a block (blocks hold a multiple of 8 values) nor a row (K is whole blocks). Float
// types are one flat array of elements, whose length need not be a multiple of 8.
template <int32_t kType>
__global__ void __launch_bounds__(kThreads)
    dequantize_kernel(const uint8_t* __restrict__ src, int64_t rows, int64_t k, float* __restrict__ dst) {
  allow_dependent_launch();  // see common.cuh: the dependent touches only weights before its wait
  grid_dependency_wait();
  constexpr bool kFloat = kType == kF32 || kType == kF16 || kType == kBF16;
  constexpr int qk = kFloat ? 1 : (kType == kQ4_K || kType == kQ5_K || kType == kQ6_K ? kQK_K : kQK);
  constexpr int bb = kType == kF32 ? 4 : kFloat ? 2
                   : kType == kQ4_0 ? 18 : kType == kQ5_0 ? 22 : kType == kQ8_0 ? 34
                   : kType == kQ8_1 ? 36 : kType == kQ4_K ? 144 : kType == kQ5_K ? 176 : 210;
  const int64_t total = rows * k;
  const int64_t first = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * kPerThread;
  if (first >= total) return;
  float v[kPerThread];
  if constexpr (kFloat) {
    if (first + kPerThread > total) {  // the ragged end of a float array
      for (int64_t i = first; i < total; ++i) dst[i] = value<kType>(src + i * bb, 0);
      return;
    }
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) v[i] = value<kType>(src + (first + i) * bb, 0);
  } else {
    const int64_t row = first / k;
    const int64_t col = first - row * k;
    const uint8_t* block = src + row * (k / qk) * bb + (col / qk) * bb;
    const int j0 = static_cast<int>(col % qk);
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) v[i] = value<kType>(block, j0 + i);
  }
  float4* o = reinterpret_cast<float4*>(dst + first);  // dst is a fresh tensor, first % 8 == 0
  o[0] = make_float4(v[0], v[1], v[2], v[3]);
  o[1] = make_float4(v[4], v[5], v[6], v[7]);
}

template <int32_t kType>
cudaError_t launch(const uint8_t* src, int64_t rows, int64_t k, float* dst, cudaStream_t stream) {
  const int64_t groups = (rows * k + kPerThread - 1) / kPerThread;
  const int64_t grid = (groups + kThreads - 1) / kThreads;
  return launch_kernel(dequantize_kernel<kType>, dim3(static_cast<unsigned>(grid)), dim3(kThreads), 0,
                       stream, src, rows, k, dst);
}

}  // namespace

cudaError_t dequantize(int32_t type, const uint8_t* src, int64_t rows, int64_t k, float* dst,
                       cudaStream_t stream) {
  if (rows == 0 || k == 0) return cudaSuccess;
  switch (type) {
    case kF32: return launch<kF32>(src, rows, k, dst, stream);
    case kF16: return launch<kF16>(src, rows, k, dst, stream);
    case kBF16: return launch<kBF16>(src, rows, k, dst, stream);
    case kQ4_0: return launch<kQ4_0>(src, rows, k, dst, stream);
    case kQ5_0: return launch<kQ5_0>(src, rows, k, dst, stream);
    case kQ8_0: return launch<kQ8_0>(src, rows, k, dst, stream);
    case kQ8_1: return launch<kQ8_1>(src, rows, k, dst, stream);
    case kQ4_K: return launch<kQ4_K>(src, rows, k, dst, stream);
    case kQ5_K: return launch<kQ5_K>(src, rows, k, dst, stream);
    case kQ6_K: return launch<kQ6_K>(src, rows, k, dst, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace cuda
}  // namespace ggfuse

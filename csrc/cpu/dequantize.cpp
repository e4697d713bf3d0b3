// GGUF bytes -> float32, CPU. Uses the same per-value decoder as the CUDA kernel (decode.h).
#include "ggfuse/decode.h"
#include "ggfuse/kernels_cpu.h"

namespace ggfuse {
namespace cpu {

void dequantize_rows(int32_t type, const uint8_t* src, int64_t k, int64_t row_begin,
                     int64_t row_end, float* dst) {
  const int qk = block_values(type);
  const int bb = block_bytes(type);
  const int64_t rb = row_bytes(type, k);
  for (int64_t r = row_begin; r < row_end; ++r) {
    const uint8_t* row = src + r * rb;
    float* out = dst + r * k;
    for (int64_t b = 0; b < k / qk; ++b) {
      const uint8_t* block = row + b * bb;
      for (int j = 0; j < qk; ++j) out[b * qk + j] = dequant_value(type, block, j);
    }
  }
}

}  // namespace cpu
}  // namespace ggfuse

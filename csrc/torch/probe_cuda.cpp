// ggfuse::_read_probe(Tensor buf) -> Tensor: the benchmark's memory read-bandwidth probe (SPEC §6,
// python/ggfuse/bench.py). It reads every byte of buf once and returns, as an int64 tensor [1] on
// buf's device, the XOR of buf's little-endian 32-bit words (0 .. 2^32 - 1), a result that depends on
// every byte so the read cannot be skipped and can be checked against the CPU.
//
// buf: a contiguous integer tensor (any shape) whose byte count is a multiple of 4 and whose data
// starts at a 16-byte aligned address (the CUDA kernel reads it with 16-byte loads); both devices
// accept the same inputs. The CPU implementation always builds; the CUDA one with GGFUSE_WITH_CUDA.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdint>

#ifdef GGFUSE_WITH_CUDA
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "ggfuse/read_probe.h"
#endif

namespace ggfuse {
namespace ops {
namespace {

constexpr const char* kOp = "_read_probe";

// Validates buf and returns its byte count.
int64_t check_probe_buffer(const at::Tensor& buf) {
  TORCH_CHECK_TYPE(at::isIntegralType(buf.scalar_type(), /*includeBool=*/false), "ggfuse.", kOp,
                   ": buf must be an integer tensor (uint8, int8, int16, int32 or int64), got ",
                   buf.scalar_type());
  TORCH_CHECK_VALUE(buf.is_contiguous(), "ggfuse.", kOp,
                    ": buf must be contiguous (call .contiguous() first)");
  const int64_t n_bytes = static_cast<int64_t>(buf.nbytes());
  TORCH_CHECK_VALUE(n_bytes % 4 == 0, "ggfuse.", kOp,
                    ": buf is read as 32-bit words, so its byte count must be a multiple of 4, got ",
                    n_bytes, " bytes");
  TORCH_CHECK_VALUE(reinterpret_cast<uintptr_t>(buf.const_data_ptr()) % 16 == 0, "ggfuse.", kOp,
                    ": buf must start at a 16-byte aligned address (a fresh tensor does; a sliced "
                    "view may not)");
  return n_bytes;
}

at::Tensor read_probe_cpu(const at::Tensor& buf) {
  const int64_t n_bytes = check_probe_buffer(buf);
  const uint8_t* p = static_cast<const uint8_t*>(buf.const_data_ptr());
  uint32_t acc = 0;
  for (int64_t i = 0; i < n_bytes; i += 4) {
    acc ^= static_cast<uint32_t>(p[i]) | static_cast<uint32_t>(p[i + 1]) << 8 |
           static_cast<uint32_t>(p[i + 2]) << 16 | static_cast<uint32_t>(p[i + 3]) << 24;
  }
  at::Tensor out = at::empty({1}, buf.options().dtype(at::kLong));
  out.mutable_data_ptr<int64_t>()[0] = static_cast<int64_t>(acc);
  return out;
}

#ifdef GGFUSE_WITH_CUDA
// Launches on torch's current stream of buf's device; no host synchronization (graph-capturable).
at::Tensor read_probe_cuda(const at::Tensor& buf) {
  TORCH_CHECK(buf.is_cuda(), "ggfuse.", kOp, ": buf must be on a CUDA device, got ", buf.device());
  const int64_t n_bytes = check_probe_buffer(buf);
  const c10::cuda::CUDAGuard guard(buf.device());
  // The kernel XORs into the low 32-bit word (little-endian) of a zeroed int64.
  at::Tensor out = at::zeros({1}, buf.options().dtype(at::kLong));
  C10_CUDA_CHECK(cuda::read_probe(static_cast<const uint8_t*>(buf.const_data_ptr()), n_bytes,
                                  reinterpret_cast<uint32_t*>(out.mutable_data_ptr<int64_t>()),
                                  /*grid=*/0,
                                  c10::cuda::getCurrentCUDAStream(buf.device().index()).stream()));
  return out;
}
#endif

}  // namespace
}  // namespace ops
}  // namespace ggfuse

TORCH_LIBRARY_FRAGMENT(ggfuse, m) {
  m.def("_read_probe(Tensor buf) -> Tensor");
}

TORCH_LIBRARY_IMPL(ggfuse, CPU, m) {
  m.impl("_read_probe", &ggfuse::ops::read_probe_cpu);
}

#ifdef GGFUSE_WITH_CUDA
TORCH_LIBRARY_IMPL(ggfuse, CUDA, m) {
  m.impl("_read_probe", &ggfuse::ops::read_probe_cuda);
}
#endif

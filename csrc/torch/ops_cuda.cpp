// CUDA implementations of the ggfuse ops: validate with the checks shared with the CPU (checks.h),
// make the input's device current, allocate through torch, launch on torch's current stream of that
// device, and turn a launch failure into an exception. No host synchronization anywhere, so every op
// can be captured in a CUDA graph. `quantize` stays CPU-only (it runs once, at load time).
//
// Only c10/cuda headers are used (no ATen/cuda/CUDAContext.h), which keeps cuBLAS headers out.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "ggfuse/kernels_cuda.h"
#include "torch/checks.h"

namespace ggfuse {
namespace ops {
namespace {

cudaStream_t stream_of(const at::Tensor& t) {
  return c10::cuda::getCurrentCUDAStream(t.device().index()).stream();
}

at::Tensor quantize_q8_1_cuda(const at::Tensor& x) {
  const int64_t k = check_activation(x, "quantize_q8_1");
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = empty_q8_1_like(x);
  const int64_t rows = x.numel() / k;
  C10_CUDA_CHECK(cuda::quantize_q8_1(x.const_data_ptr(), float_type(x, "quantize_q8_1", "x"), rows, k,
                                     out.mutable_data_ptr<uint8_t>(), stream_of(x)));
  return out;
}

void rms_norm_cuda_into(const at::Tensor& x, const at::Tensor& w, double eps, at::Tensor& out,
                        at::Tensor* y) {
  const int64_t k = x.size(-1);
  C10_CUDA_CHECK(cuda::rms_norm_mul_q8_1(
      x.const_data_ptr(), float_type(x, "rms_norm_mul_q8_1", "x"), w.const_data_ptr(),
      float_type(w, "rms_norm_mul_q8_1", "weight"), x.numel() / k, k, static_cast<float>(eps),
      out.mutable_data_ptr<uint8_t>(), y != nullptr ? y->mutable_data_ptr() : nullptr, stream_of(x)));
}

at::Tensor rms_norm_mul_q8_1_cuda(const at::Tensor& x, const at::Tensor& w, double eps) {
  check_activation(x, "rms_norm_mul_q8_1");
  check_norm_weight(x, w, eps, "rms_norm_mul_q8_1");
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = empty_q8_1_like(x);
  rms_norm_cuda_into(x, w, eps, out, nullptr);
  return out;
}

std::tuple<at::Tensor, at::Tensor> rms_norm_mul_q8_1_float_cuda(const at::Tensor& x,
                                                                const at::Tensor& w, double eps) {
  check_activation(x, "rms_norm_mul_q8_1");
  check_norm_weight(x, w, eps, "rms_norm_mul_q8_1");
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = empty_q8_1_like(x);
  at::Tensor y = at::empty_like(x);
  rms_norm_cuda_into(x, w, eps, out, &y);
  return {out, y};
}

at::Tensor dequantize_cuda(const at::Tensor& w, int64_t qtype) {
  const int64_t k = check_gguf_rows(w, qtype, "dequantize");
  const c10::cuda::CUDAGuard guard(w.device());
  std::vector<int64_t> shape = w.sizes().vec();
  shape.back() = k;
  at::Tensor out = at::empty(shape, w.options().dtype(at::kFloat));
  const int64_t rows = w.numel() / w.size(-1);
  C10_CUDA_CHECK(cuda::dequantize(static_cast<int32_t>(qtype), w.const_data_ptr<uint8_t>(), rows, k,
                                  out.mutable_data_ptr<float>(), stream_of(w)));
  return out;
}

at::Tensor mat_vec_q8_1_cuda(const at::Tensor& x_q8, const at::Tensor& weight, at::IntArrayRef qtypes,
                             at::IntArrayRef rows, at::IntArrayRef offsets) {
  const FusedLayout layout = check_mat_vec(x_q8, weight, qtypes, rows, offsets);
  const c10::cuda::CUDAGuard guard(x_q8.device());
  at::Tensor out = at::empty({layout.batch, layout.n_out}, x_q8.options().dtype(at::kFloat));
  if (layout.batch == 0) return out;
  const uint8_t* wp = weight.const_data_ptr<uint8_t>();
  const uint8_t* xp = x_q8.const_data_ptr<uint8_t>();
  float* op = out.mutable_data_ptr<float>();
  const cudaStream_t stream = stream_of(x_q8);
  // A launch takes up to kMaxSegments segments (its table travels by value as a kernel parameter);
  // longer lists become several launches, each writing its own columns of the same output.
  const size_t n_seg = layout.segments.size();
  for (size_t first = 0; first < n_seg; first += kMaxSegments) {
    SegmentTable table{};
    table.count = static_cast<int32_t>(std::min<size_t>(kMaxSegments, n_seg - first));
    table.total_rows = 0;
    for (int32_t i = 0; i < table.count; ++i) {
      table.seg[i] = layout.segments[first + i];
      table.total_rows += table.seg[i].rows;
    }
    C10_CUDA_CHECK(cuda::mat_vec_q8_1(wp, weight.numel(), table, layout.k, xp, layout.batch, op, layout.n_out,
                                      stream));
  }
  return out;
}

// The decode hot path: norm -> Q8_1 -> fused mat-vec, one dispatch. By default the norm kernel writes
// the Q8_1 rows and the mat-vec (chained to it by PDL) reads them. Opt-in, for up to 8 rows, one
// kernel per (up to 16) segments does both, every CTA normalizing x itself: the streaming kernel on
// sm_90 with GGFUSE_MV_STREAM=N, or the MMA kernel with GGFUSE_FUSED_NORM=1 (both measured slower,
// as did the dp4a kernel doing it: docs/PERFORMANCE.md v10); cuda::rms_norm_mat_vec_q8_1 declines
// (NotSupported) when neither applies or x does not fit.
at::Tensor rms_norm_mat_vec_q8_1_cuda(const at::Tensor& x, const at::Tensor& norm_weight, double eps,
                                      const at::Tensor& weight, at::IntArrayRef qtypes,
                                      at::IntArrayRef rows, at::IntArrayRef offsets) {
  const char* op = "rms_norm_mat_vec_q8_1";
  const int64_t k = check_activation(x, op);
  check_norm_weight(x, norm_weight, eps, op);
  const c10::cuda::CUDAGuard guard(x.device());
  // The Q8_1 rows the two-kernel path writes; also what check_mat_vec validates the weight against.
  at::Tensor x_q8 = empty_q8_1_like(x.reshape({-1, k}));
  const FusedLayout layout = check_mat_vec(x_q8, weight, qtypes, rows, offsets);
  std::vector<int64_t> shape = x.sizes().vec();
  shape.back() = layout.n_out;
  at::Tensor out = at::empty(shape, x.options().dtype(at::kFloat));
  if (layout.batch == 0) return out;
  const FloatType xt = float_type(x, op, "x"), wt = float_type(norm_weight, op, "weight");
  const uint8_t* wp = weight.const_data_ptr<uint8_t>();
  float* op_out = out.mutable_data_ptr<float>();
  const cudaStream_t stream = stream_of(x);
  bool have_q8 = false;  // x_q8 written (the two-kernel path was needed for some segments)
  const size_t n_seg = layout.segments.size();
  for (size_t first = 0; first < n_seg; first += kMaxSegments) {
    SegmentTable table{};
    table.count = static_cast<int32_t>(std::min<size_t>(kMaxSegments, n_seg - first));
    for (int32_t i = 0; i < table.count; ++i) {
      table.seg[i] = layout.segments[first + i];
      table.total_rows += table.seg[i].rows;
    }
    if (!have_q8) {
      const cudaError_t err = cuda::rms_norm_mat_vec_q8_1(
          x.const_data_ptr(), xt, norm_weight.const_data_ptr(), wt, static_cast<float>(eps), wp,
          weight.numel(), table, layout.k, layout.batch, op_out, layout.n_out, stream);
      if (err != cudaErrorNotSupported) {
        C10_CUDA_CHECK(err);
        continue;
      }
      C10_CUDA_CHECK(cuda::rms_norm_mul_q8_1(x.const_data_ptr(), xt, norm_weight.const_data_ptr(), wt,
                                             layout.batch, layout.k, static_cast<float>(eps),
                                             x_q8.mutable_data_ptr<uint8_t>(), nullptr, stream));
      have_q8 = true;
    }
    C10_CUDA_CHECK(cuda::mat_vec_q8_1(wp, weight.numel(), table, layout.k, x_q8.const_data_ptr<uint8_t>(),
                                      layout.batch, op_out, layout.n_out, stream));
  }
  return out;
}

}  // namespace
}  // namespace ops
}  // namespace ggfuse

TORCH_LIBRARY_IMPL(ggfuse, CUDA, m) {
  using namespace ggfuse::ops;
  m.impl("quantize_q8_1", &quantize_q8_1_cuda);
  m.impl("rms_norm_mul_q8_1", &rms_norm_mul_q8_1_cuda);
  m.impl("rms_norm_mul_q8_1_float", &rms_norm_mul_q8_1_float_cuda);
  m.impl("dequantize", &dequantize_cuda);
  m.impl("mat_vec_q8_1", &mat_vec_q8_1_cuda);
  m.impl("rms_norm_mat_vec_q8_1", &rms_norm_mat_vec_q8_1_cuda);
}

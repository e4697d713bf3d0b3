// The ggfuse operator library: schemas (one TORCH_LIBRARY) and the CPU implementations.
// Kernels live in csrc/cpu (torch-free); this layer validates, allocates and splits rows over torch's
// intra-op thread pool. The CUDA implementations are registered in ops_cuda.cpp.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "ggfuse/kernels_cpu.h"
#include "torch/checks.h"

namespace ggfuse {
namespace ops {
namespace {

// Rows per task for at::parallel_for, sized so one task does roughly `work_per_task` element steps.
int64_t grain_for(int64_t work_per_row) {
  constexpr int64_t kWorkPerTask = 1 << 16;
  return std::max<int64_t>(1, kWorkPerTask / std::max<int64_t>(1, work_per_row));
}

at::Tensor quantize_q8_1_cpu(const at::Tensor& x) {
  const int64_t k = check_activation(x, "quantize_q8_1");
  at::Tensor out = empty_q8_1_like(x);
  const int64_t rows = x.numel() / k;
  const FloatType xt = float_type(x, "quantize_q8_1", "x");
  const void* xp = x.const_data_ptr();
  uint8_t* op = out.mutable_data_ptr<uint8_t>();
  at::parallel_for(0, rows, grain_for(k), [&](int64_t begin, int64_t end) {
    cpu::quantize_q8_1_rows(xp, xt, k, begin, end, op);
  });
  return out;
}

void rms_norm_into(const at::Tensor& x, const at::Tensor& w, double eps, at::Tensor& out,
                   at::Tensor* y) {
  const int64_t k = x.size(-1);
  const int64_t rows = x.numel() / k;
  const FloatType xt = float_type(x, "rms_norm_mul_q8_1", "x");
  const FloatType wt = float_type(w, "rms_norm_mul_q8_1", "weight");
  const void* xp = x.const_data_ptr();
  const void* wp = w.const_data_ptr();
  uint8_t* op = out.mutable_data_ptr<uint8_t>();
  void* yp = y != nullptr ? y->mutable_data_ptr() : nullptr;
  const float feps = static_cast<float>(eps);
  at::parallel_for(0, rows, grain_for(2 * k), [&](int64_t begin, int64_t end) {
    cpu::rms_norm_mul_q8_1_rows(xp, xt, wp, wt, k, feps, begin, end, op, yp);
  });
}

at::Tensor rms_norm_mul_q8_1_cpu(const at::Tensor& x, const at::Tensor& w, double eps) {
  check_activation(x, "rms_norm_mul_q8_1");
  check_norm_weight(x, w, eps, "rms_norm_mul_q8_1");
  at::Tensor out = empty_q8_1_like(x);
  rms_norm_into(x, w, eps, out, nullptr);
  return out;
}

std::tuple<at::Tensor, at::Tensor> rms_norm_mul_q8_1_float_cpu(const at::Tensor& x,
                                                               const at::Tensor& w, double eps) {
  check_activation(x, "rms_norm_mul_q8_1");
  check_norm_weight(x, w, eps, "rms_norm_mul_q8_1");
  at::Tensor out = empty_q8_1_like(x);
  at::Tensor y = at::empty_like(x);
  rms_norm_into(x, w, eps, out, &y);
  return {out, y};
}

at::Tensor dequantize_cpu(const at::Tensor& w, int64_t qtype) {
  const int64_t k = check_gguf_rows(w, qtype, "dequantize");
  std::vector<int64_t> shape = w.sizes().vec();
  shape.back() = k;
  at::Tensor out = at::empty(shape, w.options().dtype(at::kFloat));
  const int64_t rows = w.numel() / w.size(-1);
  const uint8_t* src = w.const_data_ptr<uint8_t>();
  float* dst = out.mutable_data_ptr<float>();
  const int32_t t = static_cast<int32_t>(qtype);
  at::parallel_for(0, rows, grain_for(k), [&](int64_t begin, int64_t end) {
    cpu::dequantize_rows(t, src, k, begin, end, dst);
  });
  return out;
}

at::Tensor quantize_cpu(const at::Tensor& x, int64_t qtype) {
  const char* op = "quantize";
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat, "ggfuse.quantize: x must be float32, got ",
                   x.scalar_type());
  check_contiguous(x, op, "x");
  const int32_t t = static_cast<int32_t>(qtype);
  TORCH_CHECK_NOT_IMPLEMENTED(t == qtype && cpu::is_quantize_type(t), "ggfuse.quantize: ",
                              qtype_label(qtype),
                              " is not supported (Q4_0, Q8_0, Q4_K, Q6_K are)");
  TORCH_CHECK_VALUE(x.dim() >= 1, "ggfuse.quantize: x must have at least one dimension");
  const int64_t k = x.size(-1);
  TORCH_CHECK_VALUE(k > 0 && k % block_values(t) == 0, "ggfuse.quantize: ", qtype_label(qtype),
                    " quantizes rows whose length is a multiple of ", block_values(t),
                    ", but the last dimension of x is ", k);
  std::vector<int64_t> shape = x.sizes().vec();
  shape.back() = row_bytes(t, k);
  at::Tensor out = at::empty(shape, x.options().dtype(at::kByte));
  const int64_t rows = x.numel() / k;
  const float* src = x.const_data_ptr<float>();
  uint8_t* dst = out.mutable_data_ptr<uint8_t>();
  at::parallel_for(0, rows, grain_for(16 * k), [&](int64_t begin, int64_t end) {
    cpu::quantize_rows(t, src, k, begin, end, dst);
  });
  return out;
}

at::Tensor mat_vec_q8_1_cpu(const at::Tensor& x_q8, const at::Tensor& weight, at::IntArrayRef qtypes,
                            at::IntArrayRef rows, at::IntArrayRef offsets) {
  const FusedLayout layout = check_mat_vec(x_q8, weight, qtypes, rows, offsets);
  at::Tensor out = at::empty({layout.batch, layout.n_out}, x_q8.options().dtype(at::kFloat));
  if (layout.batch == 0) return out;
  const uint8_t* wp = weight.const_data_ptr<uint8_t>();
  const uint8_t* xp = x_q8.const_data_ptr<uint8_t>();
  float* op = out.mutable_data_ptr<float>();
  for (const Segment& seg : layout.segments) {
    at::parallel_for(0, seg.rows, grain_for(layout.k * layout.batch), [&](int64_t begin, int64_t end) {
      cpu::mat_vec_q8_1_rows(wp, seg, layout.k, xp, layout.batch, begin, end, op, layout.n_out);
    });
  }
  return out;
}

// rms_norm_mul_q8_1 then mat_vec_q8_1 in one op (the CUDA implementation fuses them into one kernel);
// x [..., K] -> out [..., sum(rows)].
at::Tensor rms_norm_mat_vec_q8_1_cpu(const at::Tensor& x, const at::Tensor& norm_weight, double eps,
                                     const at::Tensor& weight, at::IntArrayRef qtypes,
                                     at::IntArrayRef rows, at::IntArrayRef offsets) {
  const at::Tensor x_q8 = rms_norm_mul_q8_1_cpu(x, norm_weight, eps);
  const at::Tensor out = mat_vec_q8_1_cpu(x_q8.reshape({-1, x_q8.size(-1)}), weight, qtypes, rows, offsets);
  std::vector<int64_t> shape = x.sizes().vec();
  shape.back() = out.size(1);
  return out.reshape(shape);
}

}  // namespace
}  // namespace ops
}  // namespace ggfuse

TORCH_LIBRARY(ggfuse, m) {
  m.def("quantize_q8_1(Tensor x) -> Tensor");
  m.def("rms_norm_mul_q8_1(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("rms_norm_mul_q8_1_float(Tensor x, Tensor weight, float eps) -> (Tensor, Tensor)");
  m.def("dequantize(Tensor w, int qtype) -> Tensor");
  m.def("quantize(Tensor x, int qtype) -> Tensor");
  m.def("mat_vec_q8_1(Tensor x_q8, Tensor weight, int[] qtypes, int[] rows, int[] offsets) -> Tensor");
  m.def("rms_norm_mat_vec_q8_1(Tensor x, Tensor norm_weight, float eps, Tensor weight, int[] qtypes, "
        "int[] rows, int[] offsets) -> Tensor");
}

TORCH_LIBRARY_IMPL(ggfuse, CPU, m) {
  using namespace ggfuse::ops;
  m.impl("quantize_q8_1", &quantize_q8_1_cpu);
  m.impl("rms_norm_mul_q8_1", &rms_norm_mul_q8_1_cpu);
  m.impl("rms_norm_mul_q8_1_float", &rms_norm_mul_q8_1_float_cpu);
  m.impl("dequantize", &dequantize_cpu);
  m.impl("quantize", &quantize_cpu);
  m.impl("mat_vec_q8_1", &mat_vec_q8_1_cpu);
  m.impl("rms_norm_mat_vec_q8_1", &rms_norm_mat_vec_q8_1_cpu);
}

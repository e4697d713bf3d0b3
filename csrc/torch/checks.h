// Input validation and output allocation shared by the CPU and CUDA registrations of each op, so both
// devices accept exactly the same inputs and raise the same errors:
//   TypeError (dtype), ValueError (shape, size, value), NotImplementedError (GGML type), RuntimeError
//   (device).
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <vector>

#include "ggfuse/formats.h"
#include "ggfuse/kernels_cpu.h"

namespace ggfuse {
namespace ops {

inline FloatType float_type(const at::Tensor& t, const char* op, const char* arg) {
  switch (t.scalar_type()) {
    case at::kFloat: return FloatType::kF32;
    case at::kHalf: return FloatType::kF16;
    case at::kBFloat16: return FloatType::kBF16;
    default:
      TORCH_CHECK_TYPE(false, "ggfuse.", op, ": ", arg, " must be float32, float16 or bfloat16, got ",
                       t.scalar_type());
  }
}

inline void check_contiguous(const at::Tensor& t, const char* op, const char* arg) {
  TORCH_CHECK_VALUE(t.is_contiguous(), "ggfuse.", op, ": ", arg,
                    " must be contiguous (call .contiguous() first)");
}

inline void check_same_device(const at::Tensor& a, const at::Tensor& b, const char* op,
                              const char* a_name, const char* b_name) {
  TORCH_CHECK(a.device() == b.device(), "ggfuse.", op, ": ", a_name, " is on ", a.device(), " but ",
              b_name, " is on ", b.device());
}

inline void check_uint8(const at::Tensor& t, const char* op, const char* arg) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kByte, "ggfuse.", op, ": ", arg,
                   " must be a uint8 tensor of GGUF bytes, got ", t.scalar_type());
}

// x [..., K] float -> (rows, K); the Q8_1 output is [..., K/32*36] uint8.
inline int64_t check_activation(const at::Tensor& x, const char* op) {
  float_type(x, op, "x");
  check_contiguous(x, op, "x");
  TORCH_CHECK_VALUE(x.dim() >= 1, "ggfuse.", op, ": x must have at least one dimension");
  const int64_t k = x.size(-1);
  TORCH_CHECK_VALUE(k > 0 && k % kQK == 0, "ggfuse.", op, ": the last dimension of x (K = ", k,
                    ") must be a positive multiple of 32, the Q8_1 block size");
  return k;
}

inline at::Tensor empty_q8_1_like(const at::Tensor& x) {
  std::vector<int64_t> shape = x.sizes().vec();
  shape.back() = shape.back() / kQK * static_cast<int64_t>(sizeof(BlockQ8_1));
  return at::empty(shape, x.options().dtype(at::kByte));
}

inline void check_norm_weight(const at::Tensor& x, const at::Tensor& w, double eps, const char* op) {
  float_type(w, op, "weight");
  check_contiguous(w, op, "weight");
  check_same_device(x, w, op, "x", "weight");
  TORCH_CHECK_VALUE(w.dim() == 1 && w.size(0) == x.size(-1), "ggfuse.", op,
                    ": weight must be 1-D with K = ", x.size(-1), " elements, got shape ", w.sizes());
  // The CUDA norm indexes within a row in 32 bits (norm.cuh); the limit holds on every device so that
  // a model behaves the same on CPU and GPU.
  TORCH_CHECK_VALUE(x.size(-1) < (int64_t{1} << 31), "ggfuse.", op, ": K = ", x.size(-1),
                    " is too long for one norm row (at most 2^31 - 1 values)");
  TORCH_CHECK_VALUE(eps >= 0.0 && std::isfinite(eps), "ggfuse.", op,
                    ": eps must be finite and >= 0, got ", eps);
}

inline std::string qtype_label(int64_t qtype) {
  return std::string(type_name(static_cast<int32_t>(qtype))) + " (GGML type " +
         std::to_string(qtype) + ")";
}

// w [..., row_bytes] uint8 of `qtype` -> K (values per row).
inline int64_t check_gguf_rows(const at::Tensor& w, int64_t qtype, const char* op) {
  check_uint8(w, op, "w");
  check_contiguous(w, op, "w");
  TORCH_CHECK_VALUE(w.dim() >= 1, "ggfuse.", op, ": w must have at least one dimension (rows of bytes)");
  const int32_t t = static_cast<int32_t>(qtype);
  TORCH_CHECK_NOT_IMPLEMENTED(qtype == t && block_values(t) != 0, "ggfuse.", op,
                              ": ", qtype_label(qtype),
                              " is not supported (F32, F16, BF16, Q4_0, Q5_0, Q8_0, Q8_1, Q4_K, Q5_K, Q6_K are)");
  const int64_t nbytes = w.size(-1);
  TORCH_CHECK_VALUE(nbytes > 0 && nbytes % block_bytes(t) == 0, "ggfuse.", op, ": rows of ",
                    qtype_label(qtype), " are whole blocks of ", block_bytes(t),
                    " bytes, but the last dimension of w is ", nbytes);
  return nbytes / block_bytes(t) * block_values(t);
}

// The validated segment list of a fused weight.
struct FusedLayout {
  std::vector<Segment> segments;
  int64_t k = 0;       // input features
  int64_t batch = 0;   // rows of x_q8
  int64_t n_out = 0;   // sum of segment rows
};

inline FusedLayout check_mat_vec(const at::Tensor& x_q8, const at::Tensor& weight,
                                 at::IntArrayRef qtypes, at::IntArrayRef rows,
                                 at::IntArrayRef offsets) {
  const char* op = "mat_vec_q8_1";
  check_uint8(x_q8, op, "x_q8");
  check_uint8(weight, op, "weight");
  check_contiguous(x_q8, op, "x_q8");
  check_contiguous(weight, op, "weight");
  check_same_device(x_q8, weight, op, "x_q8", "weight");
  TORCH_CHECK_VALUE(x_q8.dim() == 2, "ggfuse.", op,
                    ": x_q8 must be 2-D [B, K/32*36] (Q8_1 rows), got shape ", x_q8.sizes());
  TORCH_CHECK_VALUE(weight.dim() == 1, "ggfuse.", op,
                    ": weight must be the 1-D byte buffer of a fused weight, got shape ",
                    weight.sizes());
  // The kernels read weights in 16-byte and activations in 4-byte pieces; every block size of these
  // formats is even, so aligned segment starts keep every block's fp16 fields aligned too.
  TORCH_CHECK_VALUE(reinterpret_cast<uintptr_t>(weight.data_ptr()) % kSegmentAlign == 0, "ggfuse.",
                    op, ": the weight buffer must start at a ", kSegmentAlign,
                    "-byte aligned address (a fresh tensor does; a sliced view may not)");
  TORCH_CHECK_VALUE(reinterpret_cast<uintptr_t>(x_q8.data_ptr()) % 4 == 0, "ggfuse.", op,
                    ": x_q8 must start at a 4-byte aligned address");
  const int64_t xb = x_q8.size(1);
  TORCH_CHECK_VALUE(xb > 0 && xb % static_cast<int64_t>(sizeof(BlockQ8_1)) == 0, "ggfuse.", op,
                    ": x_q8 rows must be whole 36-byte Q8_1 blocks, got ", xb, " bytes");
  FusedLayout layout;
  layout.k = xb / static_cast<int64_t>(sizeof(BlockQ8_1)) * kQK;
  layout.batch = x_q8.size(0);
  TORCH_CHECK_VALUE(!qtypes.empty() && qtypes.size() == rows.size() && rows.size() == offsets.size(),
                    "ggfuse.", op, ": qtypes, rows and offsets must be non-empty lists of equal "
                    "length, got ", qtypes.size(), ", ", rows.size(), ", ", offsets.size());
  for (size_t i = 0; i < qtypes.size(); ++i) {
    const int32_t t = static_cast<int32_t>(qtypes[i]);
    TORCH_CHECK_NOT_IMPLEMENTED(t == qtypes[i] && is_mat_vec_type(t), "ggfuse.", op, ": segment ", i,
                                " has type ", qtype_label(qtypes[i]),
                                "; the Q8_1 mat-vec supports Q4_0, Q5_0, Q8_0, Q4_K, Q5_K, Q6_K");
    const int64_t rb = row_bytes(t, layout.k);
    TORCH_CHECK_VALUE(rb > 0, "ggfuse.", op, ": segment ", i, " is ", qtype_label(qtypes[i]),
                      ", whose rows need K to be a multiple of ", block_values(t), ", but K = ",
                      layout.k);
    TORCH_CHECK_VALUE(rows[i] > 0, "ggfuse.", op, ": segment ", i, " has ", rows[i], " rows");
    TORCH_CHECK_VALUE(offsets[i] % kSegmentAlign == 0, "ggfuse.", op, ": segment ", i,
                      " starts at byte offset ", offsets[i], ", which is not a multiple of ",
                      kSegmentAlign);
    TORCH_CHECK_VALUE(offsets[i] >= 0 && rows[i] <= (weight.numel() - offsets[i]) / rb, "ggfuse.",
                      op, ": segment ", i, " (", rows[i], " rows of ", qtype_label(qtypes[i]),
                      ", ", rb, " bytes each, at byte offset ", offsets[i],
                      ") runs past the end of the ", weight.numel(), "-byte weight buffer");
    Segment s{};
    s.type = t;
    s.rows = static_cast<int32_t>(rows[i]);
    s.byte_offset = offsets[i];
    s.row_begin = static_cast<int32_t>(layout.n_out);
    layout.segments.push_back(s);
    layout.n_out += rows[i];
  }
  TORCH_CHECK_VALUE(layout.n_out < (int64_t{1} << 31), "ggfuse.", op, ": ", layout.n_out,
                    " output rows is more than this kernel indexes");
  return layout;
}

}  // namespace ops
}  // namespace ggfuse

// GGUF / ggml block formats (SPEC §1), shared by the CPU and CUDA kernels.
//
// Torch-free on purpose: this header is compiled by the host compiler for the CPU kernels and by nvcc
// for the CUDA kernels, and the byte layouts here are the contract with GGUF files.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define GGFUSE_HD __host__ __device__ __forceinline__
#else
#define GGFUSE_HD inline
#endif

namespace ggfuse {

// GGML type ids (ggml.h `enum ggml_type`). Python uses gguf.GGMLQuantizationType; these are the same
// integers, spelled once here because C++ cannot import the Python enum.
enum GgmlType : int32_t {
  kF32 = 0,
  kF16 = 1,
  kQ4_0 = 2,
  kQ5_0 = 6,
  kQ8_0 = 8,
  kQ8_1 = 9,
  kQ4_K = 12,
  kQ5_K = 13,
  kQ6_K = 14,
  kBF16 = 30,
};

constexpr int kQK = 32;      // values per block of the 32-wide formats (Q4_0, Q5_0, Q8_0, Q8_1)
constexpr int kQK_K = 256;   // values per super-block of the K-quants
constexpr int kScaleBytesK = 12;

struct BlockQ4_0 {
  uint16_t d;  // fp16
  uint8_t qs[kQK / 2];
};
struct BlockQ5_0 {
  uint16_t d;  // fp16
  uint8_t qh[4];
  uint8_t qs[kQK / 2];
};
struct BlockQ8_0 {
  uint16_t d;  // fp16
  int8_t qs[kQK];
};
struct BlockQ8_1 {
  uint16_t d;  // fp16: amax / 127
  uint16_t s;  // fp16: sum of the 32 unquantized values (what ggml's CUDA backend writes)
  int8_t qs[kQK];
};
struct BlockQ4_K {
  uint16_t d;     // fp16 super-block scale for the 6-bit scales
  uint16_t dmin;  // fp16 super-block scale for the 6-bit mins
  uint8_t scales[kScaleBytesK];
  uint8_t qs[kQK_K / 2];
};
struct BlockQ5_K {
  uint16_t d;
  uint16_t dmin;
  uint8_t scales[kScaleBytesK];
  uint8_t qh[kQK_K / 8];
  uint8_t qs[kQK_K / 2];
};
struct BlockQ6_K {
  uint8_t ql[kQK_K / 2];
  uint8_t qh[kQK_K / 4];
  int8_t scales[kQK_K / 16];
  uint16_t d;  // fp16
};

// The fp32 sum s of a Q8_1 block's 32 values, in one order everywhere (SPEC §1 leaves it open): the
// CPU, the CUDA quantize kernel and the CUDA norm (whose 8 lanes per block hold 4 values each, and add
// their sums in a butterfly) all write the same s. Each run of 4 values in order, then pairwise.
GGFUSE_HD float q8_1_quad_sum(const float* v) { return ((v[0] + v[1]) + v[2]) + v[3]; }
GGFUSE_HD float q8_1_block_sum(const float* v) {
  float q[kQK / 4];
  for (int j = 0; j < kQK / 4; ++j) q[j] = q8_1_quad_sum(v + 4 * j);
  return ((q[0] + q[1]) + (q[2] + q[3])) + ((q[4] + q[5]) + (q[6] + q[7]));
}

static_assert(sizeof(BlockQ4_0) == 18, "Q4_0 block must be 18 bytes");
static_assert(sizeof(BlockQ5_0) == 22, "Q5_0 block must be 22 bytes");
static_assert(sizeof(BlockQ8_0) == 34, "Q8_0 block must be 34 bytes");
static_assert(sizeof(BlockQ8_1) == 36, "Q8_1 block must be 36 bytes");
static_assert(sizeof(BlockQ4_K) == 144, "Q4_K block must be 144 bytes");
static_assert(sizeof(BlockQ5_K) == 176, "Q5_K block must be 176 bytes");
static_assert(sizeof(BlockQ6_K) == 210, "Q6_K block must be 210 bytes");

// Values per block and bytes per block; 0 for a type ggfuse does not handle.
GGFUSE_HD int block_values(int32_t type) {
  switch (type) {
    case kF32: case kF16: case kBF16: return 1;
    case kQ4_0: case kQ5_0: case kQ8_0: case kQ8_1: return kQK;
    case kQ4_K: case kQ5_K: case kQ6_K: return kQK_K;
    default: return 0;
  }
}
GGFUSE_HD int block_bytes(int32_t type) {
  switch (type) {
    case kF32: return 4;
    case kF16: case kBF16: return 2;
    case kQ4_0: return sizeof(BlockQ4_0);
    case kQ5_0: return sizeof(BlockQ5_0);
    case kQ8_0: return sizeof(BlockQ8_0);
    case kQ8_1: return sizeof(BlockQ8_1);
    case kQ4_K: return sizeof(BlockQ4_K);
    case kQ5_K: return sizeof(BlockQ5_K);
    case kQ6_K: return sizeof(BlockQ6_K);
    default: return 0;
  }
}
// Bytes of one row of k values, or -1 when k is not a whole number of blocks or the type is unknown.
GGFUSE_HD int64_t row_bytes(int32_t type, int64_t k) {
  const int qk = block_values(type);
  if (qk == 0 || k % qk != 0) return -1;
  return k / qk * block_bytes(type);
}
// Weight types the Q8_1 mat-vec handles (SPEC §2).
GGFUSE_HD bool is_mat_vec_type(int32_t type) {
  return type == kQ4_0 || type == kQ5_0 || type == kQ8_0 || type == kQ4_K || type == kQ5_K ||
         type == kQ6_K;
}
// Mat-vec types whose blocks are a multiple of 16 bytes (Q4_K 144, Q5_K 176), so every block of a
// 16-byte aligned segment is 16-byte aligned; the others (Q4_0 18, Q5_0 22, Q8_0 34, Q6_K 210) are
// only 2-byte aligned, and the CUDA kernels read them through enclosing 16-byte granules.
GGFUSE_HD constexpr bool blocks_16_aligned(int32_t type) { return type == kQ4_K || type == kQ5_K; }
const char* type_name(int32_t type);  // defined in cpu/formats.cpp; "type 7" style for unknown ids

// ---- half / bfloat16 <-> float, bit-exact with IEEE round-to-nearest-even ----
GGFUSE_HD float bits_to_float(uint32_t u) {
  float f;
  memcpy(&f, &u, 4);
  return f;
}
GGFUSE_HD uint32_t float_to_bits(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  return u;
}

GGFUSE_HD float fp16_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  if (exp == 0x1f) return bits_to_float(sign | 0x7f800000u | (mant << 13));  // inf / nan
  if (exp != 0) return bits_to_float(sign | ((exp + 112u) << 23) | (mant << 13));
  if (mant == 0) return bits_to_float(sign);
  // subnormal half: value = mant * 2^-24, exact in float
  const float v = static_cast<float>(mant) * 5.9604644775390625e-08f;
  return (sign != 0u) ? -v : v;
}

GGFUSE_HD uint16_t float_to_fp16(float f) {
  const uint32_t x = float_to_bits(f);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const uint32_t abs = x & 0x7fffffffu;
  if (abs >= 0x7f800000u) {  // inf or nan (keep nan quiet and non-zero)
    return static_cast<uint16_t>(sign | 0x7c00u | (abs > 0x7f800000u ? 0x200u : 0u));
  }
  if (abs >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // rounds to >= 65520: inf
  if (abs < 0x38800000u) {
    // result is a half subnormal (or zero): round abs * 2^24 to an integer, ties to even
    if (abs < 0x33000000u) return static_cast<uint16_t>(sign);  // < 2^-25: rounds to zero
    const uint32_t e = abs >> 23;                               // 102..112
    const uint32_t m = (abs & 0x7fffffu) | 0x800000u;
    const uint32_t shift = 126u - e;                            // 14..24
    uint32_t r = m >> shift;
    const uint32_t rem = m & ((1u << shift) - 1u);
    const uint32_t half = 1u << (shift - 1u);
    if (rem > half || (rem == half && (r & 1u))) ++r;
    return static_cast<uint16_t>(sign | r);
  }
  // normal half: rebias the exponent and round the 13 dropped mantissa bits, ties to even
  uint32_t h = ((abs >> 13) - (112u << 10));
  const uint32_t rem = abs & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;  // a carry into the exponent is correct
  return static_cast<uint16_t>(sign | h);
}

GGFUSE_HD float bf16_to_float(uint16_t h) { return bits_to_float(static_cast<uint32_t>(h) << 16); }

// Activation element types the norm / quantize kernels read.
struct Bf16 {
  uint16_t bits;
};
struct Half {
  uint16_t bits;
};
GGFUSE_HD float to_float(float v) { return v; }
GGFUSE_HD float to_float(Half v) { return fp16_to_float(v.bits); }
GGFUSE_HD float to_float(Bf16 v) { return bf16_to_float(v.bits); }
GGFUSE_HD uint16_t float_to_bf16(float f) {
  uint32_t x = float_to_bits(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((x >> 16) | 0x40u);  // quiet nan
  x += 0x7fffu + ((x >> 16) & 1u);  // round to nearest even
  return static_cast<uint16_t>(x >> 16);
}
GGFUSE_HD void from_float(float v, float* out) { *out = v; }
GGFUSE_HD void from_float(float v, Half* out) { out->bits = float_to_fp16(v); }
GGFUSE_HD void from_float(float v, Bf16* out) { out->bits = float_to_bf16(v); }

// ---- Q4_K / Q5_K 6-bit scale and min of sub-block j (0..7), SPEC §1 ----
GGFUSE_HD void k_scale_min(const uint8_t* scales, int j, int* sc, int* m) {
  if (j < 4) {
    *sc = scales[j] & 63;
    *m = scales[j + 4] & 63;
  } else {
    *sc = (scales[j + 4] & 15) | ((scales[j - 4] >> 6) << 4);
    *m = (scales[j + 4] >> 4) | ((scales[j] >> 6) << 4);
  }
}

// ---- The segments of a fused weight (SPEC §3): consecutive row ranges, each with its own type ----
constexpr int kMaxSegments = 16;   // per launch; the op layer splits longer lists into several launches
constexpr int kSegmentAlign = 16;  // segment byte offsets (and the buffer start) are multiples of this

struct Segment {
  int32_t type;        // GgmlType of these rows
  int32_t rows;        // number of output rows
  int64_t byte_offset; // where the first row starts in the fused byte buffer
  int32_t row_begin;   // first output column this segment writes
};
struct SegmentTable {
  Segment seg[kMaxSegments];
  int32_t count;
  int32_t total_rows;  // rows covered by this table (sum of seg[i].rows)
};

}  // namespace ggfuse

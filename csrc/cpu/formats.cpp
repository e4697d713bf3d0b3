#include "ggfuse/formats.h"

namespace ggfuse {

const char* type_name(int32_t type) {
  switch (type) {
    case kF32: return "F32";
    case kF16: return "F16";
    case kQ4_0: return "Q4_0";
    case kQ5_0: return "Q5_0";
    case kQ8_0: return "Q8_0";
    case kQ8_1: return "Q8_1";
    case kQ4_K: return "Q4_K";
    case kQ5_K: return "Q5_K";
    case kQ6_K: return "Q6_K";
    case kBF16: return "BF16";
    default: return "an unsupported GGML type";
  }
}

}  // namespace ggfuse

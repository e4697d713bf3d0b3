// The memory read-bandwidth probe of the benchmark (SPEC §6: "measured read bandwidth, uint4 loads"):
// a torch-free CUDA launcher that streams a buffer through 16-byte loads and keeps only the XOR of
// its 32-bit words, so every byte is read and almost nothing is written.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace ggfuse {
namespace cuda {

// Reads buf[0, n_bytes) once and XORs into *out (one uint32 the caller initializes, e.g. to 0) the
// XOR of buf's little-endian 32-bit words; a last partial word counts as if padded with zero bytes.
// buf must be 16-byte aligned (the bulk of it is read with uint4 loads; the n_bytes % 16 tail bytes
// one by one). grid: thread blocks to launch; <= 0 fills the device (every SM at full occupancy).
// Returns the launch status (cudaGetLastError after the launch); n_bytes == 0 launches nothing.
cudaError_t read_probe(const uint8_t* buf, int64_t n_bytes, uint32_t* out, int grid,
                       cudaStream_t stream);

}  // namespace cuda
}  // namespace ggfuse

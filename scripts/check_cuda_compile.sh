#!/usr/bin/env bash
# Compiles every CUDA source with nvcc for sm_80 and sm_90, and the CUDA op registration against
# torch's headers, so a kernel that does not compile never lands, even where torch has no CUDA.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
NVCC=${NVCC:-$(command -v nvcc || true)}
if [ -z "$NVCC" ]; then
  for d in "${CUDA_HOME:-}" /usr/local/cuda; do
    [ -n "$d" ] && [ -x "$d/bin/nvcc" ] && NVCC="$d/bin/nvcc" && break
  done
fi
[ -n "$NVCC" ] || { echo "check_cuda_compile: nvcc not found (put it on PATH or set NVCC)"; exit 1; }
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
"$NVCC" --version | tail -1
archs="-gencode=arch=compute_80,code=sm_80 -gencode=arch=compute_90,code=sm_90"
shopt -s nullglob
n=0
for src in csrc/cuda/*.cu benchmarks/*.cu; do
  echo "nvcc sm_80+sm_90: $src"
  "$NVCC" -std=c++17 -O3 --expt-relaxed-constexpr -Werror all-warnings -Xcompiler=-Wall -Icsrc $archs \
    -c "$src" -o "$out/$(basename "$src").o"
  n=$((n + 1))
done
if [ -f csrc/torch/ops_cuda.cpp ]; then
  echo "host compile with CUDA and torch headers: csrc/torch/ops_cuda.cpp"
  inc=$("$PY" -c "from torch.utils import cpp_extension; print(' '.join('-isystem ' + p for p in cpp_extension.include_paths()))")
  abi=$("$PY" -c "import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))")
  # A CPU-only torch ships c10/cuda's headers but not the one CMake generates for CUDA builds; it
  # only says how c10_cuda was linked, so supply it (as a CUDA build of torch has it) for this check.
  has_macros=$("$PY" -c "from torch.utils import cpp_extension; import os; print(any(os.path.exists(os.path.join(p, 'c10/cuda/impl/cuda_cmake_macros.h')) for p in cpp_extension.include_paths()))")
  if [ "$has_macros" != True ]; then
    mkdir -p "$out/include/c10/cuda/impl"
    printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' >"$out/include/c10/cuda/impl/cuda_cmake_macros.h"
    inc="$inc -isystem $out/include"
  fi
  # shellcheck disable=SC2086
  "$NVCC" -std=c++17 -x c++ -Xcompiler=-Wall -Icsrc $inc -DGGFUSE_WITH_CUDA -DUSE_CUDA \
    -D_GLIBCXX_USE_CXX11_ABI="$abi" -c csrc/torch/ops_cuda.cpp -o "$out/ops_cuda.o"
  n=$((n + 1))
  echo "host compile with CUDA and torch headers: csrc/torch/probe_cuda.cpp"
  # shellcheck disable=SC2086
  "$NVCC" -std=c++17 -x c++ -Xcompiler=-Wall -Icsrc $inc -DGGFUSE_WITH_CUDA -DUSE_CUDA \
    -D_GLIBCXX_USE_CXX11_ABI="$abi" -c csrc/torch/probe_cuda.cpp -o "$out/probe_cuda.o"
  n=$((n + 1))
fi
echo "check_cuda_compile: $n CUDA sources compiled"

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
for src in csrc/cuda/*.cu; do
  echo "nvcc sm_80+sm_90: $src"
  "$NVCC" -std=c++17 -O3 --expt-relaxed-constexpr -Werror all-warnings -Xcompiler=-Wall -Icsrc $archs \
    -c "$src" -o "$out/$(basename "$src").o"
  n=$((n + 1))
done
if [ -f csrc/torch/ops_cuda.cpp ]; then
  echo "host compile with CUDA and torch headers: csrc/torch/ops_cuda.cpp"
  inc=$("$PY" -c "from torch.utils import cpp_extension; print(' '.join('-isystem ' + p for p in cpp_extension.include_paths()))")
  abi=$("$PY" -c "import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))")
  # shellcheck disable=SC2086
  "$NVCC" -std=c++17 -x c++ -Xcompiler=-Wall -Icsrc $inc -DGGFUSE_WITH_CUDA -DUSE_CUDA \
    -D_GLIBCXX_USE_CXX11_ABI="$abi" -c csrc/torch/ops_cuda.cpp -o "$out/ops_cuda.o"
  n=$((n + 1))
fi
echo "check_cuda_compile: $n CUDA sources compiled"

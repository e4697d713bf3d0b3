#!/usr/bin/env bash
# Installs ggfuse into the current Python on a fresh machine or an existing one:
#   bash scripts/install.sh          # the package (and torch==2.13.0 if no torch is installed)
#   bash scripts/install.sh --test   # ... plus the test dependencies
# ggfuse compiles against the torch already installed (--no-build-isolation), so torch comes first;
# an installed torch is used as it is (CUDA kernels are built when it has CUDA and nvcc is found).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
extras=""
[ "${1:-}" = "--test" ] && extras="[test]"

if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  echo "ggfuse install: no torch found, installing torch==2.13.0"
  "$PY" -m pip install -q torch==2.13.0
fi
"$PY" -c "import torch; print(f'ggfuse install: building against torch {torch.__version__} (CUDA: {torch.version.cuda})')"
"$PY" -m pip install -q "scikit-build-core>=0.10" "cmake>=3.24" ninja numpy
"$PY" -m pip install -q --no-build-isolation ".${extras}"

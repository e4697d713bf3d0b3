#!/bin/bash
# v20 device run 2: build, Nsight Compute of the wide kernel, sanitizers, variants
export GGFUSE_GIT_COMMIT=1015551
GGFUSE_BUILD_CXX=/usr/bin/g++ SKIP_TESTS=1 SKIP_SANITIZER=1 SKIP_BENCH=1 OUT=$OUT bash scripts/device_check.sh >"$OUT/dc.log" 2>&1
echo "build rc=$?"
export PYTHONPATH=/tmp/site
cat >/tmp/profile_wide.py <<'PYEOF'
import torch, ggfuse
from ggfuse.bench import random_gguf
from gguf import GGMLQuantizationType as T
dev, k = "cuda", 4096
fused = ggfuse.FusedQuantLinear([(f"m{i}", random_gguf(T.Q4_K, n, k, dev), T.Q4_K)
                                 for i, n in enumerate((4096, 1024, 1024))], device=dev)
for b in (8, 16, 64):
    xq = ggfuse.quantize_q8_1(torch.randn(b, k, device=dev))
    fused.forward_q8(xq)
torch.cuda.synchronize()
PYEOF
python3 /tmp/profile_wide.py >"$OUT/ncu.txt" 2>&1 && echo "profile script ok" >>"$OUT/ncu.txt"
(cd /tmp && timeout 150 ncu --clock-control none -k regex:"mat_vec" \
   --section SpeedOfLight --section LaunchStats --section Occupancy --section WarpStateStats \
   --section SchedulerStats --section InstructionStats --print-details all \
   --metrics smsp__inst_executed.sum,smsp__sass_inst_executed_op_shared_ld.sum,smsp__sass_inst_executed_op_shared_st.sum,smsp__sass_inst_executed_op_local_ld.sum,smsp__inst_executed_pipe_tensor.sum \
   python3 /tmp/profile_wide.py >>"$OUT/ncu.txt" 2>&1)
echo "ncu rc=$?"
SKIP_BUILD=1 SKIP_TESTS=1 SKIP_BENCH=1 SANITIZER_CONFIGS="GGFUSE_FUSED_NORM=1" OUT=/tmp/san bash scripts/device_check.sh >/tmp/san.log 2>&1
cp /tmp/san/sanitizer.log "$OUT/sanitizer.log"; tail -n 12 /tmp/san/summary.txt >"$OUT/san_summary.txt"
SKIP_BUILD=1 SKIP_CPU_TESTS=1 PYTEST_ARGS="-k no_such_test" VARIANTS="pytest-cuda-wide-off pytest-cuda-wide-split-1" SKIP_SANITIZER=1 SKIP_BENCH=1 OUT=/tmp/var bash scripts/device_check.sh >/tmp/var.log 2>&1
cp /tmp/var/summary.txt "$OUT/var_summary.txt"; tail -n 30 /tmp/var/pytest.log >"$OUT/var_pytest_tail.txt"
rm -f "$OUT/bench.log"; rm -rf "$OUT/bench"
ls "$OUT"

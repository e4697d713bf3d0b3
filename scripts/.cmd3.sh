#!/bin/bash
# v20 device run 3 (df69d36): build, CUDA suite, sanitizers, bench matrix, A/B of the wide kernel
export GGFUSE_GIT_COMMIT=df69d36
GGFUSE_BUILD_CXX=/usr/bin/g++ SKIP_CPU_TESTS=1 VARIANTS=none SANITIZER_CONFIGS="GGFUSE_FUSED_NORM=1" OUT=$OUT \
  bash scripts/device_check.sh --matrix >/tmp/dc.log 2>&1
echo "device_check rc=$?"
export PYTHONPATH=/tmp/site
B="python3 -m ggfuse.bench --no-plot --no-torch --variants matvec"
{
  echo "## GGFUSE_MV_WIDE=0 (before), same session: QKV 4096, B = 8 16 64"
  GGFUSE_MV_WIDE=0 $B --types Q4_K Q4_0 Q4_K+Q6_K --shapes '4096->4096+1024+1024' --batches 8 16 64 --out /tmp/b4 >/tmp/b4.log 2>&1; tail -n 9 /tmp/b4/results.md
  echo "## GGFUSE_MV_WIDE=0: gate|up and QKV 8192, Q4_K, B = 16 64"
  GGFUSE_MV_WIDE=0 $B --types Q4_K --shapes '4096->2x14336' '8192->8192+1024+1024' --batches 16 64 --out /tmp/b6 >/tmp/b6.log 2>&1; tail -n 4 /tmp/b6/results.md
  echo "## GGFUSE_MV_WIDE=8 (B = 8 as one chunk of the wide kernel)"
  GGFUSE_MV_WIDE=8 $B --types Q4_K Q4_0 Q4_K+Q6_K --shapes '4096->4096+1024+1024' '4096->2x14336' --batches 8 --out /tmp/b3 >/tmp/b3.log 2>&1; tail -n 6 /tmp/b3/results.md
} >"$OUT/bench_v20b.txt" 2>&1
rm -f "$OUT/bench.log"
ls -R "$OUT"

#!/bin/bash
# v20 device run 1: build, CUDA suite, the wide kernel's benches
export GGFUSE_GIT_COMMIT=1015551
GGFUSE_BUILD_CXX=/usr/bin/g++ SKIP_CPU_TESTS=1 VARIANTS=none SKIP_SANITIZER=1 SKIP_BENCH=1 OUT=$OUT bash scripts/device_check.sh >"$OUT/dc.log" 2>&1
echo "device_check rc=$?"
export PYTHONPATH=/tmp/site
B="python3 -m ggfuse.bench --no-plot --no-torch --variants matvec"
{
  echo "## default (wide kernel above 8 rows), Q4_K, all shapes, B = 16 64"
  $B --types Q4_K --batches 16 64 --out /tmp/b1 >/tmp/b1.log 2>&1; tail -n 20 /tmp/b1/results.md
  echo "## default, QKV 4096, Q4_0 and Q4_K+Q6_K, B = 16 64"
  $B --types Q4_0 Q4_K+Q6_K --shapes '4096->4096+1024+1024' --batches 16 64 --out /tmp/b2 >/tmp/b2.log 2>&1; tail -n 8 /tmp/b2/results.md
  echo "## GGFUSE_MV_WIDE=8 (B = 8 as one chunk), all types, QKV 4096 and gate|up"
  GGFUSE_MV_WIDE=8 $B --types Q4_K Q4_0 Q4_K+Q6_K --shapes '4096->4096+1024+1024' '4096->2x14336' --batches 8 --out /tmp/b3 >/tmp/b3.log 2>&1; tail -n 10 /tmp/b3/results.md
  echo "## GGFUSE_MV_WIDE=0 (before), same session: QKV 4096 Q4_K B = 8 16 64"
  GGFUSE_MV_WIDE=0 $B --types Q4_K --shapes '4096->4096+1024+1024' --batches 8 16 64 --out /tmp/b4 >/tmp/b4.log 2>&1; tail -n 6 /tmp/b4/results.md
  echo "## split forced 1 / 2 / 8: QKV 4096 Q4_K B = 64"
  for s in 1 2 8; do GGFUSE_MV_WIDE_SPLIT=$s $B --types Q4_K --shapes '4096->4096+1024+1024' --batches 64 --out /tmp/b5$s >/tmp/b5$s.log 2>&1; echo "split $s"; tail -n 1 /tmp/b5$s/results.md; done
} >"$OUT/bench_v20.txt" 2>&1
cat /tmp/b1.log | tail -5 >>"$OUT/bench_v20.txt"
rm -f "$OUT/bench.log"
ls "$OUT"

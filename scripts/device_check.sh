#!/usr/bin/env bash
# One call on a GPU machine: install the carried gguf wheel, build ggfuse with its CUDA kernels, run the
# whole test suite with CUDA required, run the CUDA ops under compute-sanitizer (memcheck; racecheck
# for the shared-memory kernels), then the benchmark. Everything it writes goes under $OUT (at most 8
# files, two levels deep, for the device tool to bring back):
#   summary.txt build.log pytest.log sanitizer.log bench.log bench/results.{json,md,png}
# With NCU=1 an Nsight Compute report of one layer's kernels adds ncu.txt: pass --no-plot then.
#
# Usage (repository root):  OUT=/some/dir scripts/device_check.sh [bench arguments...]
# Environment: GGFUSE_GIT_COMMIT (the commit being tested; the device copy need not be a git repo),
#   SKIP_BUILD=1 / SKIP_TESTS=1 / SKIP_SANITIZER=1 / SKIP_BENCH=1 to leave a stage out, NCU=1,
#   SANITIZER_TOOLS (default "memcheck racecheck"), SANITIZER_CONFIGS (configurations separated by spaces,
#   each ENV=VALUE[,ENV=VALUE...]; default: the MMA fused norm, the direct kernel with one slot, the
#   dp4a kernel staged for every type, the streaming kernel),
#   SKIP_CPU_TESTS=1 (only tests/test_cuda.py),
#   GGFUSE_BUILD_CXX (host compiler for the build; on the lent image CXX=/opt/gcc/bin/g++ produced a
#   _C.so that crashed formatting error messages, /usr/bin/g++ did not),
#   PROBE=1 (benchmarks/graph_probe.py: how a torch-captured chain's time splits),
#   PYTEST_ARGS (extra pytest arguments, split at spaces), PYTEST_K (a -k expression, which may have
#   spaces: "wide or graph"), GGFUSE_CUDA_ARCHS (default 90), VARIANTS (the names of the
#   off-by-default kernel stages to run, e.g. "pytest-cuda-mma-only"; default all).
# The carried folders: .whl (gguf wheel) and .testdata (a copy of ../shared/testdata).
set -u -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:?set OUT to the output folder}
mkdir -p "$OUT/bench"
REPO=$(pwd)
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"
note() { echo "$*" | tee -a "$SUMMARY"; }
stage_start() { STAGE_T0=$(date +%s); }
stage_end() { note "[$1] rc=$2 ($(( $(date +%s) - STAGE_T0 )) s)"; }

# ---- environment ----
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
if [ -d .testdata ] && [ ! -e ../shared/testdata ]; then
  mkdir -p ../shared && ln -sfn "$REPO/.testdata" ../shared/testdata
fi
note "commit: ${GGFUSE_GIT_COMMIT:-unknown}   date: $(date -u +%FT%TZ)"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv,noheader | tee -a "$SUMMARY"
python3 -c 'import torch, sys; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))' | tee -a "$SUMMARY"
nvcc --version | tail -1 | tee -a "$SUMMARY"

# ---- build ----
if [ "${SKIP_BUILD:-0}" != 1 ]; then
  stage_start
  if [ -n "${GGFUSE_BUILD_CXX:-}" ]; then export CXX=$GGFUSE_BUILD_CXX CUDAHOSTCXX=$GGFUSE_BUILD_CXX; fi
  GGFUSE_CUDA_ARCHS=${GGFUSE_CUDA_ARCHS:-90} python3 -m pip install --no-build-isolation --no-deps -v . \
    >"$OUT/build.log" 2>&1
  rc=$?
  grep -E "ptxas info|registers|spill" "$OUT/build.log" | grep -B1 -E "spill stores [1-9]" | head -5 | tee -a "$SUMMARY"
  stage_end build $rc
  if [ $rc != 0 ]; then tail -40 "$OUT/build.log"; exit $rc; fi
fi
python3 -c 'import ggfuse; assert ggfuse.has_cuda_kernels(), "built without CUDA kernels"; print("ggfuse CUDA kernels: yes")' | tee -a "$SUMMARY"

# ---- an op's error message must come back as a Python exception, not a crash ----
# (Seen on this image: _C.so built by /opt/gcc's g++ segfaulted inside std::ostream while formatting
# an integer into a TORCH_CHECK message. If that happens, record the toolchain and rebuild with the
# system compiler.)
error_path_ok() {
  (cd /tmp && python3 - <<'PYEOF'
import torch, ggfuse
try:
    ggfuse.mat_vec_q8_1(torch.zeros(1, 36, dtype=torch.uint8), torch.zeros(64, dtype=torch.uint8)[1:33], [12], [1], [0])
except ValueError as e:
    print("error path ok:", str(e)[:70])
PYEOF
  ) >>"$SUMMARY" 2>&1
}
if [ "${SKIP_BUILD:-0}" != 1 ] && ! error_path_ok; then
  note "error path crashed with the default compiler; toolchain:"
  {
    echo "CXX=${CXX:-} CC=${CC:-} CUDAHOSTCXX=${CUDAHOSTCXX:-}"; which -a g++ c++ 2>&1 | head -4
    g++ --version | head -1; python3 -c "import torch; print('torch cxx11 abi', torch._C._GLIBCXX_USE_CXX11_ABI)"
    so=$(python3 -c 'import ggfuse, os; print(os.path.join(os.path.dirname(ggfuse.__file__), "_C.so"))')
    ldd "$so" | grep -E "stdc|gcc_s"
    command -v nm >/dev/null && nm -C --defined-only "$so" | grep -E "_M_insert<long>|locale::id" | head -4
    f=$(g++ -print-file-name=libstdc++.so); echo "libstdc++.so: $f"; head -c 300 "$f" | strings | head -3
  } 2>&1 | tee -a "$SUMMARY"
  for cxx in /usr/bin/g++ /usr/bin/g++-14 /usr/bin/g++-13 /usr/bin/g++-12; do
    [ -x "$cxx" ] || continue
    note "rebuilding with CXX=$cxx"
    rm -rf build
    CXX=$cxx CUDAHOSTCXX=$cxx GGFUSE_CUDA_ARCHS=${GGFUSE_CUDA_ARCHS:-90} python3 -m pip install \
      --no-build-isolation --no-deps -v . >>"$OUT/build.log" 2>&1 || continue
    if error_path_ok; then note "fixed by building with $cxx"; break; fi
  done
fi

# ---- tests: the whole suite, CUDA required (the CUDA tests first, in their own process) ----
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  stage_start
  (cd /tmp && GGFUSE_REQUIRE_CUDA=1 timeout 300 python3 -m pytest "$REPO/tests/test_cuda.py" -q \
     -p no:cacheprovider -rfE ${PYTEST_ARGS:-} ${PYTEST_K:+-k "$PYTEST_K"} >"$OUT/pytest.log" 2>&1)
  rc=$?
  if [ $rc -ge 128 ] || [ $rc = 124 ]; then  # a crash or a hang: which test, and a native backtrace
    crashed=$(grep -oE 'test_cuda.py", line [0-9]+ in test_[a-z0-9_]+' "$OUT/pytest.log" | tail -1 | grep -oE 'test_[a-z0-9_]+$')
    note "pytest crashed (rc=$rc) in: ${crashed:-?}"
    if [ -n "$crashed" ]; then
      (cd /tmp && GGFUSE_REQUIRE_CUDA=1 timeout 120 cuda-gdb -q -batch -ex run -ex bt \
         --args python3 -m pytest "$REPO/tests/test_cuda.py" -q -p no:cacheprovider -k "$crashed" \
         >>"$OUT/pytest.log" 2>&1)
      grep -E "^#[0-9]+ " "$OUT/pytest.log" | head -25 | tee -a "$SUMMARY"
    fi
  fi
  grep -E "^(FAILED|ERROR)" "$OUT/pytest.log" | head -30 | tee -a "$SUMMARY"
  grep -E "passed|failed" "$OUT/pytest.log" | tail -1 | tee -a "$SUMMARY"
  stage_end pytest-cuda $rc
  # Reruns of CUDA tests with a kernel choice that is off by default: NAME, "ENV=VALUE ...", a -k filter.
  cuda_variant_stage() {
    # VARIANTS="name ...": run only these (default: all)
    if [ -n "${VARIANTS:-}" ] && [[ " $VARIANTS " != *" $1 "* ]]; then return 0; fi
    stage_start
    # shellcheck disable=SC2086
    (cd /tmp && env $2 GGFUSE_REQUIRE_CUDA=1 timeout 300 python3 -m pytest "$REPO/tests/test_cuda.py" \
       -q -p no:cacheprovider -rfE -k "$3" >>"$OUT/pytest.log" 2>&1)
    local rc=$?
    grep -E "passed|failed" "$OUT/pytest.log" | tail -1 | tee -a "$SUMMARY"
    stage_end "$1" $rc
  }
  # The kernels that are off by default go through the same tests: the streaming kernel (sm_90, with
  # and without its norm) for every batch chunk of <= 8 rows,
  cuda_variant_stage pytest-cuda-stream GGFUSE_MV_STREAM=8 "mat_vec or graph or compile"
  # the MMA kernel with the norm inside,
  cuda_variant_stage pytest-cuda-mma-fused-norm GGFUSE_FUSED_NORM=1 "rms_norm_mat_vec or graph or compile"
  # the dp4a kernel for every type and batch chunk (by default: Q4_K-only weights at B <= 2, weights
  # with a 2-byte aligned type at B <= 4, staged), with the default staging rule, never staged, and
  # always staged (where the rows fit).
  cuda_variant_stage pytest-cuda-dp4a-forced GGFUSE_MV_DP4A=8 "mat_vec or graph or compile"
  cuda_variant_stage pytest-cuda-dp4a-unstaged "GGFUSE_MV_DP4A=8 GGFUSE_MV_STAGED=0" "mat_vec or graph or compile"
  cuda_variant_stage pytest-cuda-dp4a-staged "GGFUSE_MV_DP4A=8 GGFUSE_MV_STAGED=1" "mat_vec or graph or compile"
  # the dp4a kernel's rows one after the other (by default a warp's two rows of a 16-byte-unit type
  # run as one sequence of units at B = 2 and for grids of up to 1.25 waves at B = 1), and as pairs
  # for every launch at B <= 2
  cuda_variant_stage pytest-cuda-dp4a-rows-in-turn GGFUSE_MV_ROW_PAIRS=0 "mat_vec or graph or compile"
  cuda_variant_stage pytest-cuda-dp4a-pairs-always GGFUSE_MV_ROW_PAIRS=2 "mat_vec or graph or compile"
  # the dp4a kernel's interleaved row order (by default for launches of mixed types) for every launch
  cuda_variant_stage pytest-cuda-dp4a-interleave GGFUSE_MV_INTERLEAVE=2 "mat_vec or graph or compile"
  # the staged MMA kernel for the weights the direct kernel takes by default (Q4_K, Q4_K + Q6_K,
  # Q4_0 with K % 256 == 0), and the MMA kernels at every batch (the dp4a kernel never), so the
  # direct kernel also runs B = 1 to 4.
  cuda_variant_stage pytest-cuda-mma-staged GGFUSE_MV_DIRECT=0 "mat_vec or graph or compile"
  cuda_variant_stage pytest-cuda-mma-only GGFUSE_MV_DP4A=0 "mat_vec or graph or compile"
  # above 8 rows, the direct kernel instead of the wide kernel: by its own rule (several 8-row batch
  # chunks per launch only where each warp has one item), and computing each staged item against
  # several chunks in every launch: 8 (where their partial slots do not fit, fewer) and 2 (several
  # launches and rests)
  cuda_variant_stage pytest-cuda-wide-off GGFUSE_MV_WIDE=0 "mat_vec or graph or compile"
  cuda_variant_stage pytest-cuda-direct-chunks-8 "GGFUSE_MV_WIDE=0 GGFUSE_MV_CHUNKS=8" "mat_vec or graph or compile"
  cuda_variant_stage pytest-cuda-direct-chunks-2 "GGFUSE_MV_WIDE=0 GGFUSE_MV_CHUNKS=2" "mat_vec or graph or compile"
  # the wide kernel without clusters (one CTA per group: sm_80's only form), and from 8 rows (B = 8 as
  # one chunk)
  cuda_variant_stage pytest-cuda-wide-split-1 GGFUSE_MV_WIDE_SPLIT=1 "mat_vec or graph or compile"
  cuda_variant_stage pytest-cuda-wide-from-8 GGFUSE_MV_WIDE=8 "mat_vec or graph or compile"
  # the direct kernel with one slot per warp (every item refills the slot: the ring's reuse path)
  cuda_variant_stage pytest-cuda-direct-one-slot GGFUSE_MV_STAGES=1 "mat_vec or graph or compile"
  # the norm kernel with each row on one and on two blocks of 256 threads (by default up to eight for
  # up to 64 rows: q8_1.cu's norm_subs)
  cuda_variant_stage pytest-cuda-norm-subs-1 GGFUSE_NORM_SUBS=1 "rms_norm or graph or compile"
  cuda_variant_stage pytest-cuda-norm-subs-2 GGFUSE_NORM_SUBS=2 "rms_norm or graph or compile"
  [ "${SKIP_CPU_TESTS:-0}" = 1 ] || { stage_start
  (cd /tmp && GGFUSE_REQUIRE_CUDA=1 timeout 240 python3 -m pytest "$REPO/tests" -q -p no:cacheprovider \
     --ignore "$REPO/tests/test_cuda.py" -rfE >>"$OUT/pytest.log" 2>&1)
  rc=$?
  grep -E "^(FAILED|ERROR)" "$OUT/pytest.log" | tail -n 40 | tee -a "$SUMMARY" >/dev/null
  grep -E "passed|failed" "$OUT/pytest.log" | tail -1 | tee -a "$SUMMARY"
  stage_end pytest-rest $rc; }
fi

# ---- SASS of the K-quant mat-vec kernels (SASS=1): what each item really costs ----
if [ "${SASS:-0}" = 1 ]; then
  so=$(python3 -c 'import ggfuse, os; print(os.path.join(os.path.dirname(ggfuse.__file__), "_C.so"))')
  cuobjdump -sass "$so" | awk '/Function : .*(mat_vec_kernelILi(1|8)ELi56E|mat_vec_direct_kernel)/{f=1} /Function : /&&!/(mat_vec_kernelILi(1|8)ELi56E|mat_vec_direct_kernel)/{f=0} f' >"$OUT/sass.txt"
  note "sass: $(wc -l <"$OUT/sass.txt") lines"
fi

# ---- Nsight Compute over one fused QKV layer's norm and mat-vec kernels (NCU=1) ----
if [ "${NCU:-0}" = 1 ]; then
  cat >/tmp/profile_ops.py <<'PYEOF'
import torch, ggfuse
from ggfuse.bench import random_gguf
from gguf import GGMLQuantizationType as T
dev, k = "cuda", 4096
for types in ((T.Q4_K, T.Q4_K, T.Q4_K), (T.Q4_K, T.Q4_K, T.Q6_K), (T.Q4_0, T.Q4_0, T.Q4_0)):
    fused = ggfuse.FusedQuantLinear([(f"m{i}", random_gguf(t, n, k, dev), t)
                                     for i, (t, n) in enumerate(zip(types, (4096, 1024, 1024)))], device=dev)
    nw = torch.ones(k, device=dev, dtype=torch.bfloat16)
    for b in (1, 8):
        x = torch.randn(b, k, device=dev).to(torch.bfloat16)
        ggfuse.rms_norm_mat_vec(x, nw, 1e-6, fused)
torch.cuda.synchronize()
PYEOF
  stage_start
  (cd /tmp && timeout 200 ncu --clock-control none -k regex:"mat_vec|rms_norm" \
     --section SpeedOfLight --section LaunchStats --section Occupancy --section WarpStateStats \
     --section MemoryWorkloadAnalysis --section SchedulerStats --print-details all \
     --metrics smsp__inst_executed.sum,smsp__sass_inst_executed_op_shared_ld.sum,smsp__sass_inst_executed_op_global_ld.sum,smsp__sass_inst_executed_op_local_ld.sum \
     python3 /tmp/profile_ops.py >"$OUT/ncu.txt" 2>&1)
  rc=$?
  grep -E "mat_vec_kernel|mat_vec_direct|rms_norm_q8_1|Duration|DRAM Throughput|Registers Per|Achieved Occupancy|Issued Warp Per|No Eligible|Stall" "$OUT/ncu.txt" | head -80 >>"$SUMMARY"
  stage_end ncu $rc
fi

# ---- where a torch-captured chain's time goes (PROBE=1): benchmarks/graph_probe.py ----
if [ "${PROBE:-0}" = 1 ]; then
  stage_start
  mkdir -p "$OUT/probe"
  (cd /tmp && timeout 240 python3 "$REPO/benchmarks/graph_probe.py" "$OUT/probe" >"$OUT/probe/graph_probe.txt" 2>&1)
  rc=$?
  tee -a "$SUMMARY" <"$OUT/probe/graph_probe.txt" | tail -5
  stage_end graph-probe $rc
fi

# ---- compute-sanitizer over the CUDA ops (small sizes: the tools slow kernels 10-100x) ----
if [ "${SKIP_SANITIZER:-0}" != 1 ]; then
  cat >/tmp/sanitize_ops.py <<'EOF'
# Every CUDA kernel of ggfuse once or more on small inputs; buffers end exactly at their last byte
# (no caching allocator: PYTORCH_NO_CUDA_MEMORY_CACHING=1) so an out-of-bounds access is reported.
import numpy as np, torch, ggfuse
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T
dev = "cuda"
def blocks(t, rows, k):
    v, nb = GGML_QUANT_SIZES[t]
    b = np.random.randint(0, 256, size=(rows, k // v, nb), dtype=np.uint8)
    off = {T.Q4_0: (0,), T.Q5_0: (0,), T.Q8_0: (0,), T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,)}[t]
    for o in off:
        b[:, :, o:o + 2] = (np.random.uniform(0.2, 1, (rows, k // v)) / 128).astype(np.float16).view(np.uint8).reshape(rows, k // v, 2)
    return b.reshape(rows, -1)
for dt in (torch.float32, torch.bfloat16, torch.float16):
    x = torch.randn(3, 4096, device=dev).to(dt)
    ggfuse.quantize_q8_1(x); ggfuse.rms_norm_mul_q8_1(x, torch.ones(4096, device=dev, dtype=dt), 1e-6, return_float=True)
# the norm with 2, 4 and 8 blocks per row (8 for 5 rounds: 3 with no round of their own), a partial
# last round, and views off a 16-byte boundary (the scalar-load kernel)
for k in (2048, 3104, 5120, 16416):
    ggfuse.rms_norm_mul_q8_1(torch.randn(2, k, device=dev, dtype=torch.bfloat16), torch.ones(k, device=dev, dtype=torch.bfloat16), 1e-6)
xb = torch.randn(2 * 4128 + 1, device=dev, dtype=torch.bfloat16)
ggfuse.rms_norm_mul_q8_1(xb[1:].view(2, 4128), torch.ones(4128, device=dev, dtype=torch.bfloat16), 1e-6, return_float=True)
for t in (T.Q4_0, T.Q5_0, T.Q8_0, T.Q4_K, T.Q5_K, T.Q6_K):
    ggfuse.dequantize(torch.from_numpy(blocks(t, 5, 512)).to(dev), t)
specs = [[(T.Q4_K, 33), (T.Q6_K, 17)], [(T.Q4_0, 19), (T.Q5_0, 3), (T.Q8_0, 5), (T.Q5_K, 2), (T.Q6_K, 3)], [(T.Q6_K, 3)]]
for k, spec in [(512, specs[0]), (96 * 32, specs[0]), (512, specs[1]), (5120, specs[2]), (96, [(T.Q4_0, 7), (T.Q8_0, 3)]),
                (8192, [(T.Q4_K, 5), (T.Q6_K, 3)]), (4096, [(T.Q4_K, 20)]), (512, [(T.Q4_0, 21)]),
                (256, [(T.Q6_K, 8), (T.Q4_0, 5)])]:
    if k % 256 and any(t in (T.Q4_K, T.Q5_K, T.Q6_K) for t, _ in spec):
        continue
    pieces, offs, total = [], [], 0
    for t, r in spec:
        pad = -total % 16; pieces.append(np.zeros(pad, np.uint8)); total += pad; offs.append(total)
        w = blocks(t, r, k); pieces.append(w.reshape(-1)); total += w.size
    buf = torch.from_numpy(np.concatenate(pieces)).to(dev)
    for b in (1, 2, 5, 8, 9, 64):
        xq = ggfuse.quantize_q8_1(torch.randn(b, k, device=dev))
        ggfuse.mat_vec_q8_1(xq, buf, [t for t, _ in spec], [r for _, r in spec], offs)
        x = torch.randn(b, k, device=dev, dtype=torch.bfloat16)[:, :]
        ggfuse.ops.rms_norm_mat_vec_q8_1(x, torch.ones(k, device=dev), 1e-6, buf, [t for t, _ in spec],
                                         [r for _, r in spec], offs)
torch.cuda.synchronize()
print("sanitize_ops: done")
EOF
  stage_start
  : >"$OUT/sanitizer.log"
  for tool in ${SANITIZER_TOOLS:-memcheck racecheck}; do
    # the default kernels with the MMA kernel's norm, the direct kernel with one slot per warp
    # (every item reuses the slot), the dp4a kernel staged (where the rows fit) for every type, then
    # the streaming kernel (with its norm); SANITIZER_CONFIGS overrides the list
    for cfg in ${SANITIZER_CONFIGS:-GGFUSE_FUSED_NORM=1 GGFUSE_MV_STAGES=1 GGFUSE_MV_DP4A=8,GGFUSE_MV_STAGED=1 GGFUSE_MV_STREAM=8}; do
      cfg=${cfg//,/ }
      echo "==== compute-sanitizer --tool $tool ($cfg)" >>"$OUT/sanitizer.log"
      # shellcheck disable=SC2086
      (cd /tmp && env $cfg PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 150 compute-sanitizer \
         --tool $tool --print-limit 20 python3 /tmp/sanitize_ops.py >>"$OUT/sanitizer.log" 2>&1)
      echo "rc=$?" >>"$OUT/sanitizer.log"
    done
  done
  grep -E "ERROR SUMMARY|RACECHECK SUMMARY|sanitize_ops: done|^rc=" "$OUT/sanitizer.log" | tee -a "$SUMMARY"
  stage_end sanitizer 0
fi

# ---- tuning experiments (EXPERIMENTS="ENV=V ENV=V;ENV=V;..."): one short bench per configuration ----
# (EXP_SHAPES, EXP_TYPES, EXP_BATCHES, EXP_VARIANTS: space-separated subsets; default the QKV shape,
# Q4_K, B = 1 8, the variants fused two_kernels matvec norm; each configuration gets 120 s)
if [ -n "${EXPERIMENTS:-}" ]; then
  stage_start
  EXPLOG=/tmp/experiments.log  # into summary.txt only: $OUT is limited to 8 files
  : >"$EXPLOG"
  IFS=';' read -ra configs <<<"base;$EXPERIMENTS"
  for cfg in "${configs[@]}"; do
    echo "==== $cfg" >>"$EXPLOG"
    envs=(); [ "$cfg" != base ] && read -ra envs <<<"$cfg"
    (cd /tmp && env "${envs[@]}" timeout 120 python3 -m ggfuse.bench --variants ${EXP_VARIANTS:-fused two_kernels matvec norm} \
       --shapes ${EXP_SHAPES:-4096->4096+1024+1024} --types ${EXP_TYPES:-Q4_K} --batches ${EXP_BATCHES:-1 8} --no-torch --no-plot --repeats 10 \
       --out /tmp/exp 2>&1 | grep -E "^[0-9]|measured" >>"$EXPLOG")
  done
  tee -a "$SUMMARY" <"$EXPLOG"
  stage_end experiments 0
fi

# ---- benchmark ----
if [ "${SKIP_BENCH:-0}" != 1 ]; then
  stage_start
  (cd /tmp && timeout 300 python3 -m ggfuse.bench --out "$OUT/bench" "$@" 2>&1 | tee "$OUT/bench.log")
  rc=$?
  stage_end bench $rc
  [ -f "$OUT/bench/results.md" ] && cat "$OUT/bench/results.md" >>"$SUMMARY"
fi
echo "==== summary"
cat "$SUMMARY"

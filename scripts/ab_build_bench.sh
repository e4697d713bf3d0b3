#!/usr/bin/env bash
# A/B of compile-time variants on a GPU machine: for each "NAME=CUDA_DEFINES" argument, build ggfuse
# with those nvcc flags and run one short bench (BENCH_ARGS, plus each env configuration of
# AB_ENVS separated by ';', "base" for none). Output under $OUT/ab.txt. For experiments that need
# another build (a macro the experiment adds to a kernel); device_check.sh is the regular run.
set -u -o pipefail
OUT=${OUT:?set OUT}
REPO=$(pwd)
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>/dev/null
  export PYTHONPATH=/tmp/site
fi
[ -n "${GGFUSE_BUILD_CXX:-}" ] && export CXX=$GGFUSE_BUILD_CXX CUDAHOSTCXX=$GGFUSE_BUILD_CXX
for variant in "$@"; do
  name=${variant%%=*}; defs=${variant#*=}
  echo "#### build $name ($defs)" | tee -a "$OUT/ab.txt"
  rm -rf "$REPO/build"
  CMAKE_ARGS="-DCMAKE_CUDA_FLAGS=$defs" GGFUSE_CUDA_ARCHS=${GGFUSE_CUDA_ARCHS:-90} \
    python3 -m pip install --no-build-isolation --no-deps -v . >"$OUT/build_$name.log" 2>&1 || { echo "build failed" | tee -a "$OUT/ab.txt"; tail -20 "$OUT/build_$name.log"; continue; }
  IFS=';' read -ra envs_list <<<"base;${AB_ENVS:-}"
  for cfg in "${envs_list[@]}"; do
    [ -z "$cfg" ] && continue
    envs=(); [ "$cfg" != base ] && read -ra envs <<<"$cfg"
    echo "==== $name / $cfg" >>"$OUT/ab.txt"
    # shellcheck disable=SC2086
    (cd /tmp && env "${envs[@]}" timeout 150 python3 -m ggfuse.bench ${BENCH_ARGS:-} --no-torch --no-plot \
       --out /tmp/ab 2>&1 | grep -E "^[0-9]|measured" >>"$OUT/ab.txt")
  done
done
cat "$OUT/ab.txt"

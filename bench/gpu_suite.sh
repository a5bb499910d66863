#!/usr/bin/env bash
# The CUDA backend's GPU suite, for the device machine (it has no cargo): run from the folder
# bench/stage_gpu_suite.sh fills with the test binaries and the library built on the dev machine:
#   bash bench/stage_gpu_suite.sh            (fills .gpu-cuda, git-ignored)
# then on the device: bash .gpu-cuda/gpu_suite.sh, carry [".gpu-cuda"]. Logs go to $OUT (or
# ./gpu-results), bundled into suite.tar.xz with the summary beside it (a device call returns 8
# files). Every part is cut at CALL_S seconds from the start (default 570: one call), in this
# order: C ABI, pool, cuda_backend against the f64 reference (CASES random cases, default 100),
# memcheck and racecheck subsets, the C API stress test (STRESS_SECONDS, then under memcheck
# STRESS_SANITIZER_SECONDS), the W1/W2 timing against FA2. ONLY=name,name runs just the
# cuda_backend and cuda_pool tests whose names contain one of them, and the C ABI tests.
set -uo pipefail
cd "$(dirname "$0")"
out="${OUT:-./gpu-results}"
logs=$(mktemp -d)
mkdir -p "$out"
T0=$(date +%s)
END=$((T0 + ${CALL_S:-570}))
# At most $1 seconds, and never past END (5 s at least, so a part that starts late says so).
cap() { local l=$((END - $(date +%s))); [ "$l" -lt 5 ] && l=5; [ "$l" -lt "$1" ] && echo "$l" || echo "$1"; }
say() { echo "== [$(($(date +%s) - T0)) s] $*"; }
bundle() { tar -C "$logs" -cJf "$out/suite.tar.xz" . && say "logs in suite.tar.xz"; }
trap bundle EXIT
export PACKINFER_TEST_CACHE_DIR=/tmp/pkcache PACKINFER_CACHE_DIR=/tmp/pkcache RUST_BACKTRACE=1
# Here a GPU test without a usable device is a failure, not "ignored" (a lost or broken device
# would otherwise read as a suite with nothing wrong).
export PACKINFER_REQUIRE_GPU=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$logs/device.txt"; date -u | tee -a "$logs/device.txt"
say "commit $(cat COMMIT 2>/dev/null)"
filters=()
# shellcheck disable=SC2206 # ONLY is a list of test-name filters
[ -n "${ONLY:-}" ] && filters=(${ONLY//,/ })
say "C ABI"; timeout "$(cap 120)" ./cuda_ffi --nocapture >"$logs/cuda_ffi.log" 2>&1; grep -E "test result|panicked" -A3 "$logs/cuda_ffi.log"
say "managed pool on the GPU"; timeout "$(cap 120)" ./cuda_pool --nocapture "${filters[@]}" >"$logs/cuda_pool.log" 2>&1; grep -E "test result|panicked" -A3 "$logs/cuda_pool.log"
say "CUDA backend vs f64 reference"
PACKINFER_GPU_CASES=${CASES:-100} timeout "$(cap 400)" ./cuda_backend --test-threads=1 --nocapture "${filters[@]}" >"$logs/cuda_backend.log" 2>&1
grep -E "cases|test result|FAIL|panick|profile" "$logs/cuda_backend.log"
[ -n "${ONLY:-}" ] && exit 0
say "compute-sanitizer memcheck / racecheck (representative subset)"
(PACKINFER_GPU_CASES=6 timeout "$(cap 200)" compute-sanitizer --tool memcheck --print-limit 20 ./cuda_backend --test-threads=1 random_batches handmade_plans_packed graph_capture steps_planned_ahead append_kv warp_specialized_kernel_with_tma short_batches fp8_cache custom_masks_on_every_kernel 2>&1) >"$logs/memcheck.log"; grep -E "ERROR SUMMARY|test result" "$logs/memcheck.log"
(PACKINFER_GPU_CASES=3 timeout "$(cap 200)" compute-sanitizer --tool racecheck --print-limit 20 ./cuda_backend --test-threads=1 random_batches handmade_plans_packed warp_specialized_kernel_with_tma short_batches custom_masks_on_every_kernel fp8_cache head_dims_96 graph_capture 2>&1) >"$logs/racecheck.log"; grep -E "RACECHECK SUMMARY|test result" "$logs/racecheck.log"
say "C API stress test on the CUDA backend (random call sequences against a model), then under memcheck"
# The binary finds libpackinfer.so here (its RPATH names the dev machine's target/). Its own
# summary ends in "N calls ... in T s" and a verdict; the full log has each failure's replay.
if [ -x ./packinfer_stress_test ]; then
  (LD_LIBRARY_PATH=$PWD${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH} PACKINFER_STRESS_BACKEND=cuda PACKINFER_STRESS_CALLS=${STRESS_CALLS:-3000000} \
    PACKINFER_STRESS_SECONDS=${STRESS_SECONDS:-60} timeout "$(cap 300)" ./packinfer_stress_test 2>&1) >"$logs/stress_cuda.log"
  grep -E "^  [a-z]|calls \(|passed|FAILED" "$logs/stress_cuda.log"
  (LD_LIBRARY_PATH=$PWD${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH} PACKINFER_STRESS_BACKEND=cuda PACKINFER_STRESS_CALLS=${STRESS_SANITIZER_CALLS:-200000} \
    PACKINFER_STRESS_SECONDS=${STRESS_SANITIZER_SECONDS:-60} PACKINFER_STRESS_ONLY=api,pool,threads,shared-page-rewrite,exhausted-unchanged,fork-comb \
    timeout "$(cap 300)" compute-sanitizer --tool memcheck --print-limit 20 --error-exitcode 99 ./packinfer_stress_test 2>&1) >"$logs/stress_memcheck.log"
  grep -E "ERROR SUMMARY|^  [a-z]|calls \(|passed|FAILED" "$logs/stress_memcheck.log"
else
  echo "packinfer_stress_test not staged here: skipped (see the header for how to stage it)"
fi
say "timing vs FA2 (W1, W2)"
PYTHONUNBUFFERED=1 timeout "$(cap 200)" python3 bench_attention.py ./libpackinfer.so azure_llm_2023_code.csv "$logs/bench.json" 2>&1 | grep -E "^W|Error|error"

#!/usr/bin/env bash
# The CUDA backend's GPU suite, for the device machine (it has no cargo): run from the folder
# bench/stage_gpu_suite.sh fills with the test binaries and the library built on the dev machine:
#   bash bench/stage_gpu_suite.sh            (fills .gpu-cuda, git-ignored)
# then on the device: bash .gpu-cuda/gpu_suite.sh, carry [".gpu-cuda"] (logs and JSON under $OUT,
# or ./gpu-results). ONLY=name,name runs just the cuda_backend and cuda_pool tests whose names
# contain one of them, and the C ABI tests (and skips the rest).
set -uo pipefail
cd "$(dirname "$0")"
out="${OUT:-./gpu-results}"
mkdir -p "$out"
export PACKINFER_TEST_CACHE_DIR=/tmp/pkcache PACKINFER_CACHE_DIR=/tmp/pkcache RUST_BACKTRACE=1
# Here a GPU test without a usable device is a failure, not "ignored" (a lost or broken device
# would otherwise read as a suite with nothing wrong).
export PACKINFER_REQUIRE_GPU=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$out/device.txt"; date -u | tee -a "$out/device.txt"
if [ -n "${ONLY:-}" ]; then
  echo "== only cuda_backend and cuda_pool tests matching: $ONLY (and the C ABI tests)"
  timeout 120 ./cuda_ffi --nocapture 2>&1 | tee "$out/cuda_ffi.log" | grep -E "test result|panicked" -A3
  # shellcheck disable=SC2086 # ONLY is a list of test-name filters
  timeout 120 ./cuda_pool --nocapture ${ONLY//,/ } 2>&1 | tee "$out/cuda_pool.log" | grep -E "test result|panicked" -A3
  # shellcheck disable=SC2086 # ONLY is a list of test-name filters
  PACKINFER_GPU_CASES=${CASES:-300} timeout 500 ./cuda_backend --test-threads=1 --nocapture ${ONLY//,/ } 2>&1 | tee "$out/cuda_backend.log" | grep -E "cases|test result|FAIL|panick"
  exit 0
fi
echo "== C ABI"; timeout 120 ./cuda_ffi --nocapture 2>&1 | tee "$out/cuda_ffi.log" | grep -E "test result|panicked" -A3
echo "== managed pool on the GPU"; timeout 120 ./cuda_pool --nocapture 2>&1 | tee "$out/cuda_pool.log" | grep -E "test result|panicked" -A3
echo "== CUDA backend vs f64 reference"
PACKINFER_GPU_CASES=${CASES:-300} timeout 400 ./cuda_backend --test-threads=1 --nocapture 2>&1 | tee "$out/cuda_backend.log" | grep -E "cases|test result|FAIL|panick|profile"
echo "== compute-sanitizer memcheck / racecheck (representative subset)"
(PACKINFER_GPU_CASES=6 timeout 200 compute-sanitizer --tool memcheck --print-limit 20 ./cuda_backend --test-threads=1 random_batches handmade_plans_packed graph_capture steps_planned_ahead append_kv warp_specialized_kernel_with_tma short_batches fp8_cache 2>&1) > "$out/memcheck.log"; grep -E "ERROR SUMMARY|test result" "$out/memcheck.log"
(PACKINFER_GPU_CASES=3 timeout 200 compute-sanitizer --tool racecheck --print-limit 20 ./cuda_backend --test-threads=1 random_batches handmade_plans_packed warp_specialized_kernel_with_tma short_batches 2>&1) > "$out/racecheck.log"; grep -E "RACECHECK SUMMARY|test result" "$out/racecheck.log"
echo "== C API stress test on the CUDA backend (random call sequences against a model), then under memcheck"
# The binary finds libpackinfer.so here (its RPATH names the dev machine's target/). Its own
# summary ends in "N calls ... in T s" and a verdict; the full log has each failure's replay.
if [ -x ./packinfer_stress_test ]; then
  (LD_LIBRARY_PATH=$PWD${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH} PACKINFER_STRESS_BACKEND=cuda PACKINFER_STRESS_CALLS=${STRESS_CALLS:-3000000} \
    PACKINFER_STRESS_SECONDS=${STRESS_SECONDS:-240} timeout 900 ./packinfer_stress_test 2>&1) > "$out/stress_cuda.log"
  grep -E "^  [a-z]|calls \(|passed|FAILED" "$out/stress_cuda.log"
  (LD_LIBRARY_PATH=$PWD${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH} PACKINFER_STRESS_BACKEND=cuda PACKINFER_STRESS_CALLS=${STRESS_SANITIZER_CALLS:-200000} \
    PACKINFER_STRESS_SECONDS=${STRESS_SANITIZER_SECONDS:-300} PACKINFER_STRESS_ONLY=api,pool,threads,shared-page-rewrite,exhausted-unchanged,fork-comb \
    timeout 900 compute-sanitizer --tool memcheck --print-limit 20 --error-exitcode 99 ./packinfer_stress_test 2>&1) > "$out/stress_memcheck.log"
  grep -E "ERROR SUMMARY|^  [a-z]|calls \(|passed|FAILED" "$out/stress_memcheck.log"
else
  echo "packinfer_stress_test not staged here: skipped (see the header for how to stage it)"
fi
echo "== timing vs FA2 (W1, W2)"
PYTHONUNBUFFERED=1 timeout 200 python3 bench_attention.py ./libpackinfer.so azure_llm_2023_code.csv "$out/bench.json" 2>&1 | grep -E "^W|Error|error"

#!/usr/bin/env bash
# Fills the folder that travels to the GPU machine with the CUDA test suite (bench/gpu_suite.sh):
#
#     bash bench/stage_gpu_suite.sh [STAGE]     (STAGE: default .gpu-cuda in the checkout, git-ignored)
#
# It builds the GPU test binaries (cuda_backend, cuda_pool, cuda_ffi: the device machine has no
# cargo), the library and, when build/ctest exists, the C API stress test, and copies them with
# gpu_suite.sh, bench_attention.py, the trace and COMMIT into STAGE, stripped of debug info.
# Then one device call runs it: `bash .gpu-cuda/gpu_suite.sh` with carry [".gpu-cuda"].
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
stage=${1:-$root/.gpu-cuda}
shared=${SHARED:-$root/../shared}
[ -d "$shared" ] || shared=/work/shared
cd "$root"
# The path of test binary $2 of package $1, built if needed.
test_binary() {
  cargo test --release -p "$1" --test "$2" --no-run --message-format=json 2>/dev/null | python3 -c '
import json, sys
name = sys.argv[1]
paths = [m["executable"] for m in map(json.loads, sys.stdin)
         if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == name]
print(paths[-1] if paths else "")' "$2"
}
rm -rf "$stage"
mkdir -p "$stage"
for t in packinfer:cuda_backend packinfer:cuda_pool packinfer-capi:cuda_ffi; do
  f=$(test_binary "${t%%:*}" "${t##*:}")
  [ -n "$f" ] || { echo "stage_gpu_suite: could not build ${t##*:}" >&2; exit 1; }
  cp "$f" "$stage/${t##*:}"
done
cargo build --release -p libpackinfer
cp target/release/libpackinfer.so bench/bench_attention.py bench/gpu_suite.sh "$stage/"
# The C API stress test links the library dynamically (it runs against the staged one): from
# this checkout's build/ctest, else PACKINFER_STRESS_TEST (e.g. the main checkout's, for a
# worktree that never ran tests/run_all.sh).
if [ -d build/ctest ]; then
  cmake --build build/ctest --target packinfer_stress_test -j"$(nproc)" >/dev/null
  cp build/ctest/bindings/cpp/tests/packinfer_stress_test "$stage/"
elif [ -x "${PACKINFER_STRESS_TEST:-}" ]; then
  cp "$PACKINFER_STRESS_TEST" "$stage/"
else
  echo "stage_gpu_suite: no build/ctest (run tests/run_all.sh once) and no PACKINFER_STRESS_TEST: the stress test is not staged"
fi
cp "$shared/traces/azure_llm_2023_code.csv" "$stage/"
strip --strip-debug "$stage"/cuda_* "$stage/libpackinfer.so" "$stage"/packinfer_stress_test 2>/dev/null || true
git rev-parse --short HEAD >"$stage/COMMIT"
du -sh "$stage"

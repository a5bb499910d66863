#!/usr/bin/env bash
# Fills the folder that travels to the GPU machine with everything the benchmark needs:
#
#     bash bench/stage_gpu.sh [STAGE]     (STAGE: the .gpu-bench folder of the main checkout, git-ignored there)
#
# It builds the library (cargo build --release), then copies into STAGE: bench/ (harness),
# libpackinfer.so (stripped of debug info), the trace, the FlashInfer wheel (built once by
# ../shared/tools/flashinfer-wheel.sh into STAGE/wheels) and COMMIT (this checkout's HEAD).
# PACKINFER_LIB=path/to/libpackinfer.so and PACKINFER_COMMIT="text" use a library built
# elsewhere (e.g. from a merge of several branches) instead, and say what it was built from.
# Then one device call runs it: `bash .gpu-bench/bench/run_gpu.sh` with carry [".gpu-bench"].
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
stage=${1:?usage: bench/stage_gpu.sh STAGE_DIR, the main checkout .gpu-bench folder}
shared=${SHARED:-$root/../shared}
[ -d "$shared" ] || shared=/work/shared
mkdir -p "$stage/wheels"
lib=${PACKINFER_LIB:-}
if [ -z "$lib" ]; then
  (cd "$root" && cargo build --release)
  lib="$root/target/release/libpackinfer.so"
fi
bash "$shared/tools/flashinfer-wheel.sh" "$stage/wheels"
rm -rf "$stage/bench"
mkdir -p "$stage/bench"
cp "$root"/bench/*.py "$root"/bench/run_gpu.sh "$stage/bench/"
cp "$lib" "$stage/libpackinfer.so"
strip --strip-debug "$stage/libpackinfer.so" 2>/dev/null || true
cp "$shared/traces/azure_llm_2023_code.csv" "$stage/"
if [ -n "${PACKINFER_COMMIT:-}" ]; then
  echo "$PACKINFER_COMMIT" >"$stage/COMMIT"
else
  git -C "$root" rev-parse HEAD >"$stage/COMMIT"
  if ! git -C "$root" diff --quiet HEAD; then echo "$(cat "$stage/COMMIT")+uncommitted" >"$stage/COMMIT"; fi
fi
du -sh "$stage"

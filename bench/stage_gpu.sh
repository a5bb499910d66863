#!/usr/bin/env bash
# Fills the folder that travels to the GPU machine with everything the benchmark needs:
#
#     bash bench/stage_gpu.sh [STAGE]     (STAGE: the .gpu-bench folder of the main checkout, git-ignored there)
#
# It builds the library (cargo build --release), then copies into STAGE: bench/ (harness),
# libpackinfer.so (stripped of debug info), the trace, the anchors (FlashInfer slimmed to
# attention, FlashAttention-3, their deps: bench/fetch_anchors.sh into STAGE/anchors, ~40 MB)
# and COMMIT (this checkout's HEAD). It fails if STAGE exceeds 60 MiB (a device call takes 64).
# PACKINFER_LIB=path/to/libpackinfer.so and PACKINFER_COMMIT="text" use a library built
# elsewhere (e.g. from a merge of several branches) instead, and say what it was built from.
# Then one device call runs it: `bash .gpu-bench/bench/run_anchors.sh` with carry [".gpu-bench"].
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
stage=${1:?usage: bench/stage_gpu.sh STAGE_DIR, the main checkout .gpu-bench folder}
shared=${SHARED:-$root/../shared}
[ -d "$shared" ] || shared=/work/shared
mkdir -p "$stage"
lib=${PACKINFER_LIB:-}
if [ -z "$lib" ]; then
  (cd "$root" && cargo build --release)
  lib="$root/target/release/libpackinfer.so"
fi
rm -rf "$stage/wheels"  # the FlashInfer 0.2.14 wheel of older stages
[ -f "$stage/anchors/MANIFEST.json" ] && [ -z "${REFETCH_ANCHORS:-}" ] || bash "$root/bench/fetch_anchors.sh" "$stage/anchors"
rm -rf "$stage/bench"
mkdir -p "$stage/bench"
cp "$root"/bench/*.py "$root"/bench/run_gpu.sh "$root"/bench/run_anchors.sh "$root"/bench/run_replay_anchors.sh "$root"/bench/anchors_env.sh "$stage/bench/"
cp "$lib" "$stage/libpackinfer.so"
strip --strip-debug "$stage/libpackinfer.so" 2>/dev/null || true
# The replay tool, for run_replay_anchors.sh (issue 19); built with the library above, or from
# PACKINFER_REPLAY=path/to/packinfer-replay beside PACKINFER_LIB.
replay=${PACKINFER_REPLAY:-}
if [ -z "$replay" ] && [ -z "${PACKINFER_LIB:-}" ]; then replay="$root/target/release/packinfer-replay"; fi
if [ -n "$replay" ]; then
  cp "$replay" "$stage/packinfer-replay"
  strip --strip-debug "$stage/packinfer-replay" 2>/dev/null || true
fi
cp "$shared/traces/azure_llm_2023_code.csv" "$stage/"
if [ -n "${PACKINFER_COMMIT:-}" ]; then
  echo "$PACKINFER_COMMIT" >"$stage/COMMIT"
else
  git -C "$root" rev-parse HEAD >"$stage/COMMIT"
  if ! git -C "$root" diff --quiet HEAD; then echo "$(cat "$stage/COMMIT")+uncommitted" >"$stage/COMMIT"; fi
fi
size=$(du -sbL "$stage" | cut -f1)
echo "staged: $(du -sh "$stage" | cut -f1) ($size bytes) in $stage"
if [ "$size" -gt $((60 << 20)) ]; then
  echo "stage_gpu: $stage is over 60 MiB: a device call carries 64 MiB in all" >&2
  exit 1
fi

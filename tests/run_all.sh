#!/usr/bin/env bash
# Runs every test in the repository. The README's test command; .ci/run calls exactly this.
# Each suite prints its own summary; the script stops at the first failing suite.
set -euo pipefail
cd "$(dirname "$0")/.."

# --- CUDA kernels (issue 6): NVRTC from NVIDIA's PyPI wheel, so CI compiles every kernel variant
# for sm_80 and sm_90a without a GPU. CI sets PACKINFER_REQUIRE_NVRTC=1: then a missing NVRTC makes
# tests/kernels_compile.rs fail instead of skip. GPU tests (tests/cuda_*.rs) skip without a GPU.
if [ "${PACKINFER_REQUIRE_NVRTC:-0}" = 1 ]; then
  echo "== CUDA: installing the pinned nvidia-cuda-nvrtc wheel =="
  nvrtc_lib="$(.ci/install-nvrtc.sh)"
  export LD_LIBRARY_PATH="$nvrtc_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  echo "libnvrtc from $nvrtc_lib"
fi
# --- end CUDA kernels

echo "== Rust: cargo test (CPU reference, planner, ffi, kernels compile check) =="
cargo test --release --all-targets

echo "== Header: include/packinfer.h must match what the build generates =="
if ! git diff --quiet -- include/packinfer.h 2>/dev/null; then
  echo "include/packinfer.h is stale: the build regenerated it differently from the committed one:" >&2
  git --no-pager diff --stat -- include/packinfer.h >&2
  exit 1
fi

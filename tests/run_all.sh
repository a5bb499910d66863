#!/usr/bin/env bash
# Runs every test in the repository. The README's test command; .ci/run calls exactly this.
# Each suite prints its own summary; the script stops at the first failing suite.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== Rust: cargo test (CPU reference, planner, ffi, kernels compile check) =="
cargo test --release --all-targets

echo "== Header: include/packinfer.h must match what the build generates =="
if ! git diff --quiet -- include/packinfer.h 2>/dev/null; then
  echo "include/packinfer.h is stale: the build regenerated it differently from the committed one:" >&2
  git --no-pager diff --stat -- include/packinfer.h >&2
  exit 1
fi

# --- bench (issue 7): the benchmark harness's ctypes layer and workload construction --------
# Struct layouts against the header (compiled with cc), a paged batch through ctypes on the CPU
# backend against a float64 reference, error statuses, W1-W5 as DESIGN.md section 9 defines them.
echo "== Bench: bench/test_packinfer_ctypes.py (ctypes layer vs header, CPU backend, workloads) =="
cargo build --release
python3 -c 'import numpy' 2>/dev/null || python3 -m pip install -q numpy
python3 bench/test_packinfer_ctypes.py target/release/libpackinfer.so

#!/usr/bin/env bash
# Runs every test in the repository. The README's test command; .ci/run calls exactly this.
# Each suite prints its own summary; the script stops at the first failing suite.
set -euo pipefail
cd "$(dirname "$0")/.."

# --- CUDA kernels (issue 6): NVRTC from NVIDIA's PyPI wheel, so CI compiles every kernel variant
# for sm_80 and sm_90a without a GPU. CI sets PACKINFER_REQUIRE_NVRTC=1: then a missing NVRTC makes
# tests/kernels_compile.rs fail instead of being reported ignored. GPU tests (tests/cuda_*.rs) are
# reported ignored without a GPU; PACKINFER_REQUIRE_GPU=1 (bench/gpu_suite.sh) makes them fail.
if [ "${PACKINFER_REQUIRE_NVRTC:-0}" = 1 ]; then
  echo "== CUDA: installing the pinned nvidia-cuda-nvrtc wheel =="
  nvrtc_lib="$(.ci/install-nvrtc.sh)"
  export LD_LIBRARY_PATH="$nvrtc_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  echo "libnvrtc from $nvrtc_lib"
fi
# --- end CUDA kernels

# ---- Hygiene gates: formatting, lints, docs, the lockfile and the minimum Rust version --------
# rustfmt and clippy come with rustup's default profile; the MSRV toolchain is installed once.
echo "== Rust: cargo fmt --check, clippy -D warnings, rustdoc -D warnings, --locked =="
cargo fmt --all --check
cargo clippy --locked --workspace --all-targets -- -D warnings
RUSTDOCFLAGS=-Dwarnings cargo doc --locked --workspace --no-deps --quiet
msrv=$(sed -n 's/^rust-version = "\(.*\)"$/\1/p' Cargo.toml)
echo "== Rust: the workspace builds with its rust-version ($msrv) and the committed lockfile =="
rustup toolchain list | grep -q "^$msrv" || rustup toolchain install "$msrv" --profile minimal
CARGO_TARGET_DIR=target/msrv cargo "+$msrv" check --locked --workspace --all-targets --quiet
echo "MSRV $msrv: ok"

echo "== Rust: cargo test (CPU reference, planner, ffi, kernels compile check) =="
cargo test --locked --release --workspace --all-targets -- --skip every_variant_compiles_for_sm80_and_sm90a
echo "== CUDA kernels: every variant compiled by NVRTC for sm_80 and sm_90a (registers, spills) =="
cargo test --release -p packinfer --test kernels_compile -- --nocapture every_variant_compiles_for_sm80_and_sm90a

echo "== Header: include/packinfer.h must match what the build generates =="
if ! git diff --quiet -- include/packinfer.h 2>/dev/null; then
  echo "include/packinfer.h is stale: the build regenerated it differently from the committed one:" >&2
  git --no-pager diff --stat -- include/packinfer.h >&2
  exit 1
fi

# ---- C and C++ (bindings/cpp): ctest, normal and sanitizer builds ----------------------------
# Needs cmake, g++, GoogleTest and pkg-config (.ci/install-deps.sh installs what is missing).
# Both builds link the release libpackinfer.so that cargo builds (CMake runs cargo itself).
# PACKINFER_BUILD_TESTS=ON is explicit: its default is OFF where GoogleTest is missing, and here a
# missing GoogleTest must fail the run, not drop the C++ tests.
echo "== C/C++: ctest (C API, C++ wrapper, example, install + find_package + pkg-config) =="
cmake -S . -B build/ctest -DPACKINFER_BUILD_TESTS=ON -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build build/ctest -j"$(nproc)"
(cd build/ctest && ctest --output-on-failure --no-tests=error)

echo "== C/C++: ctest with -fsanitize=address,undefined (same tests, leak checks on) =="
cmake -S . -B build/ctest-sanitize -DPACKINFER_BUILD_TESTS=ON -DPACKINFER_SANITIZE=ON -DCMAKE_BUILD_TYPE=Debug >/dev/null
cmake --build build/ctest-sanitize -j"$(nproc)"
(cd build/ctest-sanitize && ctest --output-on-failure --no-tests=error)

# ---- Go (bindings/go): go vet + go test ------------------------------------------------------
# cgo links target/release/libpackinfer.so (built above; cargo is a no-op when it is current).
echo "== Go: go vet + go test in bindings/go =="
cargo build --release -p libpackinfer
go_log=$(mktemp)
(
  cd bindings/go
  export GOTOOLCHAIN=local CGO_ENABLED=1
  go vet ./...
  go test -count=1 -v -bench . -benchtime 20x ./... 2>&1 | tee "$go_log"
  go run ./examples/enginestep >/dev/null
  go run ./examples/managedstep >/dev/null
)
go_passed=$(grep -c -- '^--- PASS' "$go_log" || true)
go_failed=$(grep -c -- '^--- FAIL' "$go_log" || true)
rm -f "$go_log"
if [ "$go_passed" -eq 0 ] || [ "$go_failed" -ne 0 ]; then
  echo "go test: $go_passed tests passed, $go_failed failed; bindings/go must run tests and pass them all" >&2
  exit 1
fi
echo "Go: $go_passed passed, 0 failed"

# The Go package against the installed library through pkg-config (the ctest install check
# above left an installed prefix in build/ctest).
echo "== Go: bindings/go against the installed library (-tags packinfer_pkgconfig) =="
go_log=$(mktemp)
(
  cd bindings/go
  export GOTOOLCHAIN=local CGO_ENABLED=1
  export PKG_CONFIG_PATH="$PWD/../../build/ctest/bindings/cpp/tests/install-test/prefix/lib/pkgconfig"
  go test -count=1 -v -tags packinfer_pkgconfig -run 'TestFlows|TestUseAfterClose|TestPoolManagedFlow' . 2>&1 | tee "$go_log"
)
go_passed=$(grep -c -- '^--- PASS' "$go_log" || true)
go_failed=$(grep -c -- '^--- FAIL' "$go_log" || true)
rm -f "$go_log"
if [ "$go_passed" -ne 3 ] || [ "$go_failed" -ne 0 ]; then
  echo "go test against the installed library: $go_passed passed, $go_failed failed; want 3 passed" >&2
  exit 1
fi
echo "Go: $go_passed passed, 0 failed"

# --- bench (issue 7): the benchmark harness's ctypes layer and workload construction --------
# Struct layouts against the header (compiled with cc), a paged batch through ctypes on the CPU
# backend against a float64 reference, the managed pool (W4 forks), error statuses, W1-W5 as
# docs/workloads.md defines them. The binding follows the header of main + plan + cuda.
echo "== Bench: bench/test_packinfer_ctypes.py (ctypes layer vs header, CPU backend, workloads) =="
cargo build --release
python3 -c 'import numpy' 2>/dev/null || python3 -m pip install -q numpy
python3 bench/test_packinfer_ctypes.py target/release/libpackinfer.so
echo "== Bench: bench/test_report.py (report and README table from a synthetic run, anchors helpers) =="
python3 bench/test_report.py
# Index plumbing of every FlashInfer / FA3 contender against fake kernels (needs torch, CPU build
# enough; reported skipped where torch is absent).
python3 bench/test_anchors_plumbing.py
echo "== Bench: bench/test_replay_anchors.py (--record-batches files, TTFT/TBT timeline, dry run) =="
# Reads recordings the replay binary writes (cargo build --release above built it) and replays one
# through PackInfer's CPU backend and fake FlashInfer/FA kernels (numpy stands in for torch).
python3 bench/test_replay_anchors.py target/release/libpackinfer.so

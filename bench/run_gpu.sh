#!/usr/bin/env bash
# The whole GPU benchmark in one device call. Run from the staged folder (bench/stage_gpu.sh
# fills it: bench/*.py, this script, libpackinfer.so, the trace, the FlashInfer wheel, COMMIT):
#
#     bash .gpu-bench/bench/run_gpu.sh            (results go to $OUT, default /tmp/packinfer_out)
#
# Steps: install the FlashInfer wheel into /tmp/site; start FlashInfer's JIT builds in the
# background (they take minutes and only need the CPU); measure the ceilings, FA2 and FlashInfer
# ("anchors" process); then PackInfer on the same tensors ("ours" process, separate so that a
# fault there cannot lose the anchors' numbers); then the report (results.md, PNGs).
# The anchors get 400 s (ANCHORS_TIMEOUT): on an H200 FlashInfer's ragged-prefill JIT took 112 s
# and its W1 number came 200 s into the phase, so 270 s cut its W3-W5 (2026-11-27); give the call
# the device tool's whole 600 s.
set -u
bench=$(cd "$(dirname "$0")" && pwd)
stage=$(dirname "$bench")
out=${OUT:-/tmp/packinfer_out}
mkdir -p "$out"
log="$out/run.log"
export PYTHONUNBUFFERED=1 FLASHINFER_CUDA_ARCH_LIST=9.0 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PACKINFER_COMMIT=$(cat "$stage/COMMIT" 2>/dev/null || echo unknown)
export PACKINFER_CACHE_DIR=/tmp/packinfer_kernels
trace="$stage/azure_llm_2023_code.csv"
lib="$stage/libpackinfer.so"
{
  echo "== $(date -u +%FT%TZ) packinfer bench, commit $PACKINFER_COMMIT"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv 2>&1
  python3 -m pip install -q --no-index --no-deps --target /tmp/site "$stage"/wheels/*.whl 2>&1 | tail -3
} >>"$log"
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
rm -rf /tmp/packinfer_bench
for kind in prefill decode decode-tc cascade; do
  timeout 250 python3 "$bench/gpu_bench.py" --phase "warm-$kind" >>"$out/warm.log" 2>&1 &
done
echo "== anchors $(date -u +%T)" >>"$log"
timeout "${ANCHORS_TIMEOUT:-400}" python3 "$bench/gpu_bench.py" --phase anchors --out "$out" --trace "$trace" 2>&1 | tee -a "$log"
echo "== ours $(date -u +%T)" >>"$log"
timeout "${OURS_TIMEOUT:-120}" python3 "$bench/gpu_bench.py" --phase ours --out "$out" --trace "$trace" --lib "$lib" 2>&1 | tee -a "$log"
echo "== report $(date -u +%T)" >>"$log"
python3 "$bench/gpu_bench.py" --phase report --out "$out" >>"$log" 2>&1
wait
echo "== done $(date -u +%T)" >>"$log"
cat "$out/results.md" 2>/dev/null

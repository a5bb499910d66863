#!/usr/bin/env bash
# The whole GPU benchmark against today's anchors in one device call of at most ~9 minutes. Run
# from the folder bench/stage_gpu.sh fills (bench/, libpackinfer.so, the trace, anchors/, COMMIT):
#
#     bash .gpu-bench/bench/run_anchors.sh        (carry [".gpu-bench"]; results under $OUT)
#
# Timeline (seconds from the start; every step has its own time limit, so the call ends by
# BUDGET_S whatever fails, and every phase writes results.json as it goes):
#   0    unpack anchors/*.tar.xz into /tmp/anchors; pick the FlashInfer that imports (0.7.x, else
#        the fallback 0.5.3): `anchors.py probe`
#   ~20  FlashInfer JIT builds start in the background, WARM_PARALLEL at a time with MAX_JOBS each,
#        most needed module first (anchors.MODULES); none runs past WARM_BUDGET_S
#   ~20  PackInfer ("ours": the GPU is free while nvcc uses the CPU; no JIT), OURS_TIMEOUT at most
#   then anchors: ceilings, FA2 and FA3 on W1-W7, then each FlashInfer (workload, module) as its
#        module is built; a module still building at WARM_BUDGET_S is recorded "not compiled";
#        a CUDA fault ends that process (exit 3) and a new one resumes after the faulting unit
#   BUDGET_S - FEATURES_S - PLANNING_S - REPORT_S: the serving features (W1 with a sliding
#        window, W2 with a soft-cap: PackInfer, FA2, FA3, and FlashInfer where the warm-up built
#        its window / soft-cap modules, anchors.FEATURE_MODULES), FEATURES_S at most
#   BUDGET_S - PLANNING_S - REPORT_S: host planning time with the CPU idle (ours and anchors')
#   then the report (results.md, PNGs)
# $OUT gets at most 6 files: run.log, warm.log, results.json, results.md and two PNGs.
set -u
T0=$(date +%s)
bench=$(cd "$(dirname "$0")" && pwd)
stage=$(dirname "$bench")
out=${OUT:-/tmp/packinfer_out}
mkdir -p "$out"
BUDGET_S=${BUDGET_S:-525}
WARM_BUDGET_S=${WARM_BUDGET_S:-330}
WARM_PARALLEL=${WARM_PARALLEL:-4}
WARM_JOBS=${WARM_JOBS:-6}
WARM_MIN_START_S=${WARM_MIN_START_S:-45}  # no new build with less time than this left
OURS_TIMEOUT=${OURS_TIMEOUT:-170}
PLANNING_S=${PLANNING_S:-45}
FEATURES_S=${FEATURES_S:-60}  # the sliding-window and soft-cap variants (gpu_bench.py --phase features); 0: none
REPORT_S=${REPORT_S:-20}
log="$out/run.log"
exec > >(tee -a "$log") 2>&1
. "$bench/anchors_env.sh"
export PACKINFER_ANCHORS_MANIFEST="$stage/anchors/MANIFEST.json"
export PACKINFER_ANCHORS_END=$((T0 + BUDGET_S - FEATURES_S - PLANNING_S - REPORT_S))
trace="$stage/azure_llm_2023_code.csv"
lib="$stage/libpackinfer.so"
rm -rf /tmp/packinfer_bench

say "packinfer anchors bench, commit $PACKINFER_COMMIT, $(date -u +%FT%TZ)"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv 2>&1
nproc
[ -f "$stage/anchors/MANIFEST.json" ] && cat "$stage/anchors/MANIFEST.json"
anchors_unpack
python3 -c "import sys; print('sys.path:', sys.path)"

# FlashInfer JIT builds, in the background.
# WARM_MODULES="pod batch-pod": build only these, in this order (e.g. a call that gives POD and
# BatchPOD, whose builds take over 5 minutes, the whole warm-up). The serving features' modules
# come last in the default order, so a call that measures FlashInfer on W1-window and W2-softcap
# names them: WARM_MODULES="ragged-fa2-window ragged-fa3-window decode-tc-softcap
# batch-attention-softcap decode-softcap" (bench/README.md).
modules=${WARM_MODULES:-$(cd "$bench" && python3 -c "import anchors; print(' '.join(anchors.MODULES))")}
warm_all() {
  for m in $modules; do
    while [ "$(jobs -rp | wc -l)" -ge "$WARM_PARALLEL" ]; do sleep 1; done
    t=$(left_until "$WARM_BUDGET_S")
    if [ "$t" -le "$WARM_MIN_START_S" ]; then
      echo "[warm] $m: not started, the warm-up budget ($WARM_BUDGET_S s) is spent"
      continue
    fi
    echo "[warm] $m: start at $(elapsed) s, $t s left"
    # timeout signals its whole process group: ninja and nvcc stop with it.
    MAX_JOBS=$WARM_JOBS timeout -k 5 "$t" python3 "$bench/gpu_bench.py" --phase "warm-$m" &
  done
  wait
  echo "[warm] all done at $(elapsed) s"
}
warm_all >>"$out/warm.log" 2>&1 &
warm_pid=$!

say "ours (PackInfer) for at most $OURS_TIMEOUT s"
timeout -k 10 "$OURS_TIMEOUT" python3 "$bench/gpu_bench.py" --phase ours --no-planning --out "$out" --trace "$trace" \
  --lib "$lib"
say "ours: rc $?"

for attempt in 1 2 3 4; do
  t=$(left_until $((BUDGET_S - FEATURES_S - PLANNING_S - REPORT_S)))
  [ "$t" -gt 15 ] || { say "anchors: no time left for attempt $attempt"; break; }
  say "anchors, attempt $attempt, at most $t s"
  timeout -k 10 "$t" python3 "$bench/gpu_bench.py" --phase anchors --out "$out" --trace "$trace"
  rc=$?
  say "anchors: rc $rc"
  [ "$rc" = 3 ] || break  # 3: a CUDA fault ended the process; resume in a new one
done
wait "$warm_pid" 2>/dev/null
say "warm-up markers: $(cd "$PACKINFER_WARM_DIR" && for f in *.ok *.err; do [ -e "$f" ] && printf '%s ' "$f"; done)"

t=$(left_until $((BUDGET_S - PLANNING_S - REPORT_S)))
if [ "$FEATURES_S" -gt 0 ] && [ "$t" -gt 10 ]; then
  say "features (window, soft-cap), at most $t s"
  # FlashInfer units left when its end comes are recorded as not run (before the timeout kills it).
  PACKINFER_FEATURES_END=$((T0 + BUDGET_S - PLANNING_S - REPORT_S - 5)) timeout -k 5 "$t" \
    python3 "$bench/gpu_bench.py" --phase features --out "$out" --trace "$trace" --lib "$lib"
  say "features: rc $?"
fi
t=$(left_until $((BUDGET_S - REPORT_S)))
if [ "$t" -gt 5 ]; then
  say "planning, at most $t s"
  timeout -k 5 "$t" python3 "$bench/gpu_bench.py" --phase planning --out "$out" --trace "$trace" --lib "$lib"
  say "planning: rc $?"
fi
say "report"
timeout -k 5 "$REPORT_S" python3 "$bench/gpu_bench.py" --phase report --out "$out" >/dev/null 2>&1 ||
  timeout 10 python3 "$bench/report.py" "$out/results.json" >/dev/null 2>&1
say "done"
cat "$out/results.md" 2>/dev/null | head -60
sleep 1  # let tee write the last lines to run.log

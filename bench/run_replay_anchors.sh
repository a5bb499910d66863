#!/usr/bin/env bash
# The serving replay against FlashInfer and FlashAttention (issue 19), in one device call. Run from
# the folder bench/stage_gpu.sh fills (bench/, libpackinfer.so, packinfer-replay, the trace, anchors/):
#
#     bash .gpu-bench/bench/run_replay_anchors.sh        (carry [".gpu-bench"]; results under $OUT)
#
# 1. unpacks the anchors and picks the FlashInfer that imports (as run_anchors.sh does);
# 2. builds FlashInfer's JIT modules the replay needs (tensor-core decode, BatchAttention) in the
#    background, no longer than WARM_BUDGET_S;
# 3. meanwhile packinfer-replay replays the trace on the GPU with --record-batches (PackInfer and
#    the baseline; REQUESTS, ARRIVALS, REPLAY_ARGS), its own files in $OUT/replay.tar.xz;
# 4. bench/replay_anchors.py replays the recorded steps through PackInfer, FlashInfer's best API
#    per step, FA3 varlen and FA2 varlen ($OUT/replay_anchors.json, .png); MAX_STEPS limits it.
# Environment: REQUESTS (1000), ARRIVALS (all|trace), REPLAY_ARGS (more replay options, e.g.
# "--speedup 4"), TRACE (the staged code trace; "synthetic": the replay's built-in trace),
# MAX_STEPS (0: all), CONTENDERS (packinfer,flashinfer,fa3,fa2), BUDGET_S (560; the seconds from the
# start by which the replay must end: REPLAY_BUDGET_S, BUDGET_S - 200).
set -u
T0=$(date +%s)
bench=$(cd "$(dirname "$0")" && pwd)
stage=$(dirname "$bench")
out=${OUT:-/tmp/packinfer_out}
mkdir -p "$out"
BUDGET_S=${BUDGET_S:-560}
WARM_BUDGET_S=${WARM_BUDGET_S:-330}
REQUESTS=${REQUESTS:-1000}
ARRIVALS=${ARRIVALS:-all}
REPLAY_ARGS=${REPLAY_ARGS:-}
MAX_STEPS=${MAX_STEPS:-0}
REPLAY_BUDGET_S=${REPLAY_BUDGET_S:-$((BUDGET_S - 200))}
CONTENDERS=${CONTENDERS:-packinfer,flashinfer,fa3,fa2}
TRACE=${TRACE:-$stage/azure_llm_2023_code.csv}
log="$out/run.log"
exec > >(tee -a "$log") 2>&1
. "$bench/anchors_env.sh"

say "replay vs anchors, commit $PACKINFER_COMMIT, $(date -u +%FT%TZ)"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1
anchors_unpack

# The replay's host costs (planning, launch updates) count in its totals: the JIT builds get
# their own cores so they do not slow the measured process down.
ncpu=$(nproc)
meas=(); build=()
if [ "$ncpu" -ge 8 ]; then
  meas=(taskset -c 0-3)
  build=(taskset -c "4-$((ncpu - 1))")
fi
# The two FlashInfer modules the replay uses, built while the replay runs.
(
  for m in decode-tc batch-attention; do
    MAX_JOBS=$(((ncpu - 4) / 2 > 1 ? (ncpu - 4) / 2 : 1)) "${build[@]}" timeout -k 5 "$(left_until "$WARM_BUDGET_S")" python3 "$bench/gpu_bench.py" --phase "warm-$m" &
  done
  wait
) >>"$out/warm.log" 2>&1 &
warm_pid=$!

trace_arg=("$TRACE")
[ "$TRACE" = synthetic ] && trace_arg=()
say "packinfer-replay: $REQUESTS requests, arrivals $ARRIVALS ${REPLAY_ARGS}"
# shellcheck disable=SC2086 # REPLAY_ARGS is a list of options
"${meas[@]}" timeout -k 10 "$(left_until "$REPLAY_BUDGET_S")" "$stage/packinfer-replay" "${trace_arg[@]}" --device gpu \
  --requests "$REQUESTS" --arrivals "$ARRIVALS" --record-batches --out /tmp/replay-out $REPLAY_ARGS
say "replay: rc $?"
ls -la /tmp/replay-out

wait "$warm_pid" 2>/dev/null
say "warm-up: $(cd "$PACKINFER_WARM_DIR" && for f in *.ok *.err; do [ -e "$f" ] && printf '%s ' "$f"; done)"
say "replay_anchors.py, at most $(left_until $((BUDGET_S - 10))) s"
"${meas[@]}" timeout -k 10 "$(left_until $((BUDGET_S - 10)))" python3 "$bench/replay_anchors.py" /tmp/replay-out \
  --lib "$stage/libpackinfer.so" --out "$out" --max-steps "$MAX_STEPS" --contenders "$CONTENDERS"
say "replay_anchors: rc $?"
# What comes back is at most 8 files of 16 MiB: the replay's own files in one tarball, the
# recordings PackInfer and the anchors replayed in another where it is small enough.
cp "$out/warm.log" /tmp/replay-out/ 2>/dev/null
tar -C /tmp/replay-out -cJf "$out/replay.tar.xz" --ignore-failed-read summary.csv steps.csv steps.png warm.log
rm -f "$out/warm.log"
tar -C /tmp/replay-out -cf - batches-packinfer.jsonl batches-baseline.jsonl 2>/dev/null | xz -T0 -6 >"$out/batches.tar.xz"
[ "$(stat -c %s "$out/batches.tar.xz")" -lt $((16 << 20)) ] || { say "batches.tar.xz over 16 MiB: not kept"; rm -f "$out/batches.tar.xz"; }
ls -la "$out"
say "done"
sleep 1

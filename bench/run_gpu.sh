#!/usr/bin/env bash
# The older entry point of the one-call GPU benchmark: it now runs bench/run_anchors.sh (the
# anchors of issue 18: FlashInfer's newest APIs, FlashAttention-3, W1-W7). Same staging
# (bench/stage_gpu.sh), same carry [".gpu-bench"], results under $OUT.
exec bash "$(dirname "$0")/run_anchors.sh" "$@"

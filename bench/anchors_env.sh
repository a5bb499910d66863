# Sourced by bench/run_anchors.sh and bench/run_replay_anchors.sh (not run on its own): the
# environment every anchors run needs, and the staged anchors unpacked into $A with the
# FlashInfer that imports (0.7.x, else the 0.5.3 fallback) on PYTHONPATH.
# Expects: T0, stage, bench, WARM_BUDGET_S; defines elapsed, left_until, say, anchors_unpack.
elapsed() { echo $(($(date +%s) - T0)); }
left_until() { echo $((T0 + $1 - $(date +%s))); }
say() { echo "== [$(elapsed) s] $*"; }

export PYTHONUNBUFFERED=1 FLASHINFER_CUDA_ARCH_LIST=9.0 TORCH_CUDA_ARCH_LIST=9.0
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PACKINFER_COMMIT=$(cat "$stage/COMMIT" 2>/dev/null || echo unknown)
export PACKINFER_CACHE_DIR=/tmp/packinfer_kernels
export FLASHINFER_WORKSPACE_BASE=/tmp/flashinfer_ws
export PACKINFER_WARM_DIR=/tmp/packinfer_warm PACKINFER_WARM_BUDGET_S=$WARM_BUDGET_S
export PACKINFER_WARM_DEADLINE=$((T0 + WARM_BUDGET_S))
A=/tmp/anchors

# Unpacks anchors/*.tar.xz into $A and puts the FlashInfer that imports on PYTHONPATH.
anchors_unpack() {
  rm -rf "$A" "$PACKINFER_WARM_DIR"
  mkdir -p "$A" "$PACKINFER_WARM_DIR" "$FLASHINFER_WORKSPACE_BASE"
  local part cand
  for part in flashinfer flashinfer-old common pydeps fa3; do
    mkdir -p "$A/$part"
    if [ -f "$stage/anchors/$part.tar.xz" ]; then
      tar -xJf "$stage/anchors/$part.tar.xz" -C "$A/$part" || echo "unpack of $part.tar.xz failed (rc $?)"
    else
      echo "anchors/$part.tar.xz not staged"
    fi
  done
  say "unpacked: $(du -sh $A | cut -f1)"
  export PACKINFER_PYDEPS=$A/pydeps
  local fi_site=""
  for cand in flashinfer flashinfer-old; do
    say "probe $cand"
    if PYTHONPATH="$A/$cand:$A/common:$A/fa3" timeout 120 python3 "$bench/anchors.py" probe; then
      fi_site=$A/$cand
      break
    fi
  done
  [ -n "$fi_site" ] || { echo "no FlashInfer imports: FlashInfer is recorded as not run"; fi_site=$A/flashinfer; }
  export PACKINFER_FLASHINFER_SITE=$fi_site
  export PYTHONPATH="$fi_site:$A/common:$A/fa3${PYTHONPATH:+:$PYTHONPATH}"
}

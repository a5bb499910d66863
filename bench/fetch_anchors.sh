#!/usr/bin/env bash
# Fetches the benchmark's anchors (FlashInfer, FlashAttention-3) from PyPI and packs them for the
# GPU machine, which has no registry access and takes 64 MiB per call:
#
#     bash bench/fetch_anchors.sh DIR        -> DIR/*.tar.xz + DIR/MANIFEST.json (~40 MB)
#
# Each tarball is a folder ready for PYTHONPATH (what `pip install --no-deps --target` makes),
# xz-compressed (FA3's 105 MB .so is 27 MB as a wheel, 10 MB as xz). bench/run_anchors.sh
# unpacks them under /tmp/anchors on the device.
#   flashinfer.tar.xz     FlashInfer $FLASHINFER_VERSION (default 0.7.4, the newest release),
#                         slimmed by bench/slim_flashinfer.py to attention (101 MB wheel, 680 MB
#                         unpacked -> ~120 MB unpacked)
#   flashinfer-old.tar.xz FlashInfer $FLASHINFER_FALLBACK (0.5.3: ran there on 2026-12-07), used
#                         only if the new one does not import
#   common.tar.xz         apache-tvm-ffi, nvidia-cudnn-frontend (FlashInfer's compiled deps)
#   pydeps.tar.xz         small pure-Python deps FlashInfer imports (tqdm, tabulate, click,
#                         requests, ...): appended to sys.path *after* the machine's own packages
#   fa3.tar.xz            fa3-fwd 0.0.3: FlashAttention-3 forward (hopper/ of Dao-AILab's repo),
#                         built on torch's stable C ABI (aoti_torch_* only, no c10/at symbols) for
#                         CUDA 13 (libcudart.so.13), so it can load with torch 2.11+cu130; no paged KV
# Not staged (MANIFEST.json says why; the benchmark lists them as anchors that could not run):
# sgl-kernel, vllm-flash-attn, flash-attn-4 (see NOT_STAGED below).
# Wheels are cached in $ANCHOR_WHEEL_CACHE (default ~/.cache/packinfer-anchors).
set -euo pipefail
dir=${1:?usage: bench/fetch_anchors.sh DIR}
here=$(cd "$(dirname "$0")" && pwd)
FLASHINFER_VERSION=${FLASHINFER_VERSION:-0.7.4}
FLASHINFER_FALLBACK=${FLASHINFER_FALLBACK:-0.5.3}
TVM_FFI=${TVM_FFI:-0.1.15.post2}
CUDNN_FRONTEND=${CUDNN_FRONTEND:-1.32.0}
FA3_FWD=${FA3_FWD:-0.0.3}
PYDEPS="tqdm==4.67.1 tabulate==0.9.0 click==8.1.8 requests==2.32.3 urllib3==2.3.0 idna==3.10 certifi==2025.1.31 charset-normalizer==3.4.1 nvidia-ml-py==12.570.86 packaging==24.2"
cache=${ANCHOR_WHEEL_CACHE:-$HOME/.cache/packinfer-anchors}
mkdir -p "$dir" "$cache"
dir=$(cd "$dir" && pwd)
py=${PYTHON:-python3}

fetch() {  # fetch NAME==VERSION: the manylinux / py3 wheel for CPython 3.12 x86_64 into $cache
  "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux_2_17_x86_64 -d "$cache" "$1"
}
wheel_of() {  # the cached wheel file of NAME VERSION
  local n=${1//-/_}
  ls "$cache"/"$n"-"$2"-*.whl 2>/dev/null | head -1
}
pack() {  # pack NAME DIR: DIR's contents -> $dir/NAME.tar.xz
  (cd "$2" && find . -name __pycache__ -prune -o -print0 | LC_ALL=C sort -z |
    tar --null --no-recursion -cf - -T - | xz -T0 -6 >"$dir/$1.tar.xz")
  echo "$1.tar.xz: $(du -k "$dir/$1.tar.xz" | cut -f1) KiB"
}
unpack_wheels() {  # unpack_wheels DEST WHEEL...: what pip install --no-deps --target DEST does
  local dest=$1
  shift
  mkdir -p "$dest"
  for w in "$@"; do "$py" -m zipfile -e "$w" "$dest"; done
}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

for spec in "flashinfer-python==$FLASHINFER_VERSION" "flashinfer-python==$FLASHINFER_FALLBACK" \
  "apache-tvm-ffi==$TVM_FFI" "nvidia-cudnn-frontend==$CUDNN_FRONTEND" "fa3-fwd==$FA3_FWD" $PYDEPS; do
  n=${spec%%==*}
  v=${spec##*==}
  [ -n "$(wheel_of "$n" "$v")" ] || fetch "$spec"
  [ -n "$(wheel_of "$n" "$v")" ] || { echo "fetch_anchors: no wheel for $spec in $cache" >&2; exit 1; }
done

# FlashInfer, new: unpack, slim to attention, check that what the attention JIT compiles is there.
unpack_wheels "$work/fi" "$(wheel_of flashinfer-python "$FLASHINFER_VERSION")"
"$py" "$here/slim_flashinfer.py" "$work/fi"
pack flashinfer "$work/fi"
# FlashInfer, fallback (already small).
unpack_wheels "$work/fi_old" "$(wheel_of flashinfer-python "$FLASHINFER_FALLBACK")"
pack flashinfer-old "$work/fi_old"
unpack_wheels "$work/common" "$(wheel_of apache-tvm-ffi "$TVM_FFI")" "$(wheel_of nvidia-cudnn-frontend "$CUDNN_FRONTEND")"
pack common "$work/common"
pyw=()
for spec in $PYDEPS; do pyw+=("$(wheel_of "${spec%%==*}" "${spec##*==}")"); done
unpack_wheels "$work/pydeps" "${pyw[@]}"
pack pydeps "$work/pydeps"
unpack_wheels "$work/fa3" "$(wheel_of fa3-fwd "$FA3_FWD")"
# Record what the FA3 library links against (the device log repeats it next to the load error, if any).
fa3_so=$(find "$work/fa3" -name "_C*.so" | head -1)
fa3_needed=$(readelf -d "$fa3_so" 2>/dev/null | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p' | tr '\n' ' ')
fa3_cxx=$(nm -D --undefined-only "$fa3_so" 2>/dev/null | c++filt | grep -cE "c10::|at::|torch::" || true)
fa3_aoti=$(nm -D --undefined-only "$fa3_so" 2>/dev/null | grep -c aoti_torch || true)
pack fa3 "$work/fa3"

"$py" - "$dir/MANIFEST.json" <<EOF
import json, sys
m = {
  "flashinfer": {"version": "$FLASHINFER_VERSION", "tarball": "flashinfer.tar.xz",
                 "note": "slimmed to attention by bench/slim_flashinfer.py"},
  "flashinfer_fallback": {"version": "$FLASHINFER_FALLBACK", "tarball": "flashinfer-old.tar.xz"},
  "common": {"apache-tvm-ffi": "$TVM_FFI", "nvidia-cudnn-frontend": "$CUDNN_FRONTEND"},
  "pydeps": "$PYDEPS".split(),
  "fa3": {"package": "fa3-fwd", "version": "$FA3_FWD", "module": "fa3_fwd_interface", "tarball": "fa3.tar.xz",
          "links": "$fa3_needed".split(), "torch_cxx_symbols": int("${fa3_cxx:-0}" or 0),
          "aoti_stable_abi_symbols": int("${fa3_aoti:-0}" or 0),
          "build": "fa3_fwd_config.py: forward only, FLASHATTENTION_DISABLE_PAGEDKV (no page_table), no fp16, "
                   "built for torch 2.10 (stable ABI), CUDA 13"},
  "not_staged": {
    "sgl-kernel 0.3.21 (sgl_kernel.flash_attn, FA3 for sm90)":
      "wheel 535 MB (flash_ops.abi3.so alone 852 MB unpacked), over the 64 MiB a device call takes; built for "
      "torch==2.9.1 with its C++ ABI (70 c10/at symbols) and CUDA 12 (libcudart.so.12, libnvrtc.so.12): "
      "would not load with torch 2.11+cu130 either",
    "vllm-flash-attn (vllm's FA3 build)":
      "not published as a wheel of its own: it ships inside the vllm wheel (hundreds of MB) and is built "
      "against the torch version that vllm pins",
    "flash-attn-4 4.0.0b40 (CuTe DSL, sm90 path)":
      "needs nvidia-cutlass-dsl and its CUDA 13 libraries (nvidia-cutlass-dsl-libs-cu13 4.8.1: 92 MB wheel) "
      "plus quack-kernels: does not fit one device call beside FlashInfer and FA3",
  },
}
json.dump(m, open(sys.argv[1], "w"), indent=1)
EOF
du -ck "$dir"/*.tar.xz | tail -1 | awk '{printf "anchors: %.1f MiB\n", $1 / 1024}'

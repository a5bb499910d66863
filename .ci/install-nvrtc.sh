#!/usr/bin/env bash
# Installs NVIDIA's NVRTC wheel from PyPI (pinned) and prints the directory holding libnvrtc.so.13,
# for the kernels_compile test on machines without a GPU or CUDA toolkit:
#   export LD_LIBRARY_PATH="$(.ci/install-nvrtc.sh)${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
# 13.0.88 is the NVRTC of the GPU machine's CUDA 13.0, so CI compiles what the device runs.
# The wheel is installed under target/ (ignored by git; reused when already there).
set -euo pipefail
NVRTC_VERSION=13.0.88
dest="${1:-$(cd "$(dirname "$0")/.." && pwd)/target/nvrtc-$NVRTC_VERSION}"
lib="$dest/nvidia/cu13/lib"
if [ ! -e "$lib/libnvrtc.so.13" ]; then
  python3 -m pip install --quiet --disable-pip-version-check --no-deps --target "$dest" "nvidia-cuda-nvrtc==$NVRTC_VERSION" >&2
fi
test -e "$lib/libnvrtc.so.13" || { echo "nvidia-cuda-nvrtc==$NVRTC_VERSION installed no $lib/libnvrtc.so.13" >&2; exit 1; }
echo "$lib"

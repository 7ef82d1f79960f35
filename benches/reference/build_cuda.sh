#!/usr/bin/env bash
# Builds the CUDA binary on a machine without a GPU and packs it for the device machine
# (the carried tree is limited to 64 MiB): writes medr1-cuda.gz at the repository root.
set -euo pipefail
cd "$(dirname "$0")/../.."
CUDARC_CUDA_VERSION=${CUDARC_CUDA_VERSION:-13000} \
    cargo build --release --features cuda --target-dir target/cuda
strip -o target/cuda/medr1-stripped target/cuda/release/medr1
gzip -9 -c target/cuda/medr1-stripped > medr1-cuda.gz
ls -l medr1-cuda.gz

#!/usr/bin/env bash
# Builds the CUDA binary on a machine without a GPU (about 15 minutes the first time):
# installs a CUDA 13.0 toolkit from PyPI wheels via ../shared/tools/setup-cuda13.sh, then builds
# with the cuda and cudnn features for Hopper (sm_90). The stripped binary lands in .gpu/mcld,
# a git-ignored folder the GPU machine receives through device.run's `carry`. Set
# CARGO_TARGET_DIR to keep the CUDA build apart from the CPU one (features differ).
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(../shared/tools/setup-cuda13.sh)"
cargo build --release --features "${MCLD_CUDA_FEATURES:-cuda,cudnn}" --bin mcld
mkdir -p .gpu
cp "${CARGO_TARGET_DIR:-target}/release/mcld" .gpu/mcld
strip .gpu/mcld
ls -lh .gpu/mcld

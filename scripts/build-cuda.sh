#!/usr/bin/env bash
# Builds the CUDA binary on a machine without a GPU (about 15 minutes the first time):
# installs a CUDA 13.0 toolkit from PyPI wheels via ../shared/tools/setup-cuda13.sh, then builds
# with the cuda and cudnn features for Hopper (sm_90). The stripped binary lands in .gpu/mcld,
# a git-ignored folder the GPU machine receives through device.run's `carry`. Set
# CARGO_TARGET_DIR to keep the CUDA build apart from the CPU one (features differ).
# MCLD_CUDA_FEATURES=cuda,cudnn,nccl adds the NCCL collective (multi-GPU training).
# MCLD_CUDA_TESTS="train ..." also builds those test targets with the same features and copies
# each, stripped, to .gpu/test-NAME (scripts/gpu-check-nccl.sh runs .gpu/test-train).
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(../shared/tools/setup-cuda13.sh)"
features="${MCLD_CUDA_FEATURES:-cuda,cudnn}"
cargo build --release --features "$features" --bin mcld
mkdir -p .gpu
cp "${CARGO_TARGET_DIR:-target}/release/mcld" .gpu/mcld
strip .gpu/mcld
ls -lh .gpu/mcld
for t in ${MCLD_CUDA_TESTS:-}; do
  # cargo names the test executable on stderr: "Executable tests/x/main.rs (PATH)".
  exe=$(cargo test --release --features "$features" --test "$t" --no-run 2>&1 \
    | tee /dev/stderr | sed -n 's/^ *Executable .*(\(.*\))$/\1/p' | tail -1)
  [ -n "$exe" ] || { echo "no executable for test target $t" >&2; exit 1; }
  cp "$exe" ".gpu/test-$t"
  strip ".gpu/test-$t"
  ls -lh ".gpu/test-$t"
done

#!/usr/bin/env bash
# Prepares the GPU run (scripts/gpu-run.sh) on a machine without a GPU, so the lease is spent
# on the GPU work alone. Leaves in the git-ignored .gpu/ (what the device call carries):
#   bin.tar.xz       mcld and the test binaries models, ops, pipeline, train (and prepare, if
#                    it fits), built with --features cuda,cudnn,nccl for sm_90, stripped
#   fixtures.tar.xz  the fixture cases those tests read (../shared/fixtures does not travel)
#   wheels/          diffusers and importlib_metadata (the GPU machine's image lacks both)
#   MANIFEST         commit, features, sizes, sha256s
# The whole of .gpu plus the working tree must stay under the device tool's 64 MiB; packing
# stops with an error naming what to drop when it does not.
#
#   scripts/gpu-prepare.sh                  # build (20 min from cold on 2 idle cores) and pack
#   MCLD_PREPARE_SKIP_BUILD=1 scripts/gpu-prepare.sh   # repack what the last build left
# CARGO_TARGET_DIR (default /work/target-cuda) keeps the CUDA build apart from the CPU one.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/work/target-cuda}
FEATURES=cuda,cudnn,nccl
TESTS=${MCLD_GPU_TESTS:-models ops pipeline train prepare}
RAW=$CARGO_TARGET_DIR/gpu-raw
LIMIT=$((64 * 1024 * 1024))
mkdir -p .gpu "$RAW"

# 1. The wheels first: quick, and they show the registry works before an hour of building.
mkdir -p .gpu/wheels
rm -f .gpu/wheels/*.whl
for w in diffusers==0.42.1 importlib_metadata==8.7.0; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d .gpu/wheels "$w"
done
ls -l .gpu/wheels

# 2. The build (build-cuda.sh leaves .gpu/mcld and .gpu/test-NAME, stripped).
if [ "${MCLD_PREPARE_SKIP_BUILD:-0}" != 1 ]; then
  MCLD_CUDA_FEATURES=$FEATURES MCLD_CUDA_TESTS="$TESTS" scripts/build-cuda.sh
fi
for f in .gpu/mcld .gpu/test-*; do
  [ -f "$f" ] && [ "${f%.gz}" = "$f" ] && mv -f "$f" "$RAW/"
done
[ -x "$RAW/mcld" ] || { echo "no CUDA mcld in $RAW: run without MCLD_PREPARE_SKIP_BUILD" >&2; exit 1; }
# A CPU build would pack and travel just as well, and fail only on the GPU machine.
# (MCLD_PREPARE_ALLOW_CPU=1 packs one anyway: a check of this script's packing.)
for b in "$RAW"/*; do
  if ! readelf -d "$b" | grep -q 'libcuda\.so' && [ "${MCLD_PREPARE_ALLOW_CPU:-0}" != 1 ]; then
    echo "$b does not link libcuda: not a --features cuda build" >&2; exit 1
  fi
done

# 3. The fixtures the GPU tests load.
FIX=../shared/fixtures
STAGE=$(mktemp -d); trap 'rm -rf "$STAGE"' EXIT
mkdir -p "$STAGE/model"
for c in unet_plain reference_write_read vae clip_vision pose_guider resampler pipeline_small train_step; do
  cp "$FIX/model/$c.json" "$FIX/model/$c.safetensors" "$STAGE/model/"
done

# 4. Pack: xz with a window longer than one binary, so the binaries share the CUDA kernels
# and library code they have in common. The DensePose stage test (test-prepare and its 12 MB
# fixture) goes only where it fits.
pack() { # include_densepose
  local bins=(mcld)
  for t in $TESTS; do
    [ "$t" = prepare ] && [ "$1" != 1 ] && continue
    [ -f "$RAW/test-$t" ] && bins+=("test-$t")
  done
  rm -rf "$STAGE/densepose"
  [ "$1" = 1 ] && cp -r "$FIX/densepose" "$STAGE/densepose"
  tar -C "$RAW" -c "${bins[@]}" | xz -9 --lzma2=dict=192MiB -T1 >.gpu/bin.tar.xz
  tar -C "$STAGE" -c . | xz -9 -T1 >.gpu/fixtures.tar.xz
  PACKED="${bins[*]}"
}
tree_bytes() { git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1; }
total() { echo $(($(du -cb .gpu | tail -1 | cut -f1) + $(tree_bytes))); }
pack 1
if [ "$(total)" -gt "$LIMIT" ]; then
  echo "with the DensePose stage test: $(($(total) >> 20)) MiB, over 64 MiB; packing without it"
  pack 0
fi
if [ "$(total)" -gt "$LIMIT" ]; then
  echo "still $(($(total) >> 20)) MiB with $PACKED: over the device tool's 64 MiB" >&2
  echo "drop a test binary (MCLD_GPU_TESTS=\"models train\") and rerun with MCLD_PREPARE_SKIP_BUILD=1" >&2
  exit 1
fi
{
  echo "commit: $(git rev-parse HEAD)$(git diff --quiet HEAD || echo ' (with uncommitted changes)')"
  echo "built: $(date -u +%FT%TZ) with features $FEATURES, CUDA_COMPUTE_CAP=90"
  echo "packed: $PACKED"
  (cd "$RAW" && for b in $PACKED; do echo "$(sha256sum "$b" | cut -c1-16) $(du -b "$b" | cut -f1) $b"; done)
  (cd .gpu && ls -l bin.tar.xz fixtures.tar.xz wheels/)
  echo "carried in all (tree + .gpu): $(($(total) >> 20)) MiB"
} | tee .gpu/MANIFEST

#!/usr/bin/env bash
# Type-checks and lints the CUDA code (`--features cuda,cudnn,nccl`) in minutes, without the
# CUDA toolkit and without compiling candle's kernels: a stand-in `nvcc` answers the version
# questions of the build scripts (cudarc, candle-kernels through cudaforge) and writes empty
# PTX files and archives. `cargo clippy` never links, so nothing needs the real code. Nothing
# it produces can run: scripts/build-cuda.sh makes the real build (20 minutes from cold here).
#
#   scripts/check-cuda.sh            # clippy --all-targets -D warnings with the CUDA features
# CARGO_TARGET_DIR defaults to /work/target-cuda-check (kept apart: the stand-in's empty PTX
# must never reach a real build).
set -euo pipefail
cd "$(dirname "$0")/.."
FAKE=${MCLD_FAKE_CUDA:-/tmp/mcld-fake-cuda}
mkdir -p "$FAKE/bin" "$FAKE/include" "$FAKE/lib64"
cat >"$FAKE/bin/nvcc" <<'EOF'
#!/usr/bin/env bash
# Stand-in nvcc for type checks: CUDA 13.0, sm_90, empty outputs.
out=; dir=; ptx=0; lib=0; srcs=()
while [ $# -gt 0 ]; do
  case "$1" in
    --version) # the real layout: cudarc reads the fourth line
      printf '%s\n' "nvcc: NVIDIA (R) Cuda compiler driver" "Copyright (c) 2005-2025 NVIDIA Corporation" \
        "Built on (stand-in)" "Cuda compilation tools, release 13.0, V13.0.88" "Build cuda_13.0"; exit 0 ;;
    --list-gpu-code) echo "sm_90"; exit 0 ;;
    -o|--output-file) out=$2; shift ;;
    --output-directory|-odir) dir=$2; shift ;;
    --ptx|-ptx) ptx=1 ;;
    --lib|-lib) lib=1 ;;
    *.cu) srcs+=("$1") ;;
  esac
  shift
done
if [ "$ptx" = 1 ] && [ -z "$out" ]; then
  for s in "${srcs[@]}"; do b=$(basename "$s" .cu); : >"${dir:-.}/$b.ptx"; done
elif [ -n "$out" ]; then
  mkdir -p "$(dirname "$out")"
  if [ "$lib" = 1 ]; then printf '!<arch>\n' >"$out"; else : >"$out"; fi
fi
EOF
chmod +x "$FAKE/bin/nvcc"
export PATH=$FAKE/bin:$PATH CUDA_HOME=$FAKE CUDA_PATH=$FAKE NVCC=$FAKE/bin/nvcc CUDA_COMPUTE_CAP=90
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/work/target-cuda-check}
cargo clippy --release --locked --features cuda,cudnn,nccl --all-targets -- -D warnings
echo "check-cuda: the CUDA features type-check and lint clean"

#!/usr/bin/env bash
# The NCCL collective on a GPU machine: one GPU is enough, two or more add the multi-rank checks.
#
# Build here first (no GPU needed):
#   CARGO_TARGET_DIR=/work/target-cuda MCLD_CUDA_FEATURES=cuda,cudnn,nccl MCLD_CUDA_TESTS=train \
#     scripts/build-cuda.sh
# which leaves .gpu/mcld and .gpu/test-train (about 80 MB each); `gzip -f .gpu/mcld
# .gpu/test-train` brings them to about 22 MB each, under the device tool's 64 MiB carry, and
# this script unpacks FILE.gz when FILE is absent. Carry `.gpu`. On the GPU machine:
#   scripts/gpu-check-nccl.sh            # logs and a summary under $OUT (or ./gpu-check-nccl/)
# It takes a few minutes on one GPU (each step has a timeout); it leaves 5 files in $OUT on one
# GPU, 8 with two or more (the most the device tool brings back).
#
# 1. tests/train/nccl.rs: one rank reduces tensors of three dtypes through several buckets and
#    gets them back bit for bit; with 2+ GPUs, two ranks get the exact sums and a rank that
#    leaves stops the other with an error.
# 2. `mcld train` on the demo's tiny setup on cuda:0, once as a plain single process and once as
#    a one-rank NCCL run (MCLD_COLLECTIVE=nccl): the NCCL id, the communicator, the host
#    exchanges of the loop. NCCL refuses two ranks on one GPU, so on a 1-GPU machine this is as
#    far as the multi-process path goes; the loop's all-reduce itself is covered by 1.
# 3. With 2+ GPUs: `mcld train --nproc-per-node 2` (each rank batch 1) against one process with
#    batch 2 (losses side by side), then two ranks started by hand (as torchrun would) with
#    rank 1 killed by SIGKILL mid-run: rank 0 must stop with an error, not hang.
set -uo pipefail
cd "$(dirname "$0")/.."
O=${OUT:-$PWD/gpu-check-nccl}
mkdir -p "$O"
SP=${TORCH_SITE_PACKAGES:-/opt/torch/.venv/lib/python3.12/site-packages}
export LD_LIBRARY_PATH=$SP/nvidia/cu13/lib:$SP/nvidia/cudnn/lib:$SP/nvidia/nccl/lib:${LD_LIBRARY_PATH:-}
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
for f in .gpu/mcld .gpu/test-train; do
  if [ ! -x "$f" ] && [ -f "$f.gz" ]; then gzip -dc "$f.gz" >"/tmp/$(basename "$f")" && chmod +x "/tmp/$(basename "$f")"; fi
done
M=.gpu/mcld; [ -x "$M" ] || M=/tmp/mcld
T=.gpu/test-train; [ -x "$T" ] || T=/tmp/test-train
# For a dry run of the script itself on a machine without a GPU: MCLD_BIN=target/release/mcld
# MCLD_TEST_BIN=... MCLD_CHECK_DEVICE=cpu (the NCCL run then fails, saying it needs CUDA);
# MCLD_CHECK_GPUS=2 runs part 3 there too, with CPU ranks over TCP.
M=${MCLD_BIN:-$M}; T=${MCLD_TEST_BIN:-$T}; DEV=${MCLD_CHECK_DEVICE:-cuda}
S="$O/summary.txt"; : >"$S"
say() { echo "$*" | tee -a "$S"; }
fail=0
ngpu=${MCLD_CHECK_GPUS:-$(nvidia-smi -L 2>/dev/null | wc -l)}
say "gpus: $ngpu; nccl: $(ls "$SP"/nvidia/nccl/lib 2>/dev/null | tr '\n' ' ')"

# 1. The collective's own tests.
# They are #[ignore]d (they need GPUs): run them explicitly, the two-rank one only with 2+ GPUs.
if [ "$ngpu" -ge 2 ]; then which=(nccl::); else which=(--exact nccl::nccl_alone_gives_back_every_tensor_through_several_buckets); fi
if timeout 300 "$T" "${which[@]}" --ignored --test-threads=1 --nocapture >"$O/tests.log" 2>&1; then
  say "1 nccl tests: ok ($(grep -c '^test .* ok$' "$O/tests.log") passed)"
else
  say "1 nccl tests: FAILED (tests.log)"; fail=1
fi
grep '^nccl:' "$O/tests.log" | tee -a "$S"

# 2. The tiny demo setup (written on the CPU), trained on cuda:0 alone and as one NCCL rank.
W=$(mktemp -d)
timeout 300 "$M" demo --train --workdir "$W" --train-steps 1 >"$O/demo.log" 2>&1 \
  || { say "2 demo setup: FAILED (demo.log)"; exit 1; }
losses() { python3 -c 'import json,sys; print(" ".join("%.9g" % json.loads(l)["loss"] for l in open(sys.argv[1])))' "$1"; }
train() { # name, env..., -- args...
  local name=$1; shift
  local envs=(); while [ "$1" != "--" ]; do envs+=("$1"); shift; done; shift
  local t0=$SECONDS
  if env "${envs[@]}" timeout 400 "$M" train --config "$W/train.yaml" --device "$DEV" \
       --max_train_steps 4 --validation_steps 0 --checkpointing_steps 4 \
       --output_dir "$W/$name" "$@" >"$O/$name.log" 2>&1; then
    say "$name: ok in $((SECONDS - t0)) s; losses $(losses "$W/$name/demo/train_log.jsonl")"
  else
    say "$name: FAILED after $((SECONDS - t0)) s ($name.log)"; tail -5 "$O/$name.log" | tee -a "$S"; fail=1
  fi
}
train 2-single MCLD_COLLECTIVE=auto --
train 2-nccl-world1 MCLD_COLLECTIVE=nccl --
grep -i "nccl" "$O/2-nccl-world1.log" | head -5 | tee -a "$S"

# 3. Two GPUs and more.
if [ "$ngpu" -ge 2 ]; then
  train 3-single-bs2 MCLD_COLLECTIVE=auto -- --train_bs 2
  train 3-nproc2-bs1 MCLD_COLLECTIVE=auto -- --nproc-per-node 2 --train_bs 1
  # Rank 1 killed mid-run: rank 0 must end with an error within the bound.
  port=$((20000 + RANDOM % 20000)); pids=()
  for r in 0 1; do
    RANK=$r LOCAL_RANK=$r WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=$port MCLD_NCCL_TIMEOUT=120 \
      "$M" train --config "$W/train.yaml" --device "$DEV" --max_train_steps 1000 --validation_steps 0 \
      --checkpointing_steps 0 --output_dir "$W/3-kill" >>"$O/3-kill.log" 2>&1 &
    pids+=($!)
  done
  for _ in $(seq 120); do grep -q '"step":3,' "$W/3-kill/demo/train_log.jsonl" 2>/dev/null && break; sleep 1; done
  kill -9 "${pids[1]}"; t0=$SECONDS
  ( sleep 200; kill -9 "${pids[0]}" 2>/dev/null ) & guard=$!
  wait "${pids[0]}"; rc=$?; kill "$guard" 2>/dev/null
  if [ "$rc" -ne 0 ] && [ $((SECONDS - t0)) -lt 190 ]; then
    say "3-kill: ok, rank 0 stopped with status $rc $((SECONDS - t0)) s after rank 1 was killed"
  else
    say "3-kill: FAILED, rank 0 status $rc after $((SECONDS - t0)) s"; fail=1
  fi
  tail -4 "$O/3-kill.log" | tee -a "$S"
else
  say "3: skipped (needs 2 GPUs)"
fi
rm -rf "$W"
say "result: $([ $fail = 0 ] && echo PASS || echo FAIL)"
exit $fail

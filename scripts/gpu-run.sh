#!/usr/bin/env bash
# The GPU run of issue #25, one command on the GPU machine (one H100/H200, PyTorch there, no
# network, no Rust): every CUDA check and every side-by-side timing with PyTorch, in at most
# about 8 minutes, so a rerun fits the same lease.
#
# Before: scripts/gpu-prepare.sh here (the CUDA build, packed into .gpu/ with the fixtures and the
# diffusers wheel). Then one device call, carrying `.gpu`:
#   scripts/gpu-run.sh          # timeout_s 540; writes under $OUT (else ./gpu-run-out/)
# Everything lands in at most 4 files (the device tool brings back 8): summary.txt (the table
# printed last), results.tsv (one row per figure), logs.tar.gz (every log, nvidia-smi, the loss
# logs) and env.txt.
#
# Steps (each has a time budget; time a step leaves unused passes to the next; a failed or
# timed-out command is recorded and the run goes on):
#   1 nvidia-smi; the fixture tests on cuda (MCLD_TEST_DEVICE=cuda, f32 with TF32 off, and the
#     half-precision pipeline checks); tests named *cuda* (the custom CUDA ops); the NCCL check
#   2 `mcld bench pipeline` vs tools/reference/bench_pipeline_torch.py: 512, 20 steps, bf16/f16,
#     batch 1/4
#   3 `mcld bench train` vs tools/reference/bench_train_torch.py: 512, full width, f16, batch
#     1/4/12, with and without checkpointing
#   4 `mcld bench densepose --device cuda`; `mcld evaluate --device cuda` over 300 synthetic pairs
#   5 `mcld demo --train --device cuda`; `mcld train` 20 steps at full width on random weights,
#     SIGKILLed once and resumed
#
# Knobs: MCLD_GPU_STEPS="1 2 3 4 5" (which steps), MCLD_GPU_BUDGET_N (seconds for step N),
# MCLD_GPU_DRY_RUN=1 (this machine, no GPU: CPU build from target/release, --device cpu, tiny
# sizes; proves the plumbing, parsing and summary), MCLD_PYTHON (python with torch+diffusers).
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
O=${OUT:-$REPO/gpu-run-out}
mkdir -p "$O"
L=$(mktemp -d /tmp/gpu-run-logs.XXXXXX)
W=$(mktemp -d /tmp/gpu-run-work.XXXXXX)
DRY=${MCLD_GPU_DRY_RUN:-0}
STEPS=" ${MCLD_GPU_STEPS:-1 2 3 4 5} "
T0=$SECONDS
RES=$O/results.tsv
printf 'step\twhat\tmcld\tpytorch\tratio\tunit\tstatus\n' >"$RES"
: >"$L/run.log"
say() { echo "$*" | tee -a "$L/run.log"; }

# ---------------------------------------------------------------- setup
if [ "$DRY" = 1 ]; then
  DEV=cpu
  M=${MCLD_BIN:-$REPO/target/release/mcld}
  BIN=$W/bin; mkdir -p "$BIN"
  # The CPU test binaries cargo built last (`cargo test --release --no-run`).
  for t in models ops pipeline train prepare; do
    f=$(ls -t "$REPO"/target/release/deps/"$t"-* 2>/dev/null | grep -v '\.d$' | head -1)
    [ -n "$f" ] && ln -sf "$f" "$BIN/test-$t"
  done
  FIX=${MCLD_FIXTURES:-$REPO/../shared/fixtures}
  PY=${MCLD_PYTHON:-/work/venv-ref/bin/python}
else
  DEV=cuda
  BIN=/tmp/mcld-gpu; mkdir -p "$BIN"
  # The binaries and fixtures travel xz-compressed (a long window shares the CUDA kernels
  # between the binaries); python's lzma stands in where xz is missing.
  unpack() { # archive dir
    if command -v xz >/dev/null; then xz -dc -T0 "$1" | tar -x -C "$2"
    else python3 -c 'import lzma,sys,tarfile; tarfile.open(fileobj=lzma.open(sys.argv[1])).extractall(sys.argv[2])' "$1" "$2"; fi
  }
  unpack .gpu/bin.tar.xz "$BIN" || say "setup: FAILED to unpack .gpu/bin.tar.xz"
  mkdir -p "$BIN/fixtures" && unpack .gpu/fixtures.tar.xz "$BIN/fixtures" || say "setup: FAILED to unpack fixtures"
  M=$BIN/mcld
  FIX=$BIN/fixtures
  PY=${MCLD_PYTHON:-python3}
  SP=${TORCH_SITE_PACKAGES:-$($PY -c 'import os,torch; print(os.path.dirname(os.path.dirname(torch.__file__)))' 2>/dev/null)}
  SP=${SP:-/opt/torch/.venv/lib/python3.12/site-packages}
  export LD_LIBRARY_PATH=$SP/nvidia/cu13/lib:$SP/nvidia/cudnn/lib:$SP/nvidia/nccl/lib:${LD_LIBRARY_PATH:-}
  # diffusers (and what it needs that the image lacks) from the carried wheels.
  if ls .gpu/wheels/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/mcld-site \
      .gpu/wheels/*.whl >"$L/pip.log" 2>&1 || say "setup: pip install of the wheels FAILED (pip.log)"
    export PYTHONPATH=/tmp/mcld-site:${PYTHONPATH:-}
  fi
fi
export PYTHONUNBUFFERED=1
chmod +x "$BIN"/* 2>/dev/null
{
  echo "date: $(date -u +%FT%TZ)"; echo "dry run: $DRY"; echo "mcld: $M"; ls -l "$BIN" 2>&1
  cat .gpu/MANIFEST 2>/dev/null; echo "python: $PY"
  $PY -c 'import torch, diffusers; print("torch", torch.__version__, "diffusers", diffusers.__version__)' 2>&1
  nvidia-smi 2>&1; nproc; free -g
} >"$O/env.txt" 2>&1
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
GPU=${GPU:-none ($DEV)}
say "gpu-run: $GPU, device $DEV, dry run $DRY, setup ${SECONDS}s"

# Step budgets (seconds). Dry runs on a 2-core machine get more for less work.
# Dry runs on a 2-core machine get more time per command (CAPX) for less work.
if [ "$DRY" = 1 ]; then B=(0 600 900 900 600 600); CAPX=5; WU=0; else B=(0 90 120 140 40 60); CAPX=1; WU=1; fi
PLAN_END=$SECONDS
step_end=$SECONDS
begin() { # n title
  local b=${B[$1]}; local v="MCLD_GPU_BUDGET_$1"; b=${!v:-$b}
  PLAN_END=$((PLAN_END + b)); [ "$PLAN_END" -lt "$SECONDS" ] && PLAN_END=$SECONDS
  step_end=$PLAN_END; STEP=$1
  say "== step $1: $2 (until +$((step_end - T0))s)"
}
# run NAME CAP CMD...: log to $L/NAME.log, at most min(CAP, what the step has left) seconds.
run() {
  local name=$1 cap=$(($2 * CAPX)); shift 2
  local t=$((step_end - SECONDS)); [ "$t" -gt "$cap" ] && t=$cap
  if [ "$t" -lt 10 ]; then say "  $name: SKIPPED (step budget spent)"; echo "skipped" >"$L/$name.status"; return 99; fi
  local t0=$SECONDS
  timeout -k 5 "$t" "$@" >"$L/$name.log" 2>&1; local rc=$?
  local st=ok; [ $rc = 124 ] || [ $rc = 137 ] && st="TIMEOUT(${t}s)"; [ $rc != 0 ] && [ "$st" = ok ] && st="FAILED(rc $rc)"
  echo "$st" >"$L/$name.status"
  say "  $name: $st in $((SECONDS - t0))s"
  [ "$st" = ok ] || tail -3 "$L/$name.log" | sed 's/^/    | /' | tee -a "$L/run.log"
  return $rc
}
status() { cat "$L/$1.status" 2>/dev/null || echo "not run"; }
# A figure out of a log: fig LOG REGEX (first group of the last match).
fig() { [ -f "$L/$1.log" ] && sed -nE "s#.*$2.*#\1#p" "$L/$1.log" | tail -1; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a != "" && b != "" && b + 0 > 0) printf "%.2f", a / b; else printf "-" }'; }
row() { # what mcld pytorch unit status
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$STEP" "$1" "${2:--}" "${3:--}" "$(ratio "$2" "$3")" "$4" "$5" >>"$RES"
}
tests_row() { # name: passed/failed counts from a libtest log
  local p f; p=$(grep -cE '^test .* ok$' "$L/$1.log" 2>/dev/null); f=$(grep -cE '^test .* FAILED$' "$L/$1.log" 2>/dev/null)
  row "$1 ($2)" "${p:-0} passed, ${f:-0} failed" "" tests "$(status "$1")"
  grep -E '^test .* FAILED$|max_abs_err .* exceeds' "$L/$1.log" 2>/dev/null | head -5 | sed 's/^/    | /' | tee -a "$L/run.log"
}

# Synthetic evaluate inputs (CPU work) in the background while the GPU works.
if [[ $STEPS == *" 4 "* ]]; then
  NP=300; [ "$DRY" = 1 ] && NP=8
  ( $PY tools/reference/make_eval_inputs.py "$W/eval" --pairs $NP --real $NP >"$L/eval-inputs.log" 2>&1 ) &
  EVAL_PID=$!
fi

# ---------------------------------------------------------------- 1: CUDA checks
if [[ $STEPS == *" 1 "* ]]; then
  begin 1 "CUDA fixtures, custom ops, NCCL"
  nvidia-smi >"$L/nvidia-smi.log" 2>&1
  export MCLD_FIXTURES=$FIX
  TENV=(env MCLD_TEST_DEVICE=$DEV NVIDIA_TF32_OVERRIDE=0 MCLD_TEST_BIN=$M)
  run t-models 60 "${TENV[@]}" "$BIN/test-models" unet:: vae:: clip:: pose_guider:: resampler:: mcld:: gpu_memory:: --test-threads=1
  tests_row t-models "UNet, VAE, CLIP, pose guider, projector, write/read, pool peak"
  run t-pipeline 60 "${TENV[@]}" "$BIN/test-pipeline" small:: half:: --test-threads=1
  tests_row t-pipeline "pipeline_small f32/f16/bf16, half pipeline"
  run t-train 60 "${TENV[@]}" "$BIN/test-train" step:: --test-threads=1
  tests_row t-train "train_step fixture"
  if [ -x "$BIN/test-prepare" ]; then
    run t-densepose 60 "${TENV[@]}" "$BIN/test-prepare" densepose_stage:: --test-threads=1
    tests_row t-densepose "DensePose stage"
  else
    row "t-densepose (DensePose stage)" "" "" tests "not packed (64 MiB limit); step 4 runs it"
  fi
  # The custom CUDA ops (issue #24) against their CPU versions: whatever tests name cuda.
  for t in ops models; do
    [ -x "$BIN/test-$t" ] || continue
    run "t-cuda-$t" 60 "${TENV[@]}" "$BIN/test-$t" cuda --test-threads=1
    tests_row "t-cuda-$t" "$t tests named *cuda*"
  done
  run t-cuda-ops-train 60 "${TENV[@]}" "$BIN/test-train" cuda --test-threads=1
  tests_row t-cuda-ops-train "train tests named *cuda*"
  if [ "$DEV" = cuda ]; then
    run nccl 90 env OUT="$L/nccl" MCLD_BIN="$M" MCLD_TEST_BIN="$BIN/test-train" scripts/gpu-check-nccl.sh
    row "NCCL one-GPU check" "$(grep -o 'result: [A-Z]*' "$L/nccl/summary.txt" 2>/dev/null)" "" check "$(status nccl)"
  fi
fi

# ---------------------------------------------------------------- 2: inference
if [[ $STEPS == *" 2 "* ]]; then
  begin 2 "inference: mcld bench pipeline vs PyTorch + diffusers"
  if [ "$DRY" = 1 ]; then SZ=64; NS=2; PAIRS="bf16:2"; else SZ=512; NS=20; PAIRS="bf16:1 f16:1 bf16:4 f16:4"; fi
  for p in $PAIRS; do
    dt=${p%:*}; b=${p#*:}; n=pipe-$dt-b$b
    run "$n-mcld" 100 "$M" bench pipeline --device $DEV --dtype "$dt" --size $SZ --steps $NS --batch-size "$b" --images "$b" --warmup $WU
    run "$n-torch" 80 $PY tools/reference/bench_pipeline_torch.py --device $DEV --dtype "$dt" --size $SZ --steps $NS --batch-size "$b" --images "$b" --warmup $WU
    s="$(status "$n-mcld")/$(status "$n-torch")"
    row "pipeline $dt batch $b: s/image" "$(fig "$n-mcld" 'per image: ([0-9.]+)s total')" "$(fig "$n-torch" 'per image: ([0-9.]+)s total')" "s" "$s"
    row "pipeline $dt batch $b: s/step (guided)" "$(fig "$n-mcld" '\(([0-9.]+)s/step\)')" "$(fig "$n-torch" '\(([0-9.]+)s/step\)')" "s" "$s"
    row "pipeline $dt batch $b: condition+reference+decode" \
      "$(sed -nE 's/.*condition \(CLIP x2 \+ VAE encode\) ([0-9.]+)s \+ reference UNet, pose guider, projector ([0-9.]+)s .* VAE decode ([0-9.]+)s.*/\1 \2 \3/p' "$L/$n-mcld.log" 2>/dev/null | awk '{print $1+$2+$3}')" \
      "$(sed -nE 's/.*condition \(CLIP x2 \+ VAE encode\) ([0-9.]+)s \+ reference UNet, pose guider, projector ([0-9.]+)s .* VAE decode ([0-9.]+)s.*/\1 \2 \3/p' "$L/$n-torch.log" 2>/dev/null | awk '{print $1+$2+$3}')" "s" "$s"
    row "pipeline $dt batch $b: peak GPU memory" "$(fig "$n-mcld" 'peak GPU memory ([0-9.]+) GiB')" "$(fig "$n-torch" 'peak GPU memory ([0-9.]+) GiB')" "GiB" "$s"
  done
fi

# ---------------------------------------------------------------- 3: training
if [[ $STEPS == *" 3 "* ]]; then
  begin 3 "training: mcld bench train vs PyTorch, f16, full width"
  # Most wanted first: the reference's batch 12 (with checkpointing, then without), then 1 and 4.
  # (f32 in a dry run: the CPU's f16 is emulated and slow.)
  TDT=f16
  if [ "$DRY" = 1 ]; then SZ=64; WD=half; CFGS="1:ckpt"; OPT=(--optimizer none); TDT=f32; else SZ=512; WD=full; CFGS="12:ckpt 1:plain 12:plain 4:plain 4:ckpt 1:ckpt"; OPT=(); fi
  for c in $CFGS; do
    b=${c%:*}; k=${c#*:}; n=train-b$b-$k
    ck=(); [ "$k" = ckpt ] && ck=(--grad-checkpointing)
    run "$n-mcld" 120 "$M" bench train --device $DEV --dtype $TDT --size $SZ --width $WD --batch-size "$b" --steps 2 --warmup $WU "${OPT[@]}" "${ck[@]}"
    run "$n-torch" 90 $PY tools/reference/bench_train_torch.py --device $DEV --dtype $TDT --size $SZ --width $WD --batch-size "$b" --steps 2 --warmup $WU "${OPT[@]}" "${ck[@]}"
    s="$(status "$n-mcld")/$(status "$n-torch")"
    row "train $TDT batch $b $k: steps/s" "$(fig "$n-mcld" '= ([0-9.]+) steps/s')" "$(fig "$n-torch" '= ([0-9.]+) steps/s')" "1/s" "$s"
    row "train $TDT batch $b $k: samples/s" "$(fig "$n-mcld" ', ([0-9.]+) samples/s')" "$(fig "$n-torch" ', ([0-9.]+) samples/s')" "1/s" "$s"
    row "train $TDT batch $b $k: backward s" "$(fig "$n-mcld" 'backward ([0-9.]+) s \| optimizer')" "$(fig "$n-torch" 'backward ([0-9.]+) s \| optimizer')" "s" "$s"
    row "train $TDT batch $b $k: peak GPU memory" "$(fig "$n-mcld" 'peak GPU memory ([0-9.]+) GiB')" "$(fig "$n-torch" 'peak GPU memory ([0-9.]+) GiB')" "GiB" "$s"
    grep -qiE 'out of memory|CUDA_ERROR_OUT_OF_MEMORY' "$L/$n-mcld.log" 2>/dev/null && say "  $n-mcld: out of GPU memory"
  done
fi

# ---------------------------------------------------------------- 4: DensePose, evaluate
if [[ $STEPS == *" 4 "* ]]; then
  begin 4 "DensePose bench, evaluate"
  run densepose 30 "$M" bench densepose --device $DEV --images $([ "$DRY" = 1 ] && echo 1 || echo 8)
  row "DensePose R101-FPN: images/s" "$(sed -nE 's/^([0-9.]+) images\/s.*/\1/p' "$L/densepose.log" 2>/dev/null | head -1)" "" "1/s" "$(status densepose)"
  wait "${EVAL_PID:-}" 2>/dev/null
  t0=$SECONDS
  run evaluate 60 "$M" evaluate --device $DEV --save_path "$W/eval/gen" --gt_folder "$W/eval/gt" \
    --training_path "$W/eval/train" --pretrained_dir "$W/eval/pretrained"
  el=$((SECONDS - t0))
  # The face models are not carried: evaluate then fails after writing every other metric.
  if [ -f "$W/eval/gen/metrics.json" ]; then
    cp "$W/eval/gen/metrics.json" "$L/evaluate-metrics.json"
    np=$(ls "$W/eval/gt/256" | wc -l)
    row "evaluate ($np pairs x 2 sizes + $np real, FID/LPIPS/SSIM/PSNR): s per 1000 pairs" \
      "$(awk -v s=$el -v n="$np" 'BEGIN { printf "%.1f", 1000 * s / n }')" "" "s" "metrics written (face models absent)"
  else
    row "evaluate: s per 1000 pairs" "" "" "s" "$(status evaluate)"
  fi
fi

# ---------------------------------------------------------------- 5: a short real loop
if [[ $STEPS == *" 5 "* ]]; then
  begin 5 "demo --train and a killed, resumed mcld train"
  run demo-train 40 "$M" demo --train --device $DEV --train-steps 20 --workdir "$W/demo"
  row "demo --train (20 steps): mean loss first -> last quarter" \
    "$(sed -nE 's#.*first quarter ([0-9.]+), of the last quarter ([0-9.]+).*#\1 -> \2#p' "$L/demo-train.log" 2>/dev/null | tail -1)" "" "" "$(status demo-train)"
  # Full width where the helper can write random SD-1.5-size base models (not in a dry run: the
  # full set and AdamW's moments need about 27 GB).
  LW=$W/loop
  run loop-setup 30 "$M" demo --train --device cpu --train-steps 1 --workdir "$LW"
  wd=demo
  if [ "$DRY" != 1 ] && run loop-full-width 30 $PY tools/reference/full_width_base.py "$LW" --device $DEV; then wd=full; fi
  TR=("$M" train --config "$LW/train.yaml" --device $DEV --max_train_steps 20 --validation_steps 0
      --checkpointing_steps 5 --output_dir "$LW/out")
  log=$LW/out/demo/train_log.jsonl
  # Killed with SIGKILL once 8 steps are logged (or after 60 s), then resumed from `latest`.
  t0=$SECONDS
  "${TR[@]}" >"$L/loop-killed.log" 2>&1 &
  pid=$!
  logged() { cat "$log" 2>/dev/null | grep -c '"loss"'; }
  while kill -0 "$pid" 2>/dev/null && [ $((SECONDS - t0)) -lt $((60 * CAPX)) ] \
    && [ "$(logged)" -lt 8 ]; do sleep 0.2; done
  if kill -9 "$pid" 2>/dev/null; then echo "killed" >"$L/loop-killed.status"
  else echo "ended before the kill" >"$L/loop-killed.status"; fi
  wait "$pid" 2>/dev/null
  before=$(logged)
  cp "$log" "$L/loop-before-kill.jsonl" 2>/dev/null
  say "  loop-killed: $(status loop-killed) after $((SECONDS - t0))s, ${before:-0} steps logged"
  run loop-resumed 60 "${TR[@]}" --resume_from_checkpoint latest
  cp "$log" "$L/loop-train_log.jsonl" 2>/dev/null
  # Continuity: every step 1..20 logged once, and the steps run twice (after the last checkpoint
  # before the kill) close to their first losses (bit identity is not expected on a GPU).
  cont=$($PY - "$L/loop-before-kill.jsonl" "$log" <<'PY' 2>&1
import json, sys
def read(p):
    try:
        return {json.loads(l)["step"]: json.loads(l)["loss"] for l in open(p) if l.strip()}
    except OSError:
        return {}
a, b = read(sys.argv[1]), read(sys.argv[2])
# Steps after the last checkpoint (every 5) before the kill ran twice.
again = sorted(s for s in set(a) & set(b) if s > len(a) // 5 * 5)
d = max((abs(a[s] - b[s]) / max(abs(a[s]), 1e-12) for s in again), default=float("nan"))
print(f"{len(b)} of 20 steps logged, {'1..20 complete' if sorted(b) == list(range(1, 21)) else 'INCOMPLETE'}; "
      f"steps {again[0] if again else '-'}-{again[-1] if again else '-'} rerun after resume, max rel. loss diff {d:.2e}; "
      f"losses {' '.join('%.4f' % b[s] for s in sorted(b))}")
PY
)
  row "train $wd width, SIGKILL after ${before:-?} steps + resume" "$(echo "$cont" | cut -d';' -f1)" "" "" "$(status loop-killed)/$(status loop-resumed)"
  say "  loop: $cont"
fi

# ---------------------------------------------------------------- summary
tar -czf "$O/logs.tar.gz" -C "$L" . 2>/dev/null
{
  echo "GPU run: $GPU; $(date -u +%F); dry run $DRY; $((SECONDS - T0)) s; ratio = mcld / PyTorch"
  column -t -s $'\t' "$RES" 2>/dev/null || cat "$RES"
} >"$O/summary.txt"
cp "$L/run.log" "$O/run.log"
echo
cat "$O/summary.txt"
rm -rf "$W"

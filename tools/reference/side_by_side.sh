#!/bin/bash
# The #24 side-by-side sitting: each training configuration of the issue, mcld then PyTorch, 2
# threads each, one after the other on a quiet machine (nothing else running). Build first
# (`cargo build --release`); TORCH_PYTHON is the private venv with torch + diffusers
# (outside CI). Prints each run's per-phase line, CPU time and peak RSS.
cd "$(dirname "$0")/../.."
M=target/release/mcld
P="${TORCH_PYTHON:-/work/venv-ref/bin/python} tools/reference/bench_train_torch.py"
run() { echo "=== $* ($(date +%T), load $(cut -d' ' -f1 /proc/loadavg))"; "$@" 2>&1 | grep -E "^bench|^torch|per step|CPU time per|peak"; }
run $M bench train --size 256 --width half --steps 2
run $P --size 256 --width half --steps 2 --threads 2
run $M bench train --size 256 --width half --steps 2 --dtype bf16
run $P --size 256 --width half --steps 2 --threads 2 --dtype bf16
run $M bench train --size 256 --width half --steps 2 --grad-checkpointing
run $P --size 256 --width half --steps 2 --threads 2 --grad-checkpointing
run $M bench train --size 256 --width half --steps 2 --dtype bf16 --grad-checkpointing
run $P --size 256 --width half --steps 2 --threads 2 --dtype bf16 --grad-checkpointing
run $M bench train --size 256 --width full --steps 2 --optimizer none
run $P --size 256 --width full --steps 2 --threads 2 --optimizer none
echo "=== done $(date +%T)"

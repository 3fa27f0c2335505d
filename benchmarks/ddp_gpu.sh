#!/usr/bin/env bash
# Data-parallel HABC training on this machine's GPUs (NCCL): steps/s for K = 1 and K = all
# GPUs (and 2, 4 in between when there are that many), the small VLA at the learner's batch
# of 64, printed as benchmarks/ddp_bench.py's table and written to
# benchmarks/results/ddp/gpu/. Loopback only; nothing is downloaded. About 1-3 minutes per K
# (process start, warm-up, 30 timed steps); the whole script stays under 10 minutes, and
# `timeout` stops it at 9.
#
#   bash benchmarks/ddp_gpu.sh            # from the repository root, env.sh sourced
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -f env.sh ]; then . ./env.sh; fi
export ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST
gpus=$(python -c 'import torch; print(torch.cuda.device_count())')
if [ "$gpus" -lt 1 ]; then
    echo "ddp_gpu.sh: no CUDA GPU visible (torch.cuda.device_count() = 0)" >&2
    exit 2
fi
nprocs="1"
for k in 2 4; do
    if [ "$gpus" -gt "$k" ]; then nprocs="$nprocs $k"; fi
done
if [ "$gpus" -gt 1 ]; then nprocs="$nprocs $gpus"; fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
# shellcheck disable=SC2086 # nprocs is a list of numbers
timeout 540 python benchmarks/ddp_bench.py --device cuda --nprocs $nprocs --steps 30 \
    --warmup 3 --threads 4 --out benchmarks/results/ddp/gpu

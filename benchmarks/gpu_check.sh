#!/usr/bin/env bash
# The GPU check of the learner path (issue 12): training ms/step, samples/s and peak GPU
# memory of plain BC vs HABC for the small VLA and for TransformersVLA at a realistic size
# (tvla_l: a SmolVLM-256M-like backbone, random weights written to a temporary folder, 16
# prefix layers, bf16 autocast), frozen and LoRA. Sized to finish well under 10 minutes on one
# GPU; not yet run (no GPU was lent to the session that wrote it). Needs a CUDA build of torch
# in .venv. Prints the tables and writes them under OUT (default: benchmarks/results/gpu).
#
#   bash benchmarks/gpu_check.sh [OUT]
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-benchmarks/results/gpu}}"
if [ ! -f env.sh ]; then bash tools/setup.sh; fi
# shellcheck disable=SC1091
. ./env.sh
export ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST
python - <<'PY'
import torch
assert torch.cuda.is_available(), 'no CUDA device: this check needs a GPU (torch sees none)'
print('GPU:', torch.cuda.get_device_name(0), '| torch', torch.__version__)
PY
python benchmarks/bench_training.py --device cuda --models vla tvla_l --methods habc \
    --vla-batch 32 --steps 20 --warmup 5 --latency-calls 50 --out "$out/frozen"
python benchmarks/bench_training.py --device cuda --models tvla_l --finetune lora \
    --methods habc --vla-batch 32 --steps 20 --warmup 5 --out "$out/lora"

#!/usr/bin/env bash
# Every GPU figure of BENCHMARKS.md in one command, on one CUDA GPU (about 8 minutes on an H100/H200):
#   bash benchmarks/gpu.sh [IMAGEFOLDER]      (default ../shared/data/hymenoptera_data)
# 1-2. trial vs ceiling per depth, ResNet18 and ResNet50 at 224 px, bf16, and torch.compile's payback;
# 3. fractional packing, 1 vs 4 trials per GPU; 4. the sweep vs the tutorial-style trainable at 224 px.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-../shared/data/hymenoptera_data}
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'benchmarks/gpu.sh needs a CUDA GPU')"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
for arch in resnet18 resnet50; do
  python benchmarks/bench.py --data "$DATA" --size 224 --arch "$arch" --batch 128 --precision bf16 --seconds 3 \
    --epochs 3 --compile
done
python benchmarks/packing.py
python benchmarks/sweep.py --data "$DATA" --size 224 --precision bf16

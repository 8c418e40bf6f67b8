#!/usr/bin/env bash
# Every GPU figure of BENCHMARKS.md in one command, on one CUDA GPU, in at most 8 minutes: each step runs under
# its own time limit, a step that fails or runs out of time is said and the next one runs, and every figure is
# printed at the end (each step's whole log is in OUT/).
#   bash benchmarks/gpu.sh [IMAGEFOLDER] [OUT]      (defaults: ../shared/data/hymenoptera_data, gpu-bench)
# On the lent GPU machine (no Ray, MLflow or Optuna there): bash ../shared/tools/gpu-site.sh here first, then
#   source .gpu/env.sh && bash benchmarks/gpu.sh .gpu/hymenoptera "$OUT"
# Steps (seconds allowed):
#   1-2. bench.py: trial vs ceiling per depth, ResNet18 (with torch.compile's payback) and ResNet50, 224 px bf16 (90, 70)
#   3.   packing.py: aggregate img/s with 1 vs 4 trials per GPU (60)
#   4.   sweep.py: tl-sweep vs the tutorial-style trainable at 224 px bf16 (100)
#   5.   the whole default study (search_spaces/freeze_depth.yaml, resources.gpu: auto), its wall time (140)
set -uo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-../shared/data/hymenoptera_data}
OUT=${2:-gpu-bench}
mkdir -p "$OUT"
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'benchmarks/gpu.sh needs a CUDA GPU')" || exit 2
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python -c "import sys, torch; print(f'python {sys.version.split()[0]}, torch {torch.__version__}')" | tee -a "$OUT/gpu.txt"
git rev-parse --short HEAD 2>/dev/null | sed 's/^/commit /' | tee -a "$OUT/gpu.txt"

declare -a SUMMARY
step() {  # step NAME SECONDS COMMAND...: runs COMMAND under the limit, its output in OUT/NAME.log
  local name=$1 limit=$2 start rc
  shift 2
  echo "== $name (at most ${limit}s): $*"
  start=$(date +%s)
  timeout -k 10 "$limit" "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  local took=$(($(date +%s) - start))
  case $rc in
    0) SUMMARY+=("$name: ok in ${took}s") ;;
    124 | 137) SUMMARY+=("$name: STOPPED at its ${limit}s limit") ;;
    *) SUMMARY+=("$name: FAILED (exit $rc) after ${took}s: $(grep -v '^\s*$' "$OUT/$name.log" | tail -n 1)") ;;
  esac
  echo "${SUMMARY[-1]}"
}

step bench-resnet18 90 python benchmarks/bench.py --data "$DATA" --size 224 --arch resnet18 --batch 128 \
  --precision bf16 --seconds 2 --epochs 3 --compile
step bench-resnet50 70 python benchmarks/bench.py --data "$DATA" --size 224 --arch resnet50 --batch 128 \
  --precision bf16 --seconds 2 --epochs 3
step packing 60 python benchmarks/packing.py
step sweep 100 python benchmarks/sweep.py --data "$DATA" --size 224 --precision bf16
study=$(mktemp -d)
# its wall time is the step's (start-up, sources pretrained on this machine, 357 trainings, report, models)
step default-study 140 bash -c "cd '$study' && python -m tl_sweep run '$PWD/search_spaces/freeze_depth.yaml' \
  --report-dir '$study/report'"
# no trial worker may abort at its end (Ray's logs of the study's session)
aborts=$(grep -l "Fatal Python error\|lost objects" /tmp/ray/session_latest/logs/worker-* 2>/dev/null | wc -l)
SUMMARY+=("worker logs of the default study with an abort or lost objects: $aborts")
cp "$study/report/report.md" "$OUT/default-study-report.md" 2>/dev/null

echo
echo "================ figures ($(head -n 1 "$OUT/gpu.txt"))"
grep -h "trial/ceiling\|^ *[0-9]\+ \+[0-9]\+ \+[0-9]\+ \+[0-9.]\+ \|cached loader\|torch.compile\|device:" \
  "$OUT"/bench-*.log 2>/dev/null
grep -h "trial(s) per GPU\|packing 4 per GPU" "$OUT/packing.log" 2>/dev/null
grep -h "tl-sweep (Ray\|tutorial-style\|throughput\|start-up" "$OUT/sweep.log" 2>/dev/null
grep -h "resources.gpu auto\|plan:\|sweep finished" "$OUT/default-study.log" 2>/dev/null
echo "================ steps"
printf '%s\n' "${SUMMARY[@]}"

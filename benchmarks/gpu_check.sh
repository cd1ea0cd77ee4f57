#!/usr/bin/env bash
# The GPU check, one script: frog's CUDA tests, the engines and memory tables on the GPU, and a short
# Table I (ResNet18 and ViT on Fashion-MNIST, one epoch each: bp, fg-mean k = 16, frog k = 16 with the
# sim and the jvp engine, activity perturbation, the paper's MNIST step sizes).
#
#   bash benchmarks/gpu_check.sh [--dry-run] [--data-dir DIR] [--steps "tests engines table1 memory"] OUT
#
# --dry-run: the same steps on the CPU at tiny sizes (a 64-image Fashion-MNIST-shaped IDX set made
# here, k = 2, one repeat), to know that every step works before GPU time is spent.
# Writes under OUT at most 8 files (what a device call brings back): summary.log (one line per step:
# exit code, seconds), env.log, tests.log, engines.log, memory.log, table1.log (each run's log and its
# metrics.csv) and table1.csv (model, method, engine, test accuracy, epoch seconds). Each step has its
# own time limit and a failing step does not stop the next. PYTHON (default python3) runs everything,
# with frog taken from src/ (no install needed where torch is).
set -uo pipefail
cd "$(dirname "$0")/.."

dry=0
data=/usr/share/datasets/fashion-mnist
steps="tests engines table1 memory"
while [[ $# -gt 1 ]]; do
  case "$1" in
    --dry-run) dry=1; shift ;;
    --data-dir) data="$2"; shift 2 ;;
    --steps) steps="$2"; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
if [[ $# -ne 1 || "$1" == -* ]]; then
  echo "usage: bash benchmarks/gpu_check.sh [--dry-run] [--data-dir DIR] [--steps \"tests engines table1 memory\"] OUT" >&2
  exit 2
fi
out="$1"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
py="${PYTHON:-python3}"
work="$(mktemp -d)"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

if [[ $dry == 1 ]]; then
  device=cpu; export FROG_TEST_DEVICE=cpu
  ks=(2); repeats=1; batch=4; scale=0.1; memory_sizes=(--k 2 --fc-k 2 --settings "fc weight lowrank")
  data="$work/fashion-mnist"
  "$py" - "$data" <<'EOF'
import gzip, struct, sys
from pathlib import Path
import numpy as np
folder = Path(sys.argv[1]); folder.mkdir(parents=True)
rng = np.random.default_rng(0)
for prefix, n in (("train", 64), ("t10k", 32)):
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = (np.arange(n) % 10).astype(np.uint8)
    (folder / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(struct.pack(">IIII", 2051, n, 28, 28) + images.tobytes()))
    (folder / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(struct.pack(">II", 2049, n) + labels.tobytes()))
EOF
else
  device=cuda
  ks=(16 64); repeats=3; batch=64; scale=1; memory_sizes=()
fi

# step NAME LIMIT_SECONDS COMMAND...: the command's output appended to OUT/NAME.log, one summary line
step() {
  local name="$1" limit="$2"; shift 2
  local start=$SECONDS
  echo "\$ $*" >>"$out/$name.log"
  timeout "$(awk "BEGIN {print int($limit * $scale) + 30}")" "$@" >>"$out/$name.log" 2>&1
  local rc=$?
  echo "$name: rc=$rc $((SECONDS - start)) s: $*" | tee -a "$out/summary.log"
}

{
  date -u; uname -a; nvidia-smi 2>&1 | head -15
  "$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available()); print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')"
} >"$out/env.log" 2>&1

for s in $steps; do
  case $s in
    tests)
      step tests 240 "$py" -m pytest -q -m cuda -rs -p no:cacheprovider $(ls tests/test_{cuda,attention,batchnorm}.py 2>/dev/null) ;;
    engines)
      step engines 120 "$py" benchmarks/engines.py --device $device --model mlp --ks "${ks[@]}" --repeats $repeats --batch $batch \
        --perturbations weight activity --samplers normal lowrank input-span
      for model in resnet18 vit; do  # ResNet18: jvp with and without the fused BatchNorm rule
        step engines 120 "$py" benchmarks/engines.py --device $device --model $model --ks "${ks[0]}" --repeats $repeats --batch $batch \
          --perturbations activity weight --samplers normal lowrank input-span --engines jvp sim \
          $([[ $model == resnet18 ]] && echo --no-fused-batchnorm)
      done
      step engines 60 "$py" benchmarks/engines.py --device $device --model gpt --ks "${ks[0]}" --repeats $repeats \
        --batch $((batch / 2)) --perturbations weight activity --samplers normal lowrank --engines jvp sim ;;
    table1)
      echo "model,method,engine,test_accuracy,epoch_seconds" >"$out/table1.csv"
      for model in resnet18 vit; do
        for run in "bp sim" "fg-mean sim" "frog sim" "frog jvp"; do
          set -- $run
          dir="$work/table1/${model}_$1_$2"
          step table1 150 "$py" -m frog train --model $model --dataset fashion-mnist --data-dir "$data" --gradient $1 \
            -k 16 --engine $2 --perturbation activity --seed 0 --epochs 1 --device $device --out "$dir"
          cat "$dir/metrics.csv" >>"$out/table1.log" 2>/dev/null
          "$py" - "$dir/metrics.csv" "$model,$1,$2" >>"$out/table1.csv" 2>>"$out/table1.log" <<'EOF'
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1])))
print(f"{sys.argv[2]},{rows[-1]['test_accuracy']},{rows[-1]['seconds']}")
EOF
        done
      done ;;
    memory)
      step memory 150 "$py" benchmarks/memory.py --device $device --engines jvp sim "${memory_sizes[@]}" ;;
    *) echo "unknown step $s (tests engines table1 memory)" | tee -a "$out/summary.log" ;;
  esac
done
rm -rf "$work"

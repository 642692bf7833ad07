#!/usr/bin/env bash
# Every GPU benchmark in one call, on a machine that has torch, lightning, timm, torchmetrics
# and peft but not open_clip, Avalanche or an install of Mneme:
#
#   bash benchmarks/gpu_all.sh [WHEELS_DIR] [OUT_DIR] [--smoke]
#
# WHEELS_DIR (default .whl/ in the checkout) holds the wheels of what the machine lacks,
# made on a machine with a package index (Python 3.12, Linux x86_64; 27 MB; the list is what
# `import mneme.app, open_clip, avalanche.training` needs beyond the machine's packages):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --platform manylinux2014_x86_64 -d .whl open_clip_torch==3.3.0 ftfy wcwidth \
#       avalanche-lib==0.6.0 dill gdown requests urllib3 certifi beautifulsoup4 pytorchcv \
#       matplotlib pyparsing cycler python-dateutil kiwisolver fonttools contourpy \
#       tensorboard protobuf absl-py
#   pip wheel --no-deps -w .whl gputil==1.4.0        # published as a source archive only
# Each wheel is unzipped into a scratch folder put on PYTHONPATH, except those the machine
# already has (its own versions win); stand-in empty `wandb` and `qpsolvers` packages are
# added when absent (Avalanche imports both; nothing logs to wandb, GEM's solver is unused,
# and qpsolvers would bring scipy, 36 MB); Mneme is put on PYTHONPATH as `mneme` through
# symlinks (mneme/app -> app, ...), as pyproject's package-dir maps it when installed.
#
# Runs benchmarks.gpu_classifier (resnet18 32x32, batch 256, bf16-mixed; naive/Replay/EWC;
# Mneme eager and compiled, a plain loop eager and compiled, Avalanche) and
# benchmarks.align_throughput (ViT-B-32, batch 512, bf16-mixed; Mneme eager and compiled, a
# plain loop eager and compiled). Output (tables, JSON) in OUT_DIR (default gpu_results/).
# --smoke runs both at their CPU-sized --smoke settings (to check this script without a GPU).
# Environment: PYTHON (default python3), BENCH_TIMEOUT (seconds per benchmark, default none),
# CLASSIFIER_ARGS / ALIGN_ARGS (more arguments for each, to size a run: e.g.
# CLASSIFIER_ARGS="--strategies naive,replay --steps 30"). Not timed on a GPU yet: expect
# minutes, most of it inductor compiling (resnet18 per strategy, ViT-B-32's two towers).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WHEELS="${1:-$REPO/.whl}"
OUT="${2:-$REPO/gpu_results}"
SMOKE=()
if [[ "${3:-}" == "--smoke" ]]; then SMOKE=(--smoke); fi
read -r -a PY <<<"${PYTHON:-python3}"
TIMEOUT="${BENCH_TIMEOUT:-0}"

mkdir -p "$OUT"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/site" "$WORK/shim/mneme"

# 1. The wheels the machine lacks, unzipped (a wheel is a zip of its site-packages files).
installed() {  # a distribution name -> 0 when the machine has it
  "${PY[@]}" -c 'import importlib.metadata as m, sys; m.version(sys.argv[1])' "$1" 2>/dev/null
}
shopt -s nullglob
for wheel in "$WHEELS"/*.whl; do
  name="$(basename "$wheel")"
  dist="${name%%-*}"
  if installed "$dist"; then
    echo "gpu_all: $dist is installed; not using $name"
    continue
  fi
  "${PY[@]}" -m zipfile -e "$wheel" "$WORK/site"
done
# Stand-ins for what Avalanche imports at import time but these benchmarks never call:
# wandb (its logger) and qpsolvers (GEM's solver; with it scipy, a 36 MB wheel).
for module in wandb qpsolvers; do
  if ! PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}" "${PY[@]}" -c "import $module" \
    2>/dev/null; then
    mkdir -p "$WORK/site/$module"
    echo "\"\"\"Stand-in for $module (imported by Avalanche, unused here).\"\"\"" \
      >"$WORK/site/$module/__init__.py"
  fi
done

# 2. Mneme as `mneme.app`, `mneme.callbacks`, `mneme.datamodules` (a namespace package).
for part in app callbacks datamodules; do ln -s "$REPO/$part" "$WORK/shim/mneme/$part"; done

export PYTHONPATH="$WORK/shim:$REPO:$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONWARNINGS="${PYTHONWARNINGS:-ignore}"
cd "$REPO"
"${PY[@]}" -c 'import mneme.app, open_clip, avalanche.training; print("gpu_all: imports ok")'
if command -v nvidia-smi >/dev/null; then nvidia-smi --query-gpu=name,memory.total --format=csv; fi

run() {  # NAME ARGS...: one benchmark, its table to OUT/NAME.txt
  local name="$1"
  shift
  echo "gpu_all: $name $*"
  local start=$SECONDS
  timeout "$TIMEOUT" "${PY[@]}" -m "benchmarks.$name" "$@" 2>"$OUT/$name.log" | tee "$OUT/$name.txt"
  echo "gpu_all: $name took $((SECONDS - start)) s"
}

read -r -a CLASSIFIER_EXTRA <<<"${CLASSIFIER_ARGS:-}"
read -r -a ALIGN_EXTRA <<<"${ALIGN_ARGS:-}"
status=0
run gpu_classifier --out "$OUT/gpu_classifier.json" "${CLASSIFIER_EXTRA[@]}" "${SMOKE[@]}" \
  || status=$?
run align_throughput --model ViT-B-32 --batch-size 512 --precision bf16-mixed --compile \
  --no-write "${ALIGN_EXTRA[@]}" "${SMOKE[@]}" || status=$?
exit $status

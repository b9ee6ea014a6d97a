#!/usr/bin/env bash
# One command for any machine with an NVIDIA GPU, with or without TensorRT (under 5 minutes):
#   1. environment: driver, CUDA, which of tensorrt / onnxruntime(-gpu) / cuda-bindings / torch import
#   2. runtime/trt.py's CUDA half with a stub engine (pinned buffers, replays with fresh inputs, CUDA graphs)
#   3. the PyTorch reference on CUDA (training/sample.py --device cuda, fp32 and bf16) and FAR vs MAR timing
#   4. pytest -m "gpu or tensorrt" where TensorRT imports
# Each line says ok / skipped (why) / FAILED; the last line sums up how many check groups ran on a GPU and
# how many were skipped. A CPU-only machine gets skips and exit 0, unless --require-gpu: then it fails when
# nothing could run on a GPU.
# Set PYTHON to choose the interpreter (default: .venv/bin/python, else python3); OUT for the images.
set -uo pipefail
cd "$(dirname "$0")/.."
require_gpu=0
for arg in "$@"; do
    case "$arg" in
        --require-gpu) require_gpu=1 ;;
        *) echo "Error: unknown argument '$arg'; use --require-gpu" >&2; exit 2 ;;
    esac
done
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
OUT=${OUT:-$(mktemp -d)}
status=0
ran=0
skipped=0

"$PY" scripts/gpu_check.py env || status=1
stub=$("$PY" scripts/gpu_check.py stub) || status=1
echo "$stub"
if grep -q '^skipped:' <<<"$stub"; then skipped=$((skipped + 1)); else ran=$((ran + 1)); fi

if "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    for flag in "" "--bf16"; do
        if timeout 120 "$PY" training/sample.py --checkpoint checkpoints/far-mnist --classes 0-9 --per-class 2 \
            --device cuda $flag --out "$OUT/reference${flag}.png" >/dev/null 2>&1; then
            echo "ok: training/sample.py --device cuda $flag -> $OUT/reference${flag}.png"
        else
            echo "FAILED: training/sample.py --device cuda $flag"; status=1
        fi
    done
    timeout 150 "$PY" scripts/gpu_check.py timing || status=1
    ran=$((ran + 1))
else
    echo "skipped: PyTorch reference on CUDA (training/sample.py --device cuda, FAR vs MAR timing): no CUDA device visible to torch"
    skipped=$((skipped + 1))
fi

if "$PY" -c "import tensorrt; tensorrt.Runtime" >/dev/null 2>&1; then
    timeout 240 "$PY" -m pytest -q -m "gpu or tensorrt" || status=1
    ran=$((ran + 1))
else
    echo "skipped: pytest -m 'gpu or tensorrt': tensorrt does not import here"
    skipped=$((skipped + 1))
fi
echo "summary: $ran check groups ran on a GPU, $skipped skipped$([ $status -ne 0 ] && echo ', some FAILED')"
if [ $require_gpu -eq 1 ] && [ $ran -eq 0 ]; then
    echo "FAILED: --require-gpu: no check could run on a GPU here" >&2
    exit 1
fi
exit $status

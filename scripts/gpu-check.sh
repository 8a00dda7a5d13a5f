#!/usr/bin/env bash
# make gpu-check: the GPU path proven on this machine, into runs/gpu-check/report.md
# (docs/gpu.md). One line and exit 0 where there is no GPU; GPU_CHECK_CPU=1 runs the sequence
# on the CPU at tiny sizes. The node's part needs only a Python 3 (the standard library): on a
# node image without the project's venv it runs with python3 and says what it skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}  # make gpu-check VENV=.venv-tf2.17: that stack's venv
if [ -x "$VENV/bin/python" ]; then PY=$VENV/bin/python; else PY=$(command -v python3); fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}
exec "$PY" -m pipeline.bench.gpucheck --out "${GPU_CHECK_OUT:-runs/gpu-check}"

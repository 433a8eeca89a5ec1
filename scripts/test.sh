#!/usr/bin/env bash
# Create or refresh .venv/, install bridgeta with its test extras (CPU torch pinned by
# constraints.txt; deploy = onnx + onnxruntime, so the ONNX parity tests run), and run the whole
# test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install --quiet -c constraints.txt -e '.[test,nuscenes,synth,deploy]'
exec .venv/bin/python -m pytest "$@"

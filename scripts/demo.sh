#!/usr/bin/env bash
# Create .venv/, install bridgeta (CPU torch pinned by constraints.txt), run the main job.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install --quiet -c constraints.txt -e '.[nuscenes,synth]'
exec .venv/bin/bridgeta demo "$@"

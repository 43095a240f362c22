#!/usr/bin/env bash
# Creates ./.venv with CPU torch and the pack's requirements (idempotent).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  # A CPU build; never let pip pull a multi-GB CUDA wheel here. Users of the pack keep their own torch.
  .venv/bin/pip install -q torch==2.13.0
fi
.venv/bin/pip install -q -r requirements.txt pytest

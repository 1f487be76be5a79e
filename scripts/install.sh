#!/usr/bin/env bash
# Create .venv (if missing) and install dpfpl with its test extra.
# torch is pinned to the CPU wheel first so that pip does not pull a CUDA build;
# on a GPU host install the torch build you want first and this script keeps it.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
python -c "import torch" 2>/dev/null || python -m pip install --quiet "torch==2.13.0"
python -m pip install --quiet -e ".[test]"

#!/usr/bin/env bash
# Install, then run the whole test suite (unit, in-process Flower, real flwr run).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
. .venv/bin/activate
export DPFPL_CACHE="${DPFPL_CACHE:-$PWD/.cache/dpfpl}"
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
dpfpl build-backbone dpfpl-tiny-digits
python -m pytest -q "$@"

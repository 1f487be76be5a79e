#!/usr/bin/env bash
# Install, then run the offline main job: DP-FPL, 10 clients, digits, per-sample DP.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
. .venv/bin/activate
# flwr run would otherwise install the app's dependencies into a fresh env per run
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
dpfpl build-backbone dpfpl-tiny-digits
flwr run . --stream --federation-config "num-supernodes=10" "$@"
latest=$(ls -td runs/*/ | head -1)
dpfpl summary "$latest"

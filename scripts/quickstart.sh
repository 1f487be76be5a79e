#!/usr/bin/env bash
# Install, then run the offline main job (configs/main-job.toml): DP-FPL, 10 clients with
# 10 of the glyph testbed's 100 classes each, per-sample DP.
# Extra arguments go to `flwr run` (e.g. --run-config "num-server-rounds=5").
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
. .venv/bin/activate
# flwr run would otherwise install the app's dependencies into a fresh env per run
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
dpfpl build-backbone dpfpl-tiny-glyphs
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
flwr run . --stream --federation-config "num-supernodes=10" \
    --run-config "$(python scripts/run_config_args.py configs/main-job.toml)" "$@" | tee "$log"
# Summarise the run started above, not the newest folder: a SuperLink left running by an
# earlier `flwr run` writes runs under its own working directory, which the ServerApp
# logs as an absolute path.
plain="$(sed 's/\x1b\[[0-9;]*m//g' "$log")"
run_id="$(sed -n 's/.*Successfully started run \([0-9][0-9]*\).*/\1/p' <<<"$plain" | tail -1)"
if [ -z "$run_id" ]; then
    echo "quickstart.sh: flwr run started no run (see its output above)" >&2
    exit 1
fi
run_dir="$(sed -n 's/.*results directory: //p' <<<"$plain" | tail -1)"
if [ -z "$run_dir" ] || [ ! -f "$run_dir/results.json" ]; then
    echo "quickstart.sh: run $run_id wrote no results; its status:" >&2
    flwr list --run-id "$run_id" --format json >&2
    exit 1
fi
echo "run $run_id: $run_dir"
dpfpl summary "$run_dir"

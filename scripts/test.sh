#!/usr/bin/env bash
# Install, then run the whole test suite (unit, in-process Flower, real flwr run).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
. .venv/bin/activate
# The cache scripts/quickstart.sh builds into (dpfpl_app/cache.py), so the two share one backbone
export DPFPL_CACHE="${DPFPL_CACHE:-$HOME/.cache/dpfpl}"
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
# The tests' Flower processes send Flower no usage events (each ServerApp and ClientApp
# process otherwise waits up to 4 s for its event to be sent before it exits)
export FLWR_TELEMETRY_ENABLED=0
dpfpl build-backbone dpfpl-tiny-digits
# Two test processes on two cores (DPFPL_TEST_PROCESSES=0: one): --dist loadfile keeps each
# file in one process, so a module's federation of real processes is started once, and
# tests/scheduling.py gives both deployment modules to one process, one after the other
# (side by side they overloaded the machine); --no-loadscope-reorder keeps the order
# tests/conftest.py gives (the long real-process modules first).
python -m pytest -q -n "${DPFPL_TEST_PROCESSES:-2}" --dist loadfile --no-loadscope-reorder \
    --durations=25 "$@"

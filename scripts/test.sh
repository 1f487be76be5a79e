#!/usr/bin/env bash
# Install, then run the whole test suite (unit, in-process Flower, real flwr run).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
. .venv/bin/activate
export DPFPL_CACHE="${DPFPL_CACHE:-$PWD/.cache/dpfpl}"
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
dpfpl build-backbone dpfpl-tiny-digits
# Two test processes (DPFPL_TEST_PROCESSES=0: one): the deployment and `flwr run` tests
# mostly wait on real processes and heartbeats while the other process computes.
# --dist loadfile keeps each file in one process, so a module's federation of real
# processes is started once.
python -m pytest -q -n "${DPFPL_TEST_PROCESSES:-2}" --dist loadfile "$@"

#!/usr/bin/env bash
# Create .venv (if missing) and install dpfpl with its test extra, at the exact versions
# of requirements.lock (refresh it with `bash scripts/lock.sh`).
# torch is installed first as the locked CPU wheel so that pip does not pull a CUDA
# build; on a GPU host install the torch build you want first and this script keeps it
# (every other package still comes from the lock). TORCH_INDEX_URL: where the locked
# CPU torch is found (default PyTorch's CPU index; only torch itself is looked up there).
set -euo pipefail
cd "$(dirname "$0")/.."
LOCK=requirements.lock
TORCH_INDEX_URL="${TORCH_INDEX_URL-https://download.pytorch.org/whl/cpu}"
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
locked_torch="$(grep '^torch==' "$LOCK")"
constraints="$LOCK"
if installed="$(python -c 'import torch; print(torch.__version__)' 2>/dev/null)"; then
    if [ "torch==$installed" != "$locked_torch" ]; then
        echo "install.sh: keeping the installed torch $installed (the lock has $locked_torch)"
        constraints="$(mktemp)"
        trap 'rm -f "$constraints"' EXIT
        grep -v '^torch==' "$LOCK" >"$constraints"
    fi
else
    python -m pip install --quiet --no-deps "$locked_torch" \
        ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"}
fi
python -m pip install --quiet -c "$constraints" -e ".[test]"

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
# The glyph testbed (the main job's data) renders characters from Debian's font packages
# (dpfpl_app/data/glyphs.py, FONT_PACKAGES); installed here when apt-get can, else named.
fonts="fonts-dejavu-core fonts-liberation2 fonts-freefont-ttf fonts-urw-base35 fonts-cmu fonts-ebgaramond"
# shellcheck disable=SC2086
if ! dpkg -s $fonts >/dev/null 2>&1; then
    if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $fonts \
            >/dev/null) || echo "install.sh: could not install $fonts (the glyph testbed needs them)"
    else
        echo "install.sh: the glyph testbed needs Debian's $fonts (apt-get install them)"
    fi
fi

#!/usr/bin/env bash
# Rewrite requirements.lock: every package a fresh install gets today, at exact versions.
#
#   bash scripts/lock.sh
#
# Builds a throwaway venv, installs the CPU torch and then this package with its test
# extra WITHOUT the lock (so pip picks the newest versions pyproject.toml allows), and
# freezes the result. Review the diff, run the tests, update the Flower image tags in
# docker/ if flwr moved (tests/test_deploy_docker.py holds them to the lock), commit.
# TORCH_INDEX_URL picks where the CPU torch comes from (default: PyTorch's CPU index);
# only torch itself is looked up there (--no-deps), its dependencies come from PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_VERSION="${TORCH_VERSION:-2.13.0+cpu}"
TORCH_INDEX_URL="${TORCH_INDEX_URL-https://download.pytorch.org/whl/cpu}"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
python3 -m venv "$tmp/venv"
py="$tmp/venv/bin/python"
"$py" -m pip install --quiet --upgrade pip
"$py" -m pip install --quiet --no-deps "torch==$TORCH_VERSION" \
    ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"}
"$py" -m pip install --quiet -e ".[test]"
{
    echo "# Exact versions of a fresh install (Python $("$py" -c 'import platform; print(platform.python_version())'), $(date -u +%Y-%m-%d))."
    echo "# Installed by scripts/install.sh as pip constraints. Do not edit by hand:"
    echo "# regenerate with \`bash scripts/lock.sh\`."
    "$py" -m pip freeze --exclude-editable
} >"$tmp/requirements.lock"
mv "$tmp/requirements.lock" requirements.lock
echo "requirements.lock: $(grep -c '==' requirements.lock) pinned packages, $(grep '^flwr==' requirements.lock)"

#!/usr/bin/env bash
# Install fedgrpc, its dev tools and the optional Ray backend into .venv on a fresh machine.
# The CPU build of PyTorch goes in first: a bare `torch` requirement with no torch installed
# would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "torch==2.13.0"
# The `ray` extra: `fedgrpc simulate --backend ray` and its tests.
.venv/bin/python -m pip install --quiet -e ".[dev,ray]"
.venv/bin/fedgrpc --version
echo "installed: activate with 'source .venv/bin/activate' or call .venv/bin/fedgrpc"

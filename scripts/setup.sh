#!/usr/bin/env bash
# Create ./.venv and install the package with the torch/torchvision this project is tested with.
# Usage: bash scripts/setup.sh [extras]      e.g. bash scripts/setup.sh test
set -euo pipefail
cd "$(dirname "$0")/.."
extras=${1:-}
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
# Exact pins on the install path (pyproject.toml keeps a range, so clusters with another torch can install too).
.venv/bin/pip install --quiet --disable-pip-version-check torch==2.14.1 torchvision==0.29.1
.venv/bin/pip install --quiet --disable-pip-version-check -e ".${extras:+[$extras]}"
echo "setup: $(.venv/bin/python -c 'import torch, torchvision; print("torch", torch.__version__, "torchvision", torchvision.__version__)') in .venv"

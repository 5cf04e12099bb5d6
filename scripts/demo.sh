#!/usr/bin/env bash
# Set up .venv, then run the whole job on built-in, generated data: generate -> shard -> train (torchrun on every
# GPU, or 2 CPU processes) -> evaluate -> classify a few images. Outputs go to ./demo_out.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m mushroom_demo --out demo_out "$@"

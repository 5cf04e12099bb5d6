#!/usr/bin/env bash
# Set up .venv with the test extras and run the whole test suite (what CI runs).
# The SLURM tests need Debian's SLURM packages; as root they are installed here, otherwise those tests skip.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
    bash .ci/install_slurm.sh || echo "test.sh: could not install SLURM; the slurm tests will skip" >&2
fi
exec .venv/bin/python -m pytest "$@"

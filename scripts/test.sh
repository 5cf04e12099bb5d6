#!/usr/bin/env bash
# Set up .venv with the test extras and run the whole test suite (what CI runs).
# The SLURM tests need Debian's SLURM packages; as root they are installed here, otherwise those tests skip.
# In CI (CI=true) as root a failed install fails the run: the SLURM tests must not turn into skips there.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
    if ! bash .ci/install_slurm.sh; then
        if [ "${CI:-}" = "true" ]; then
            echo "test.sh: could not install SLURM, and CI=true needs the slurm tests to run" >&2
            exit 1
        fi
        echo "test.sh: could not install SLURM; the slurm tests will skip" >&2
    fi
fi
exec .venv/bin/python -m pytest "$@"

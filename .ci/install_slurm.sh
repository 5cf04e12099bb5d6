#!/usr/bin/env bash
# Install Debian's SLURM + munge packages for the `slurm` tests (tests/slurm_cluster.sh starts them).
# Idempotent and quiet: does nothing when the commands are already there.
set -euo pipefail

if command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
   && command -v sbatch >/dev/null && command -v munged >/dev/null; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "install_slurm.sh: needs root to apt-get install slurmctld slurmd slurm-client munge" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
log=$(mktemp)
trap 'rm -f "$log"' EXIT
quietly() { "$@" >"$log" 2>&1 || { cat "$log" >&2; echo "install_slurm.sh: '$*' failed" >&2; exit 1; }; }
quietly apt-get update
# policy-rc.d keeps the packages' postinst from starting services (no init system in CI containers);
# only a policy file this script created is removed again.
if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
    trap 'rm -f "$log" /usr/sbin/policy-rc.d' EXIT
fi
quietly apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge

#!/bin/bash
# Shard a dataset on SLURM: plan, then SLICES array tasks, then the merge, chained with afterok (a job cannot
# depend on itself, hence three submissions). Settings are slurm/shard.sbatch's environment variables.
#
#   IMAGES=/data/photos LABELS=/data/labels.csv OUT=/data/shards SLICES=16 \
#       slurm/submit_shard.sh [--wait] [sbatch options for all three, e.g. --cpus-per-task=8 --time=2:00:00]
#
# Prints the three job ids. If a step fails, the steps after it are cancelled (--kill-on-invalid-dep), so nothing
# waits forever. With --wait it returns when the merge has ended: 0 only if the merge wrote a new manifest.json.
set -euo pipefail

here=$(dirname "$(readlink -f "$0")")
SLICES=${SLICES:-8}
wait=()
if [ "${1:-}" = --wait ]; then wait=(--wait); shift; fi
: "${OUT:?set OUT, the output folder}" "${IMAGES:?set IMAGES, the image folder}" "${LABELS:?set LABELS, the CSV}"

job_id() { echo "${1%%;*}"; }   # --parsable prints "id" or "id;cluster"

plan=$(job_id "$(sbatch --parsable "$@" --job-name=shard-plan "$here/shard.sbatch" plan)")
build=$(job_id "$(sbatch --parsable "$@" --job-name=shard-build --array="0-$((SLICES - 1))" \
    --output='slurm-%x-%A_%a.out' --dependency="afterok:$plan" --kill-on-invalid-dep=yes \
    "$here/shard.sbatch" build)")
echo "plan $plan, build array $build (${SLICES} slices), merge:"
submitted=$(date +%s)
sbatch --parsable "${wait[@]}" "$@" --job-name=shard-merge --dependency="afterok:$build" --kill-on-invalid-dep=yes \
    "$here/shard.sbatch" merge
# sbatch --wait reports 0 for a merge that was cancelled because an earlier step failed: trust a fresh manifest.
if [ ${#wait[@]} -gt 0 ] && [ "$(stat -c %Y "$OUT/manifest.json" 2>/dev/null || echo 0)" -lt "$submitted" ]; then
    echo "submit_shard.sh: no new $OUT/manifest.json: a step failed, see slurm-shard-*.out" >&2
    exit 1
fi

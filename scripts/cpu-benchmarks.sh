#!/bin/bash
# Every cpu benchmark of docs/results.md, docs/detection.md and docs/methods/*.md, one job at a
# time (2 cores), in the order of the issues. Each step resumes: finished runs are reused, killed
# runs continue from their last checkpoint, so run this again after any interruption.
#   usage: scripts/cpu-benchmarks.sh [LOG]   (from the repository root, with bridgeta installed)
# The multi-task steps read a copy of the cpu world prepared with boxes and tracks (WORK_MT/world:
# `bridgeta data prepare --dataroot WORK_MT/world`), next to the cpu world's backbone.
set -euo pipefail
log=${1:-runs/cpu-benchmarks.log}
work=${WORK:-runs/p4}
work_mt=${WORK_MT:-runs/p4mt}
mkdir -p "$(dirname "$log")"
# A failed step is logged and the queue goes on: the later tables do not depend on it (the
# tinybev step reuses cpu-mt's teacher run, and trains it itself if that step failed before it).
# The script's exit status is 1 if any step failed.
failed=0
step() {
    echo "== $(date -u '+%F %H:%M') $*" >> "$log"
    "$@" >> "$log" 2>&1 || { echo "!! $(date -u '+%F %H:%M') failed ($?): $*" >> "$log"; failed=1; }
}
# 1. the cpu protocol's methods (issue 11)
step bridgeta bench accuracy --preset cpu --jobs 1 --work "$work" --out results/accuracy-cpu \
    --methods baseline direct feature_kd logit_kd bridgeta fixed_epsilon
# 2. seed 0 of the headline methods trained again on this commit (issue 11's reproducibility):
#    right after their table, so that issue 11 does not wait for the later tables
step bridgeta bench accuracy --preset cpu --jobs 1 --work "$work" --out results/accuracy-cpu --reproduce \
    --methods baseline direct feature_kd logit_kd bridgeta fixed_epsilon
# 3. the full cpu preset: MonoTAKD's rows and ablations (issue 13); --reproduce again, so that the
#    table keeps the reruns above (reused) and adds MonoTAKD's
step bridgeta bench accuracy --preset cpu --jobs 1 --work "$work" --out results/accuracy-cpu --reproduce
# 4. the detection table (issue 14)
step bridgeta bench accuracy --preset cpu-mt --jobs 1 --work "$work_mt" --out results/accuracy-mt
# 5. TinyBEV's multi-task table (issue 15)
step bridgeta bench accuracy --preset cpu-tinybev --jobs 1 --work "$work_mt" --out results/accuracy-tinybev
# 6. inference cost of every pair, alone on the CPU (the tinybev pair has gained its occupancy head)
step bridgeta bench cost --repeats 5 --out results/cost.json
echo "== $(date -u '+%F %H:%M') done" >> "$log"
exit "$failed"

#!/bin/bash
# Every cpu benchmark of docs/results.md, docs/detection.md and docs/methods/*.md, one job at a
# time (2 cores), the open issues' tables first. Each step resumes: runs recorded in the ledgers
# (results/ledger/p4, results/ledger/mt; commit them as they come) are not trained again on any
# machine, killed runs continue from their last checkpoint on the machine that holds it. So run
# this again after any interruption, in this session or a later one (docs/results.md, "the ledger").
# A ledger is tied to the machine type it was recorded on (its machine.json: AVX512 or AVX2): on
# another type its step fails at once, before generating a world, and the queue goes on.
#   usage: scripts/cpu-benchmarks.sh [LOG]   (from the repository root, with bridgeta installed)
# The cpu protocol's ledger was recorded on an AVX-512 machine with native bf16. To measure it
# again from its world up on another machine type, give it a work directory, ledger and results
# folder of its own, e.g. WORK=runs/p4-avx2 LEDGER=results/ledger/p4-avx2 SUFFIX=-avx2: the
# tables then land in results/accuracy-cpu-monotakd-avx2 and results/accuracy-cpu-avx2.
set -euo pipefail
log=${1:-runs/cpu-benchmarks.log}
work=${WORK:-runs/p4}
ledger=${LEDGER:-results/ledger/p4}
suffix=${SUFFIX:-}
work_mt=${WORK_MT:-runs/mt}
mkdir -p "$(dirname "$log")"
# A failed step is logged and the queue goes on: the later tables do not depend on it (the
# tinybev step reuses cpu-mt's teacher run, and trains it itself if that step failed before it).
# The script's exit status is 1 if any step failed.
failed=0
step() {
    echo "== $(date -u '+%F %H:%M') $*" >> "$log"
    "$@" >> "$log" 2>&1 || { echo "!! $(date -u '+%F %H:%M') failed ($?): $*" >> "$log"; failed=1; }
}
cpu=(bridgeta bench accuracy --preset cpu --jobs 1 --work "$work" --ledger "$ledger")
# 1. MonoTAKD's rows, ablations and compute control on the cpu protocol (issue 13), with the
#    teacher, baselines, TA, direct and BridgeTA they are paired with (at their chosen weights);
#    the sweep of these three, beside its table. First MonoTAKD's own sweep, its 3 seeds and the
#    longer baseline, on 3 baseline seeds: the rows the issue waits for, in the fewest hours
#    (about 5 on AVX2 after the world and teacher); the full step reuses every one of them.
step "${cpu[@]}" --out "results/accuracy-cpu-monotakd$suffix" --methods monotakd baseline_long --seeds 3
#    Then the rows MonoTAKD is compared with, on the same 3 seeds: direct and BridgeTA, each with
#    its own sweep; then its ablations (2 seeds each), which complete the issue's table; seeds
#    3-4 of the headline methods come last.
step "${cpu[@]}" --out "results/accuracy-cpu-monotakd$suffix" --methods direct bridgeta monotakd baseline_long --seeds 3
step "${cpu[@]}" --out "results/accuracy-cpu-monotakd$suffix" \
    --methods direct bridgeta monotakd monotakd_imd_only monotakd_cmrd_only monotakd_no_sam monotakd_no_ffm monotakd_shared baseline_long --seeds 3
step "${cpu[@]}" --out "results/accuracy-cpu-monotakd$suffix" \
    --methods direct bridgeta monotakd monotakd_imd_only monotakd_cmrd_only monotakd_no_sam monotakd_no_ffm monotakd_shared baseline_long
# 2. inference cost of every pair (MonoTAKD's deployed student beside the baseline: issue 13's
#    last table), alone on the CPU; it builds the networks and needs no trained run
step bridgeta bench cost --repeats 5 --out results/cost.json
# The detection presets' world is its own (synth preset tiny-traffic, busy streets), with its own
# backbone: bench accuracy generates and pretrains them under $work_mt the first time.
mt=(bridgeta bench accuracy --jobs 1 --work "$work_mt" --ledger results/ledger/mt)
# 3. the detection table (issue 14). At 800 steps a camera student detects nothing (mAP 0 on the
#    camera rows whatever we tried, docs/detection.md); the table still gives the teacher's
#    detection and every row's map, and its teacher is TinyBEV's aligned teacher
step "${mt[@]}" --preset cpu-mt --out results/accuracy-mt
# 4. TinyBEV's multi-task table (issue 15): its map, motion and planning columns do not need a
#    detecting camera
step "${mt[@]}" --preset cpu-tinybev --out results/accuracy-tinybev
# 5. the whole cpu protocol's table on this commit (issue 11's, first measured at 2dcd721), with
#    the reruns of seed 0 of the headline methods; it reuses every run above
step "${cpu[@]}" --out "results/accuracy-cpu$suffix" --reproduce
echo "== $(date -u '+%F %H:%M') done" >> "$log"
exit "$failed"

#!/usr/bin/env bash
# Step stall of a checkpoint save, before and after asynchronous saving: the same one-rank
# training run (a 153 MB state: 4 layers, hidden 512, fp32) with a save every EVERY steps, timed
# step by step against the same run without saves (bench/checkpoint/stall.py), with the worker
# of BEFORE (a commit: 8e0fa82, the last one that saved synchronously) and with this tree's, on
# each number of THREADS. Prints both; --record writes bench/results/<date>-checkpoint.md.
#
#   bench/checkpoint/run.sh [--record]   knobs: BEFORE=rev STEPS=24 EVERY=4 RUNS=3 THREADS="1 2" DIR=...
set -euo pipefail

cd -- "$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)/../.."
BEFORE=${BEFORE:-8e0fa82}
STEPS=${STEPS:-24}
EVERY=${EVERY:-4}
RUNS=${RUNS:-3}
THREADS=${THREADS:-1 2}
RECORD=""
for arg in "$@"; do
  case "$arg" in
    --record) RECORD=1 ;;
    -h|--help) sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown argument: $arg (the only flag is --record)" >&2; exit 2 ;;
  esac
done
SCRATCH=$(mktemp -d)
trap 'rm -rf "$SCRATCH"' EXIT
DIR=${DIR:-$SCRATCH/ckpt}
TARGET=${CARGO_TARGET_DIR:-$PWD/target}

# The old worker: its source from git, built in the same target directory (its dependencies
# are shared; the workspace's own crates rebuild), the binary copied out.
mkdir "$SCRATCH/before"
git archive "$BEFORE" | tar -x -C "$SCRATCH/before"
(cd "$SCRATCH/before" && CARGO_TARGET_DIR=$TARGET cargo build --release -q -p tessera-worker)
cp "$TARGET/release/tessera-worker" "$SCRATCH/worker-before"
cargo build --release -q -p tessera-worker
cp "$TARGET/release/tessera-worker" "$SCRATCH/worker-after"

MODEL=(--set parallel.data=1 --set parallel.tensor=1 --set parallel.pipeline=1
  --set cluster.gpus_per_node=1 --set model.layers=4 --set model.hidden=512
  --set model.heads=8 --set model.ffn_hidden=2048 --set model.seq_len=64
  --set training.global_batch=4 --set training.micro_batch=2)
load_before=$(cut -d' ' -f1-3 /proc/loadavg)
for threads in $THREADS; do
  for side in before after; do
    for run in $(seq "$RUNS"); do
      python3 bench/checkpoint/stall.py --worker "$SCRATCH/worker-$side" --dir "$DIR" \
        --threads "$threads" --steps "$STEPS" --every "$EVERY" "${MODEL[@]}" \
        > "$SCRATCH/$threads.$side.$run.json"
      echo "$threads threads, $side, run $run: $(cat "$SCRATCH/$threads.$side.$run.json")"
    done
  done
done
load_after=$(cut -d' ' -f1-3 /proc/loadavg)

summary=$(python3 - "$SCRATCH" "$RUNS" $THREADS <<'PY'
import json, statistics, sys
scratch, runs, threads = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
print("| threads | worker | step without a save, s | loop blocked by a save, s: median (min - max) | whole window's extra time, s: median (min - max) | saves | checkpoint bytes |")
print("|---:|---|---:|---:|---:|---:|---:|")
ratios = []
for t in threads:
    medians = {}
    for side in ("before", "after"):
        results = [json.load(open(f"{scratch}/{t}.{side}.{r}.json")) for r in range(1, runs + 1)]
        blocked = [s for r in results for s in r["blocked_s"]]
        window = [s for r in results for s in r["window_s"]]
        base = statistics.median(r["baseline_step_s"] for r in results)
        medians[side] = (statistics.median(blocked), statistics.median(window))
        print(f"| {t} | {side} | {base:.3f} | {medians[side][0]:.3f} ({min(blocked):.3f} - {max(blocked):.3f}) "
              f"| {medians[side][1]:.3f} ({min(window):.3f} - {max(window):.3f}) | {len(blocked)} | {results[0]['checkpoint_bytes']} |")
    ratios.append((t, medians))
print()
for t, m in ratios:
    print(f"{t} threads: the loop blocked by a save {m['before'][0]:.3f} -> {m['after'][0]:.3f} s; "
          f"the whole window's extra time {m['before'][1]:.3f} -> {m['after'][1]:.3f} s")
PY
)
echo "$summary"
if [ -n "$RECORD" ]; then
  date=$(date +%F)
  out="bench/results/$date-checkpoint.md"
  {
    echo "# Step stall of a checkpoint save, before and after asynchronous saving, $date"
    echo
    echo "Measured by \`bench/checkpoint/run.sh --record\` (see bench/checkpoint/README.md)."
    echo
    echo "## Machine"
    echo
    echo "- CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores; load average $load_before before, $load_after after"
    echo "- Disk of the checkpoint directory: $(df -T "$(dirname "$DIR")" | awk 'NR==2 {print $2, $1}')"
    echo "- OS: $(. /etc/os-release && echo "$PRETTY_NAME"), kernel $(uname -r); $(rustc --version)"
    echo "- before: $BEFORE (synchronous save); after: $(git rev-parse --short HEAD)$(git diff --quiet || echo ' + uncommitted changes')"
    echo
    echo "## Results"
    echo
    echo "One rank, \`configs/tiny-cpu.yaml\` with ${MODEL[*]}, fp32, \`--threads\` $THREADS; $STEPS steps, a save every $EVERY (the last one, which the end of the run waits for, left out), $RUNS runs per worker and thread count. Negative numbers are steps faster than the baseline's median (noise)."
    echo
    echo "$summary"
  } > "$out"
  echo "wrote $out"
fi

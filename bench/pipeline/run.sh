#!/usr/bin/env bash
# Pipeline bubble: trains an 8-layer tiny GPT on P CPU workers (pipeline P, no other
# parallelism) with M microbatches per step under 1F1B and under interleaved 1F1B with 2 model
# chunks per stage, records a trace of each run (`launch --trace`) and prints each stage's
# measured idle fraction (outside the optimizer) next to the schedule's bubble: (P-1)/(M+P-1)
# for 1F1B, (P-1)/(2M+P-1) interleaved. With --record writes
# bench/results/<date>-pipeline-bubble-p<P>.md.
#
#   [P=2] [M=8] [STEPS=6] bench/pipeline/run.sh [--record]   (one worker process per stage)
set -euo pipefail

cd -- "$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)/../.."
P=${P:-2}
M=${M:-8}
STEPS=${STEPS:-6}
RECORD=""
for arg in "$@"; do
  case "$arg" in
    --record) RECORD=1 ;;
    -h|--help) sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown argument: $arg (the only flag is --record)" >&2; exit 2 ;;
  esac
done
cargo build --release -q -p tessera-launcher
SCRATCH=$(mktemp -d)
trap 'rm -rf "$SCRATCH"' EXIT

run() { # schedule virtual_stages
  local dir="$SCRATCH/$1"
  target/release/launch --config configs/tiny-cpu.yaml --fresh --threads 1 \
    --set model.layers=8 --set parallel.data=1 --set parallel.tensor=1 \
    --set parallel.pipeline="$P" --set parallel.virtual_stages="$2" --set parallel.schedule="$1" \
    --set training.micro_batch=2 --set training.global_batch=$((2 * M)) \
    --set training.steps="$STEPS" --set checkpoint.every=0 --set "checkpoint.dir=$SCRATCH/ckpt-$1" \
    --trace "$dir" >"$SCRATCH/$1.log" 2>&1 || { cat "$SCRATCH/$1.log" >&2; exit 1; }
  python3 bench/pipeline/bubble.py "$dir" "$P"
}

ONE=$(run 1f1b 1)
TWO=$(run interleaved 2)
THEORY_ONE=$(echo "($P - 1) / ($M + $P - 1)" | bc -l)
THEORY_TWO=$(echo "($P - 1) / (2 * $M + $P - 1)" | bc -l)
TABLE=$(
  printf '| stage | 1F1B idle | interleaved (v=2) idle |\n|---|---:|---:|\n'
  paste <(echo "$ONE") <(echo "$TWO") | awk '{printf "| %s | %.3f | %.3f |\n", $2, $4, $8}'
  printf '| schedule bubble | %.3f | %.3f |\n' "$THEORY_ONE" "$THEORY_TWO"
)
echo "P=$P stages, M=$M microbatches, $STEPS steps (the first not counted)"
echo "$TABLE"
if [ -n "$RECORD" ]; then
  FILE="bench/results/$(date +%F)-pipeline-bubble-p$P.md"
  {
    echo "# Pipeline bubble: measured idle fraction per stage ($(date +%F))"
    echo
    echo "Machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs). Release build."
    echo "Command: P=$P M=$M STEPS=$STEPS bench/pipeline/run.sh --record ($P stages, $M microbatches, $STEPS steps, the first not counted; one worker thread per stage)."
    echo "Idle = 1 - (forward + backward time) / (step time less the optimizer) in each rank's trace (\`launch --trace\`)."
    echo
    echo "$TABLE"
  } >"$FILE"
  echo "wrote $FILE"
fi

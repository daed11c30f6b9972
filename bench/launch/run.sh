#!/usr/bin/env bash
# Start-up time: wall time of `launch` training one step of configs/tiny-cpu.yaml with 8 local
# CPU workers (coordinator, rendezvous, 8 processes, connections, one data-parallel step, exit),
# against `torchrun --nproc-per-node 8` running trivial.py (8 torch processes that join gloo and
# do one all-reduce). Median of RUNS each; prints the ratio torchrun/launch (> 1: we start
# faster). With --record writes bench/results/<date>-launch.md.
#
#   bench/launch/run.sh [--record]
set -euo pipefail

cd -- "$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)/../.."
source bench/torch_venv.sh
RUNS=${RUNS:-5}
RECORD=""
for arg in "$@"; do
  case "$arg" in
    --record) RECORD=1 ;;
    -h|--help) sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown argument: $arg (the only flag is --record)" >&2; exit 2 ;;
  esac
done
ensure_torch
cargo build --release -q -p tessera-launcher
SCRATCH=$(mktemp -d)
trap 'rm -rf "$SCRATCH"' EXIT

seconds() { # runs "$@" quietly, prints its wall time in seconds
  local start end
  start=$(date +%s.%N)
  "$@" >"$SCRATCH/out.log" 2>&1 || { cat "$SCRATCH/out.log" >&2; exit 1; }
  end=$(date +%s.%N)
  echo "$end - $start" | bc -l
}
median() { sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

ours=(); theirs=()
for i in $(seq "$RUNS"); do
  rm -rf "$SCRATCH/ckpt"
  ours+=("$(seconds target/release/launch --config configs/tiny-cpu.yaml \
    --set parallel.data=8 --set parallel.tensor=1 --set parallel.pipeline=1 \
    --set training.steps=1 --set checkpoint.every=0 --set "checkpoint.dir=$SCRATCH/ckpt" --fresh)")
  PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  theirs+=("$(seconds "$VENV/bin/torchrun" --nproc-per-node 8 --master-addr 127.0.0.1 --master-port "$PORT" bench/launch/trivial.py)")
done
OURS=$(printf '%s\n' "${ours[@]}" | median)
THEIRS=$(printf '%s\n' "${theirs[@]}" | median)
RATIO=$(echo "$THEIRS / $OURS" | bc -l)
TABLE=$(printf '| | median of %s runs (s) | all runs (s) |\n|---|---|---|\n| launch: 8 workers, 1 training step | %.3f | %s |\n| torchrun: 8 processes, 1 all-reduce | %.3f | %s |\n\ntorchrun / launch = **%.2f** (above 1: launch reaches a trained step sooner than torchrun reaches one all-reduce)\n' \
  "$RUNS" "$OURS" "${ours[*]}" "$THEIRS" "${theirs[*]}" "$RATIO")
echo "$TABLE"
if [ -n "$RECORD" ]; then
  FILE="bench/results/$(date +%F)-launch.md"
  {
    echo "# Start-up: launch vs torchrun, 8 local CPU processes ($(date +%F))"
    echo
    echo "Machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs);"
    echo "torch $("$PY" -c 'import torch; print(torch.__version__)'). Release build. Command: bench/launch/run.sh --record"
    echo
    echo "$TABLE"
  } >"$FILE"
  echo "wrote $FILE"
fi

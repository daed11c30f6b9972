#!/usr/bin/env bash
# CPU training-step benchmark: tokens/s of tessera against PyTorch on the CPU for the same fp32
# GPT-2 or llama, batch and thread count, at each size of harness.py's SIZES, and the ratio
# ours/PyTorch (target: >= 1.0). Prints a table; with --record also writes
# bench/results/<date>-cpu-step.md. See bench/cpu_step/README.md.
#
#   bench/cpu_step/run.sh                    # from any directory; threads = nproc
#   THREADS=1 bench/cpu_step/run.sh
#   STEPS=20 WARMUP_STEPS=5 SIZES="tiny small" bench/cpu_step/run.sh --record
set -euo pipefail

cd -- "$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)/../.."
HARNESS=bench/cpu_step/harness.py
source bench/torch_venv.sh

RECORD=""
for arg in "$@"; do
  case "$arg" in
    --record) RECORD=1 ;;
    -h|--help) sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown argument: $arg (the only flag is --record)" >&2; exit 2 ;;
  esac
done

THREADS=${THREADS:-$(nproc)}
STEPS=${STEPS:-10}              # measured steps per side and size
WARMUP_STEPS=${WARMUP_STEPS:-3} # steps left out of the median
[ "$THREADS" -ge 1 ] && [ "$STEPS" -ge 3 ] && [ "$WARMUP_STEPS" -ge 1 ] || {
  echo "need THREADS >= 1, STEPS >= 3 and WARMUP_STEPS >= 1" >&2; exit 2; }
command -v python3 >/dev/null || { echo "python3 is needed for the harness" >&2; exit 1; }
SIZES_GIVEN=${SIZES:-}
SIZES=${SIZES:-$(python3 "$HARNESS" sizes | tr '\n' ' ')}

# What the sizes need: release packages to build, and transformers for the llama sizes' peer.
NEEDS=$(python3 "$HARNESS" needs $SIZES) # SIZES unquoted: a list of words
BUILD=()
for need in $NEEDS; do
  case "$need" in
    tessera-*) BUILD+=("$need") ;;
  esac
done

# The peer's torch (and transformers), in the venv the benches share.
if grep -qx transformers <<<"$NEEDS"; then ensure_transformers; else ensure_torch; fi

echo "== building the release ${BUILD[*]}"
cargo build --release "${BUILD[@]/#/--package=}"

TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
LOAD=$(cut -d' ' -f1-3 /proc/loadavg)

for size in $SIZES; do
  python3 "$HARNESS" run --size "$size" --threads "$THREADS" --steps "$STEPS" \
    --warmup-steps "$WARMUP_STEPS" --dir "$TMP" --python "$PY"
done

LOAD_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)
echo
echo "== results"
MD=()
if [ -n "$RECORD" ]; then
  DATE=$(date -u +%F)
  mkdir -p bench/results
  MD=(--md "bench/results/$DATE-cpu-step.md")
fi
CMD="bench/cpu_step/run.sh $*"
[ "$THREADS" = "$(nproc)" ] || CMD="THREADS=$THREADS $CMD"
[ "$STEPS" = 10 ] || CMD="STEPS=$STEPS $CMD"
[ "$WARMUP_STEPS" = 3 ] || CMD="WARMUP_STEPS=$WARMUP_STEPS $CMD"
[ -z "$SIZES_GIVEN" ] || CMD="SIZES=\"$SIZES_GIVEN\" $CMD"
CPU=$(lscpu 2>/dev/null | sed -n 's/^Model name: *//p' | head -n1)
[ -n "$CPU" ] || CPU=$(grep -m1 '^model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//' || true)
OS=$( (. /etc/os-release 2>/dev/null && echo "$PRETTY_NAME") || uname -s)
python3 "$HARNESS" report --dir "$TMP" "${MD[@]}" \
  --meta "date=${DATE:-}" \
  --meta "threads=$THREADS" \
  --meta "command=${CMD% }" \
  --meta "nproc=$(nproc)" \
  --meta "arch=$(uname -m)" \
  --meta "cpu=${CPU:-unknown}" \
  --meta "load=$LOAD before, $LOAD_AFTER after (1, 5, 15 min)" \
  --meta "os=$OS, kernel $(uname -r)" \
  --meta "commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD 2>/dev/null || echo ' (with uncommitted changes)')" \
  --meta "rustc=$(rustc --version 2>/dev/null || echo 'rustc ?')" \
  --meta "torch_source=$TORCH_SOURCE"

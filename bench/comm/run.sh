#!/usr/bin/env bash
# All-reduce bus bandwidth (nccl-tests' busbw) of tessera's TCP collectives against
# torch.distributed's gloo, same machine, same run, for 2, 4 and 8 processes at 1 KiB - 256 MiB.
# Each side runs ROUNDS times (default 3), alternating, and the table shows each side's median:
# this VM's timings drift by up to 30% between runs, and alternating spreads the drift over
# both sides. Prints a table with the ratio tessera/gloo (target: >= 1.0 at 1 MiB and above);
# with --record also writes bench/results/<date>-comm.md. See bench/comm/README.md.
#
#   bench/comm/run.sh [--record]
#   WORLDS="2 4" SIZES="1048576 16777216" ROUNDS=1 bench/comm/run.sh
set -euo pipefail

cd -- "$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)/../.."
source bench/torch_venv.sh
RECORD=""
for arg in "$@"; do
  case "$arg" in
    --record) RECORD=1 ;;
    -h|--help) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown argument: $arg (the only flag is --record)" >&2; exit 2 ;;
  esac
done
WORLDS=${WORLDS:-"2 4 8"}
SIZES=${SIZES:-"1024 16384 262144 1048576 4194304 16777216 67108864 268435456"}
ROUNDS=${ROUNDS:-3}

# The peer's torch (CPU build is enough for gloo), in the venv the other benches share.
ensure_torch

cargo build --release -q -p tessera-bench-comm
OUT=$(mktemp)
trap 'rm -f "$OUT"' EXIT
for world in $WORLDS; do
  for round in $(seq "$ROUNDS"); do
    echo "== $world processes, round $round of $ROUNDS" >&2
    target/release/tessera-bench-comm "$world" $SIZES >>"$OUT"
    "$PY" bench/comm/gloo.py "$world" $SIZES >>"$OUT"
  done
done

TABLE=$(python3 - "$OUT" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
runs = {}
for r in rows:
    runs.setdefault((r["impl"], r["world"], r["bytes"]), []).append(r["busbw_gbps"])
by = {k: {"busbw_gbps": statistics.median(v)} for k, v in runs.items()}
def size(b):
    return f"{b >> 20} MiB" if b >= 1 << 20 else f"{b >> 10} KiB"
print("| processes | size | tessera GB/s | gloo GB/s | tessera / gloo |")
print("|---|---|---|---|---|")
for (impl, world, b) in sorted(k for k in by if k[0] == "tessera"):
    t, g = by[("tessera", world, b)], by.get(("gloo", world, b))
    if g is None:
        continue
    print(f"| {world} | {size(b)} | {t['busbw_gbps']:.3f} | {g['busbw_gbps']:.3f} | "
          f"{t['busbw_gbps'] / g['busbw_gbps']:.2f} |")
PY
)
echo "$TABLE"
if [ -n "$RECORD" ]; then
  FILE="bench/results/$(date +%F)-comm.md"
  {
    echo "# All-reduce bus bandwidth: tessera TCP vs gloo ($(date +%F))"
    echo
    echo "Machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); processes on 127.0.0.1;"
    echo "torch $("$PY" -c 'import torch; print(torch.__version__)'). busbw = bytes / time x 2(n-1)/n (nccl-tests);"
    echo "each cell is the median of $ROUNDS alternating runs."
    echo "Command: bench/comm/run.sh --record"
    echo
    echo "$TABLE"
  } >"$FILE"
  echo "wrote $FILE"
fi

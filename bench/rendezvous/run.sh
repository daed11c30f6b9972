#!/usr/bin/env bash
# Rendezvous of a simulated cluster of RANKS (default 1024) workers: lightweight clients in one
# process register over real gRPC on 127.0.0.1 with the launcher's coordinator in another.
# Prints the time to a complete rendezvous (target: under 2 s on the 2-core CI machine) and the
# coordinator's memory; with --record also writes bench/results/<date>-rendezvous.md.
#
#   bench/rendezvous/run.sh [--record]
#   RANKS=4096 bench/rendezvous/run.sh
set -euo pipefail

cd -- "$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)/../.."
RECORD=""
for arg in "$@"; do
  case "$arg" in
    --record) RECORD=1 ;;
    -h|--help) sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown argument: $arg (the only flag is --record)" >&2; exit 2 ;;
  esac
done
RANKS=${RANKS:-1024}
ROUNDS=${ROUNDS:-5}

cargo build --release -q -p tessera-bench-rendezvous
OUT=$(mktemp)
trap 'rm -f "$OUT"' EXIT
for round in $(seq "$ROUNDS"); do
  target/release/tessera-bench-rendezvous "$RANKS" | tee -a "$OUT"
done

TABLE=$(python3 - "$OUT" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
secs = [r["rendezvous_seconds"] for r in rows]
peak = [r["coordinator_peak_mib"] for r in rows]
idle = [r["coordinator_idle_mib"] for r in rows]
print("| ranks | rendezvous s (median) | min | max | coordinator RSS before, MiB | coordinator peak RSS, MiB |")
print("|---|---|---|---|---|---|")
print(f"| {rows[0]['ranks']} | {statistics.median(secs):.3f} | {min(secs):.3f} | {max(secs):.3f} | "
      f"{statistics.median(idle):.1f} | {statistics.median(peak):.1f} |")
PY
)
echo "$TABLE"
if [ -n "$RECORD" ]; then
  FILE="bench/results/$(date +%F)-rendezvous.md"
  {
    echo "# Rendezvous of $RANKS simulated workers ($(date +%F))"
    echo
    echo "Machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)."
    echo "Each worker is a gRPC client on its own connection to 127.0.0.1, all registering at"
    echo "once from a second process; time from the first registration sent to the last"
    echo "assignment received; $ROUNDS runs. Target (issue 7): under 2 s."
    echo "Command: bench/rendezvous/run.sh --record"
    echo
    echo "$TABLE"
  } >"$FILE"
  echo "wrote $FILE"
fi

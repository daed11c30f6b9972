#!/usr/bin/env bash
# Dry-run speed benchmark: times `launch --dry-run` for GPT-3 175B on 1024 GPUs (table and JSON)
# and `launch search`, end to end as a user sees them, against the 1-second target and against a
# peer measured in the same run: DeepSpeed's ZeRO memory estimator for the same model.
# Writes bench/results/<date>-dryrun-cpu.md. See bench/dryrun/README.md.
#
#   bench/dryrun/run.sh            # from any directory
#   RUNS=50 DS_RUNS=10 bench/dryrun/run.sh
#   SKIP_DEEPSPEED=1 bench/dryrun/run.sh   # our numbers only, no venv
set -euo pipefail

cd -- "$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)/../.."
ROOT=$PWD
HARNESS="$ROOT/bench/dryrun/harness.py"
VENV="$ROOT/bench/.venv"
RUNS=${RUNS:-30}        # ours: at least 20
DS_RUNS=${DS_RUNS:-5}   # DeepSpeed: at least 5
[ "$RUNS" -ge 20 ] || { echo "RUNS must be at least 20" >&2; exit 2; }
[ "$DS_RUNS" -ge 5 ] || { echo "DS_RUNS must be at least 5" >&2; exit 2; }
CONFIG=configs/175b.yaml
B=target/release/launch   # relative: we run from the repo root

# GPT-3 175B as tessera counts it (the dry-run prints the same 174,615,846,912) and one
# transformer layer: 12 h^2 weights + 13 h biases and LayerNorm parameters, h = 12288.
TOTAL_PARAMS=174615846912
LAYER_PARAMS=$((12 * 12288 * 12288 + 13 * 12288))

command -v python3 >/dev/null || { echo "python3 is needed for the timing harness" >&2; exit 1; }

echo "== building the release launcher"
cargo build --release -p tessera-launcher

TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

echo "== timing tessera ($RUNS runs each, 1 warm-up)"
python3 "$HARNESS" time --label "tessera 175B dry-run, table" --runs "$RUNS" \
  --out "$TMP/table.json" --keep-output "$TMP/table.out" -- \
  "$B" --config "$CONFIG" --dry-run
python3 "$HARNESS" time --label "tessera 175B dry-run, JSON (1024 ranks)" --runs "$RUNS" \
  --out "$TMP/json.json" -- \
  "$B" --config "$CONFIG" --dry-run --format json
python3 "$HARNESS" time --label "tessera search, 175B on 1024 GPUs" --runs "$RUNS" \
  --out "$TMP/search.json" -- \
  "$B" search --config "$CONFIG" --gpus 1024

# ---------------------------------------------------------------------------------------------
# The peer: DeepSpeed's estimator in its own virtualenv. Every failure here is reported and
# turns the ratio into "unavailable"; it never fails the benchmark.
DS_UNAVAILABLE=""
TORCH_SOURCE="n/a"
LOG="$VENV/install.log"

have_pkgs() {
  "$VENV/bin/python" - <<'EOF' 2>/dev/null
import importlib.metadata as m
m.version("torch"); m.version("deepspeed")
EOF
}

install_peer() {
  if [ ! -x "$VENV/bin/python" ]; then
    echo "creating $VENV"
    python3 -m venv "$VENV" || return 1
  fi
  if have_pkgs; then
    echo "torch and deepspeed already in $VENV: skipping the install"
    return 0
  fi
  : >"$LOG"
  echo "installing CPU-only torch (log: $LOG)"
  if "$VENV/bin/pip" install --retries 1 --timeout 30 torch \
       --index-url https://download.pytorch.org/whl/cpu >>"$LOG" 2>&1; then
    echo "CPU wheel index" >"$VENV/torch-source"
  else
    echo "the CPU wheel index (download.pytorch.org) could not be used;" \
         "falling back to torch from PyPI (its Linux wheel is the CUDA build, ~3 GB with its" \
         "nvidia-* dependencies; it runs on CPU all the same)"
    "$VENV/bin/pip" install torch >>"$LOG" 2>&1 || return 1
    echo "PyPI, CUDA build: the CPU wheel index was unreachable" >"$VENV/torch-source"
  fi
  echo "installing deepspeed with DS_BUILD_OPS=0"
  if ! DS_BUILD_OPS=0 "$VENV/bin/pip" install deepspeed >>"$LOG" 2>&1; then
    echo "pip install deepspeed failed; retrying without build isolation (uses the venv's torch)"
    "$VENV/bin/pip" install setuptools wheel >>"$LOG" 2>&1 || return 1
    DS_BUILD_OPS=0 "$VENV/bin/pip" install --no-build-isolation deepspeed >>"$LOG" 2>&1 \
      || return 1
  fi
  have_pkgs || return 1
}

if [ -n "${SKIP_DEEPSPEED:-}" ]; then
  DS_UNAVAILABLE="skipped: SKIP_DEEPSPEED was set"
else
  echo "== setting up the peer (DeepSpeed) in $VENV"
  if ! install_peer; then
    DS_UNAVAILABLE="deepspeed could not be installed here; see bench/.venv/install.log"
    echo "DEEPSPEED UNAVAILABLE: $DS_UNAVAILABLE" >&2
    [ -f "$LOG" ] && tail -n 15 "$LOG" >&2
  fi
fi
[ -f "$VENV/torch-source" ] && TORCH_SOURCE=$(cat "$VENV/torch-source")

DS_FUNCTION=""
if [ -z "$DS_UNAVAILABLE" ]; then
  # Which estimator this deepspeed has, and its signature (the ZeRO-3 one first).
  if PROBE=$("$VENV/bin/python" - 2>"$TMP/probe.err" <<'EOF'
import importlib, inspect
for mod, fn in [("deepspeed.runtime.zero.stage3", "estimate_zero3_model_states_mem_needs_all_cold"),
                ("deepspeed.runtime.zero.stage_1_and_2", "estimate_zero2_model_states_mem_needs_all_cold")]:
    try:
        f = getattr(importlib.import_module(mod), fn)
    except (ImportError, AttributeError):
        continue
    # deepspeed logs to stdout on import: mark our lines.
    print("DSPROBE", mod, fn)
    print("DSPROBE", fn + str(inspect.signature(f)))
    break
else:
    raise SystemExit("no estimate_zero{3,2}_model_states_mem_needs_all_cold in this deepspeed")
EOF
  ) && PROBE=$(grep '^DSPROBE ' <<<"$PROBE" | cut -d' ' -f2-) && [ -n "$PROBE" ]; then
    DS_MODULE=$(sed -n 1p <<<"$PROBE" | cut -d' ' -f1)
    DS_FN=$(sed -n 1p <<<"$PROBE" | cut -d' ' -f2)
    DS_SIGNATURE=$(sed -n 2p <<<"$PROBE")
    DS_FUNCTION="$DS_MODULE.$DS_FN"
    echo "peer: $DS_MODULE.$DS_SIGNATURE"
    if [ "$DS_FN" = estimate_zero3_model_states_mem_needs_all_cold ]; then
      DS_CALL="est(total_params=$TOTAL_PARAMS, largest_layer_params=$LAYER_PARAMS, num_gpus_per_node=8, num_nodes=128)"
    else
      DS_CALL="est(total_params=$TOTAL_PARAMS, num_gpus_per_node=8, num_nodes=128)"
    fi
    DS_CODE="import deepspeed; from $DS_MODULE import $DS_FN as est; $DS_CALL"
  else
    DS_UNAVAILABLE="deepspeed is installed but importing its estimator failed: $(tail -n 1 "$TMP/probe.err")"
    echo "DEEPSPEED UNAVAILABLE: $DS_UNAVAILABLE" >&2
    tail -n 15 "$TMP/probe.err" >&2
  fi
fi

if [ -z "$DS_UNAVAILABLE" ]; then
  echo "== timing the peer ($DS_RUNS runs, 1 warm-up): a fresh python -c, import included"
  if ! python3 "$HARNESS" time --label "DeepSpeed ZeRO estimator (peer), python -c" \
         --runs "$DS_RUNS" --out "$TMP/deepspeed.json" --keep-output "$TMP/deepspeed.out" -- \
         "$VENV/bin/python" -c "$DS_CODE"; then
    DS_UNAVAILABLE="the DeepSpeed estimator process failed"
    echo "DEEPSPEED UNAVAILABLE: $DS_UNAVAILABLE" >&2
  else
    # For reading the peer's number only (not in any ratio): how much of it is importing torch.
    python3 "$HARNESS" time --label "  of which: python -c 'import torch' (info)" \
      --runs "$DS_RUNS" --out "$TMP/torch_import.json" -- \
      "$VENV/bin/python" -c "import torch" || true
  fi
fi

pyver() { "$VENV/bin/python" -c "import importlib.metadata as m; print(m.version('$1'))" 2>/dev/null || echo n/a; }
if [ -x "$VENV/bin/python" ]; then
  TORCH_V=$(pyver torch); DS_V=$(pyver deepspeed)
else
  TORCH_V=n/a; DS_V=n/a
fi

# ---------------------------------------------------------------------------------------------
DATE=$(date -u +%F)
mkdir -p bench/results
OUT="bench/results/$DATE-dryrun-cpu.md"
CPU=$(grep -m1 '^model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//' || true)
OS=$( (. /etc/os-release 2>/dev/null && echo "$PRETTY_NAME") || uname -s)
echo
echo "== results"
python3 "$HARNESS" report --dir "$TMP" --md "$OUT" \
  --meta "date=$DATE" \
  --meta "nproc=$(nproc)" \
  --meta "arch=$(uname -m)" \
  --meta "cpu=${CPU:-unknown}" \
  --meta "os=$OS, kernel $(uname -r)" \
  --meta "commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD 2>/dev/null || echo ' (with uncommitted changes)')" \
  --meta "rustc=$(rustc --version 2>/dev/null || echo 'rustc ?')" \
  --meta "python=$(python3 -c 'import platform; print(platform.python_version())')" \
  --meta "torch=$TORCH_V" \
  --meta "torch_source=$TORCH_SOURCE" \
  --meta "deepspeed=$DS_V" \
  --meta "ds_function=${DS_FUNCTION:-none}" \
  --meta "ds_unavailable=$DS_UNAVAILABLE"

#!/usr/bin/env bash
# GPU training-step benchmark, on one GPU: tokens/s, MFU and peak memory of `tessera-worker`
# (CUDA backend, one rank) against PyTorch eager and torch.compile (shared/reference/
# torch_gpt_ref.py) for GPT-2 124M B16, 350M B16 and 1.3B B8 at T=1024, each size and side a
# process of its own, in turn; the ratios ours/compile tokens/s (target >= 1.1) and ours/eager
# peak memory (target <= 0.8). Writes bench/results/<date>-gpu.md and .jsonl, and copies them
# with the raw outputs to $COPY_TO (default $OUT) when set. See bench/gpu/README.md.
#
#   bench/gpu/run.sh                        # on the GPU machine, from any directory
#   bench/gpu/run.sh --ours-only            # or --torch-only
#   SIZES="124m 350m" STEPS=10 WARMUP=3 bench/gpu/run.sh
#
# Env: SIZES (subset of: 124m 350m 1.3b), STEPS (measured steps, 20), WARMUP (steps left out,
# 3), TESSERA_WORKER (target/release/tessera-worker), TORCH_PY (/opt/torch/.venv/bin/python),
# TORCH_GPT_REF (default: shared/reference/ here, then ../shared/reference/), RUN_TIMEOUT
# (seconds per process, 300), GPU (nvidia-smi index, 0), PEAK_TFLOPS (989), CUDA_LIB_DIR,
# RESULTS (bench/results/<date>-gpu), RAW_DIR, COPY_TO.
set -euo pipefail

cd -- "$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)/../.."
export LC_NUMERIC=C PYTHONUNBUFFERED=1
REPORT=bench/gpu/report.py
ARGS="$*"

die() { # die LINE...: the lines on stderr, then exit 1
  printf 'bench/gpu/run.sh: %s\n' "$1" >&2
  shift
  [ $# -eq 0 ] || printf '  %s\n' "$@" >&2
  exit 1
}

ONLY=""
for arg in "$@"; do
  case "$arg" in
    --ours-only) [ "$ONLY" != torch ] || { echo "--ours-only and --torch-only exclude each other" >&2; exit 2; }; ONLY=ours ;;
    --torch-only) [ "$ONLY" != ours ] || { echo "--ours-only and --torch-only exclude each other" >&2; exit 2; }; ONLY=torch ;;
    -h|--help) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown argument: $arg (the flags are --ours-only and --torch-only; see --help)" >&2; exit 2 ;;
  esac
done

STEPS=${STEPS:-20}
WARMUP=${WARMUP:-3}
RUN_TIMEOUT=${RUN_TIMEOUT:-300}
GPU=${GPU:-0}
PEAK_TFLOPS=${PEAK_TFLOPS:-989}
SMI_INTERVAL_MS=${SMI_INTERVAL_MS:-100}
for v in STEPS WARMUP RUN_TIMEOUT GPU SMI_INTERVAL_MS; do
  [[ ${!v} =~ ^[0-9]+$ ]] || { echo "$v must be a whole number, got '${!v}'" >&2; exit 2; }
done
if [ "$STEPS" -lt 1 ] || [ "$RUN_TIMEOUT" -lt 10 ]; then
  echo "need STEPS >= 1 and RUN_TIMEOUT >= 10" >&2; exit 2
fi
[[ $PEAK_TFLOPS =~ ^[0-9]+(\.[0-9]+)?$ ]] || { echo "PEAK_TFLOPS must be a number, got '$PEAK_TFLOPS'" >&2; exit 2; }
TORCH_PY=${TORCH_PY:-/opt/torch/.venv/bin/python}
WORKER=${TESSERA_WORKER:-target/release/tessera-worker}

# The report needs a Python 3 (standard library only): the system's, else the torch venv's.
if command -v python3 >/dev/null 2>&1; then
  PY3=python3
elif [ -x "$TORCH_PY" ]; then
  PY3=$TORCH_PY
else
  die "no Python 3 for bench/gpu/report.py: python3 is not on PATH and $TORCH_PY does not exist." \
      "Install python3 (apt-get install python3) or set TORCH_PY to a Python 3."
fi

ALL_SIZES=$("$PY3" "$REPORT" sizes | paste -sd " " -)
SIZES_GIVEN=${SIZES:-}
SIZES=${SIZES:-$ALL_SIZES}
for size in $SIZES; do
  case " $ALL_SIZES " in
    *" $size "*) ;;
    *) echo "unknown size '$size' in SIZES; the sizes are: $ALL_SIZES" >&2; exit 2 ;;
  esac
done

# --- What the run needs, checked before anything runs -------------------------------------

command -v nvidia-smi >/dev/null 2>&1 || die "no GPU here: nvidia-smi is not on PATH." \
  "This benchmark runs on a machine with an NVIDIA GPU and its driver (the lent H100; see" \
  "bench/gpu/README.md). Without a GPU, check the report's arithmetic with:" \
  "  python3 bench/gpu/report.py --self-test"
GPU_INFO=$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader,nounits -i "$GPU" 2>&1) \
  || die "no usable GPU: \`nvidia-smi -i $GPU\` failed:" "$GPU_INFO" \
         "Check the driver (nvidia-smi alone should list the GPU) and the GPU index (GPU=, default 0)."
IFS=',' read -r DEVICE DRIVER MEM_TOTAL <<<"$GPU_INFO"
DEVICE=$(echo "$DEVICE" | xargs); DRIVER=$(echo "$DRIVER" | xargs); MEM_TOTAL=$(echo "$MEM_TOTAL" | xargs)
if [ -z "$DEVICE" ] || ! [[ $MEM_TOTAL =~ ^[0-9]+$ ]]; then
  die "nvidia-smi gave no GPU at index $GPU: '$GPU_INFO'"
fi
# Both sides and nvidia-smi must mean the same device.
export CUDA_DEVICE_ORDER=PCI_BUS_ID CUDA_VISIBLE_DEVICES=$GPU

used_mib() { nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -i "$GPU" | head -n1 | tr -d ' '; }
IDLE_MIB=$(used_mib)
BUSY=$(nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader -i "$GPU" 2>/dev/null || true)
[ -z "$BUSY" ] || echo "warning: other processes use GPU $GPU (pid, memory): $(echo "$BUSY" | tr '\n' ';')" \
  "- the memory numbers subtract the baseline before each run, but the speeds suffer" >&2

WORKER_LD=${LD_LIBRARY_PATH:-}
if [ "$ONLY" != torch ]; then
  [ -e "$WORKER" ] || die "the worker binary $WORKER is missing." \
    "Build it on the development machine:  cargo build --release -p tessera-worker" \
    "and bring target/release/tessera-worker to this checkout (the device tool: carry" \
    "target/release/tessera-worker), or set TESSERA_WORKER=/path/to/tessera-worker;" \
    "or measure PyTorch alone with --torch-only."
  [ -x "$WORKER" ] || die "the worker binary $WORKER is not executable: chmod +x $WORKER"
  WORKER_VERSION=$("$WORKER" --version 2>&1 | head -n1) || die "the worker binary $WORKER does not run here: $WORKER_VERSION" \
    "Build it for x86-64 Linux with a glibc no newer than this machine's ($(ldd --version 2>/dev/null | head -n1))."
  WORKER_SHA=$(sha256sum "$WORKER" | cut -d' ' -f1)
  # cudarc opens cuBLAS(Lt) and NVRTC by name: give the worker the CUDA toolkit's libraries.
  if [ -z "${CUDA_LIB_DIR:-}" ]; then
    for dir in /usr/local/cuda-13.0/lib64 /usr/local/cuda/lib64; do
      [ -d "$dir" ] && { CUDA_LIB_DIR=$dir; break; }
    done
  fi
  [ -z "${CUDA_LIB_DIR:-}" ] || WORKER_LD="$CUDA_LIB_DIR${WORKER_LD:+:$WORKER_LD}"
fi

REF=""
TORCH_VERSION=""
if [ "$ONLY" != ours ]; then
  [ -x "$TORCH_PY" ] || die "the PyTorch venv is missing: $TORCH_PY does not exist." \
    "The lent GPU machine has PyTorch (CUDA) in /opt/torch/.venv; elsewhere make a venv with a" \
    "CUDA build of torch and set TORCH_PY=/path/to/venv/bin/python; or measure ours alone with" \
    "--ours-only."
  TORCH_VERSION=$("$TORCH_PY" -c 'import torch
assert torch.cuda.is_available(), "torch.cuda.is_available() is False (a CPU-only torch, or no driver?)"
print(torch.__version__)' 2>&1) || die "PyTorch in $TORCH_PY cannot use the GPU:" "$(echo "$TORCH_VERSION" | tail -n1)"
  TORCH_VERSION=$(echo "$TORCH_VERSION" | tail -n1)
  # The reference script: TORCH_GPT_REF, else shared/ inside this checkout (the device tool
  # brings shared/ where the checkout has one), else the shared/ next to it.
  if [ -n "${TORCH_GPT_REF:-}" ]; then
    [ -f "$TORCH_GPT_REF" ] || die "TORCH_GPT_REF=$TORCH_GPT_REF does not exist."
    REF=$TORCH_GPT_REF
  else
    for cand in shared/reference/torch_gpt_ref.py ../shared/reference/torch_gpt_ref.py; do
      [ -f "$cand" ] && { REF=$cand; break; }
    done
    [ -n "$REF" ] || die "the PyTorch reference torch_gpt_ref.py is missing: neither" \
      "$(pwd)/shared/reference/torch_gpt_ref.py nor $(cd .. && pwd)/shared/reference/torch_gpt_ref.py exists." \
      "Bring the project's shared/ folder along (shared/reference/torch_gpt_ref.py under the" \
      "repository root), set TORCH_GPT_REF=/path/to/torch_gpt_ref.py, or run --ours-only."
  fi
fi

# --- Running ---------------------------------------------------------------------------------

DATE=$(date +%F)
RESULTS=${RESULTS:-bench/results/$DATE-gpu}
RAW=${RAW_DIR:-bench/gpu/raw/$(date +%F-%H%M%S)}
COPY_TO=${COPY_TO-${OUT:-}}
mkdir -p "$RAW" "$(dirname "$RESULTS")"

CMD="bench/gpu/run.sh${ARGS:+ $ARGS}"
[ "$STEPS" = 20 ] || CMD="STEPS=$STEPS $CMD"
[ "$WARMUP" = 3 ] || CMD="WARMUP=$WARMUP $CMD"
[ -z "$SIZES_GIVEN" ] || CMD="SIZES=\"$SIZES_GIVEN\" $CMD"
[ "$PEAK_TFLOPS" = 989 ] || CMD="PEAK_TFLOPS=$PEAK_TFLOPS $CMD"
CPU=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo 2>/dev/null | head -n1)
COMMIT=${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
[ "$COMMIT" = unknown ] || git diff --quiet HEAD 2>/dev/null || COMMIT="$COMMIT (with uncommitted changes)"
{
  echo "date=$DATE"
  echo "device=$DEVICE"
  echo "driver=$DRIVER"
  echo "memory_total_mib=$MEM_TOTAL"
  echo "idle_mib=$IDLE_MIB"
  echo "host=$(hostname 2>/dev/null || uname -n), $(nproc) cores${CPU:+ ($CPU)}"
  echo "commit=$COMMIT"
  echo "worker=$([ "$ONLY" = torch ] && echo 'not run' || echo "$WORKER")"
  echo "worker_sha256=${WORKER_SHA:-}"
  echo "worker_version=${WORKER_VERSION:-}"
  echo "torch=${TORCH_VERSION:-not run}"
  echo "torch_py=$TORCH_PY"
  echo "torch_ref=${REF:-not run}"
  echo "steps=$STEPS"
  echo "warmup=$WARMUP"
  echo "peak_tflops=$PEAK_TFLOPS"
  echo "run_timeout=$RUN_TIMEOUT"
  echo "command=$CMD"
} >"$RAW/meta.env"

SMI_PID=""
stop_sampler() {
  if [ -n "$SMI_PID" ]; then
    kill "$SMI_PID" 2>/dev/null || true
    wait "$SMI_PID" 2>/dev/null || true
    SMI_PID=""
  fi
}
trap stop_sampler EXIT
trap 'stop_sampler; exit 130' INT TERM

stamp() { # each line of stdin, prefixed with the epoch time it arrived
  local line
  while IFS= read -r line || [ -n "$line" ]; do
    printf '%s %s\n' "${EPOCHREALTIME:-$(date +%s.%N)}" "$line"
  done
}

run_one() { # run_one SIZE SIDE CMD...: one process; outputs and memory samples in $RAW/SIZE.SIDE.*
  local stem="$RAW/$1.$2" label="$1 $2" rc t0 t1
  shift 2
  printf '%q ' "$@" >"$stem.cmd"
  echo >>"$stem.cmd"
  sleep 2 # the previous process's memory goes back to the driver
  used_mib >"$stem.base"
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -i "$GPU" \
    -lms "$SMI_INTERVAL_MS" >"$stem.smi" 2>/dev/null &
  SMI_PID=$!
  t0=${EPOCHREALTIME:-$(date +%s.%N)}
  set +e
  timeout --kill-after=15 "$RUN_TIMEOUT" "$@" </dev/null 2>"$stem.err" | stamp >"$stem.out"
  rc=${PIPESTATUS[0]}
  set -e
  t1=${EPOCHREALTIME:-$(date +%s.%N)}
  stop_sampler
  echo "$rc" >"$stem.rc"
  echo "$t0 $t1" >"$stem.time"
  local took
  took=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.0f", b - a }')
  if [ "$rc" = 0 ]; then
    echo "   $label: done in ${took} s"
  elif [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    echo "   $label: TIMED OUT after $RUN_TIMEOUT s (RUN_TIMEOUT); going on"
  else
    echo "   $label: FAILED (exit $rc) in ${took} s: $(grep -v '^warning:' "$stem.err" | grep -m1 -e '^error:' -e 'Error' -e 'panicked' || tail -n1 "$stem.err"); going on"
  fi
}

echo "== $DEVICE (driver $DRIVER, $MEM_TOTAL MiB, $IDLE_MIB MiB used idle); sizes: $SIZES;" \
     "$WARMUP warm-up + $STEPS measured steps; raw outputs in $RAW"
for size in $SIZES; do
  read -r CONFIG BATCH LAYERS HIDDEN HEADS SEQ VOCAB < <("$PY3" "$REPORT" shape "$size")
  echo "== $size: batch $BATCH x $SEQ, $LAYERS layers, hidden $HIDDEN, $HEADS heads"
  if [ "$ONLY" != torch ]; then
    rm -f "$RAW/$size.ours.metrics.jsonl" # the worker appends
    run_one "$size" ours env "LD_LIBRARY_PATH=$WORKER_LD" "$WORKER" --config "$CONFIG" \
      --set parallel.data=1 --set parallel.tensor=1 --set parallel.pipeline=1 \
      --set cluster.nodes=1 --set cluster.gpus_per_node=1 \
      --set cluster.device=cuda --set cluster.backend=nccl \
      --set model.layers="$LAYERS" --set model.hidden="$HIDDEN" --set model.heads="$HEADS" \
      --set model.seq_len="$SEQ" --set model.vocab="$VOCAB" --set parallel.recompute=none \
      --set training.precision=bf16 \
      --set training.global_batch="$BATCH" --set training.micro_batch="$BATCH" \
      --set training.steps=$((WARMUP + STEPS)) --set data.kind=synthetic \
      --set checkpoint.every=0 --set checkpoint.dir="$RAW/ckpt-$size" \
      --metrics "$RAW/$size.ours.metrics.jsonl" --fresh
    rm -rf "$RAW/ckpt-$size"
  fi
  if [ "$ONLY" != ours ]; then
    for mode in eager compile; do
      name="$size-b$BATCH"
      flag=()
      if [ "$mode" = compile ]; then name="$name-compile"; flag=(--compile); fi
      run_one "$size" "$mode" "$TORCH_PY" bench/gpu/torch_one.py --ref "$REF" --name "$name" \
        --layers "$LAYERS" --hidden "$HIDDEN" --heads "$HEADS" --batch "$BATCH" --seq "$SEQ" \
        --steps "$STEPS" --warmup "$WARMUP" "${flag[@]}"
    done
  fi
done

echo
echo "== results"
set +e
"$PY3" "$REPORT" report --raw "$RAW" --md "$RESULTS.md" --jsonl "$RESULTS.jsonl"
status=$?
set -e
if [ -n "$COPY_TO" ]; then
  # Three files (the device tool brings back at most 8): the results and the raw folder packed.
  mkdir -p "$COPY_TO"
  cp -f "$RESULTS.md" "$RESULTS.jsonl" "$COPY_TO/" 2>/dev/null || true
  tar -czf "$COPY_TO/$(basename "$RESULTS")-raw.tar.gz" -C "$(dirname "$RAW")" "$(basename "$RAW")"
  echo "copied the results and the raw outputs ($(basename "$RESULTS")-raw.tar.gz) to $COPY_TO"
fi
[ "$status" = 0 ] || echo "some runs failed (see the notes above and $RAW/*.err); the table records them" >&2
exit "$status"

#!/usr/bin/env bash
# The GPU tests (worker/tests/gpu.rs, launcher/tests/gpu.rs: ignored by `cargo test` without a
# GPU) from prebuilt binaries, for a GPU machine that has no cargo.
#
#   bench/gpu/tests.sh --build   here: release binaries and test binaries into .device-bin/
#   bench/gpu/tests.sh           there (carry .device-bin): runs every GPU test, one at a time
#
# Extra arguments go to the test binaries (a test name filters, as with cargo test).
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=.device-bin

if [ "${1:-}" = --build ]; then
  shift
  cargo build --release -p tessera-worker -p tessera-launcher
  mkdir -p "$BIN"
  # Stripped: the device tool carries at most 64 MiB.
  for f in tessera-worker launch; do strip --strip-debug -o "$BIN/$f" "target/release/$f"; done
  if [ -f ../shared/reference/torch_gpt_ref.py ]; then
    cp ../shared/reference/torch_gpt_ref.py "$BIN/"   # for bench/gpu/run.sh
  fi
  for package in tessera-worker tessera-launcher; do
    exe=$(cargo test --release -p "$package" --test gpu --no-run --message-format=json 2>/dev/null |
      python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "gpu" and m.get("executable"):
        print(m["executable"])')
    strip --strip-debug -o "$BIN/${package#tessera-}-gpu-tests" "$exe"
  done
  du -sh "$BIN"
  echo "built into $BIN/: carry it (carry: [\"$BIN\"]); bench/gpu/run.sh runs from it too"
  exit 0
fi

if ! command -v nvidia-smi >/dev/null || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "error: no GPU here (nvidia-smi does not list one); these tests need one" >&2
  exit 1
fi
for f in tessera-worker launch worker-gpu-tests launcher-gpu-tests; do
  if [ ! -x "$BIN/$f" ]; then
    echo "error: $BIN/$f is missing: run bench/gpu/tests.sh --build on a machine with cargo and carry $BIN" >&2
    exit 1
  fi
done
# cuBLASLt and NVRTC of the CUDA toolkit, where the GPU machines have it.
CUDA_LIB_DIR=${CUDA_LIB_DIR:-/usr/local/cuda-13.0/lib64}
export LD_LIBRARY_PATH="$CUDA_LIB_DIR${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export TESSERA_REPO=$PWD TESSERA_WORKER=$PWD/$BIN/tessera-worker TESSERA_LAUNCH=$PWD/$BIN/launch
status=0
for tests in worker-gpu-tests launcher-gpu-tests; do
  echo "== $tests"
  "$BIN/$tests" --ignored --test-threads=1 --nocapture "$@" || status=1
done
exit $status

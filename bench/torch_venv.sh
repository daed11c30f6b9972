# Sourced by the bench scripts and worker/tests/fixtures/make_llama_reference.sh. The Python
# packages live in one venv outside the clone, shared by every bench and fixture script and kept
# across clones: $TESSERA_PY_CACHE/venv (default ~/.cache/tessera/venv).
#
#   ensure_torch         installs torch into the venv when it lacks it (the CPU wheel index
#                        first, PyPI's CUDA build as the fallback; both run on the CPU) and sets
#                        PY and TORCH_SOURCE
#   ensure_transformers  ensure_torch, then installs transformers and safetensors when missing
#
# Every install's output goes to $VENV/install.log. Run from the repository root.
TESSERA_PY_CACHE=${TESSERA_PY_CACHE:-$HOME/.cache/tessera}
VENV="$TESSERA_PY_CACHE/venv"
PY="$VENV/bin/python"

ensure_venv() {
  [ -x "$PY" ] && return 0
  mkdir -p "$TESSERA_PY_CACHE" \
    || { echo "cannot create $TESSERA_PY_CACHE (set TESSERA_PY_CACHE to a writable folder)" >&2
         exit 1; }
  python3 -m venv "$VENV" \
    || { echo "python3 -m venv $VENV failed (Debian: apt-get install python3-venv)" >&2; exit 1; }
}

ensure_torch() {
  if ! "$PY" -c 'import torch' 2>/dev/null; then
    ensure_venv
    echo "== installing torch into $VENV (log: $VENV/install.log)"
    if "$VENV/bin/pip" install --retries 1 --timeout 30 torch \
         --index-url https://download.pytorch.org/whl/cpu >>"$VENV/install.log" 2>&1; then
      echo "CPU wheel index" >"$VENV/torch-source"
    else
      echo "the CPU wheel index (download.pytorch.org) could not be used; installing torch from" \
           "PyPI (its Linux wheel is the CUDA build; it runs on the CPU all the same)"
      "$VENV/bin/pip" install torch >>"$VENV/install.log" 2>&1 \
        || { echo "pip install torch failed; see $VENV/install.log" >&2; exit 1; }
      echo "PyPI, CUDA build: the CPU wheel index was unreachable" >"$VENV/torch-source"
    fi
  fi
  TORCH_SOURCE=$(cat "$VENV/torch-source" 2>/dev/null || echo "unknown source")
}

ensure_transformers() {
  ensure_torch
  if ! "$PY" -c 'import transformers, safetensors' 2>/dev/null; then
    echo "== installing transformers and safetensors into $VENV (log: $VENV/install.log)"
    # From PyPI; torch is already there, so pip keeps it.
    "$VENV/bin/pip" install transformers safetensors >>"$VENV/install.log" 2>&1 \
      || { echo "pip install transformers safetensors failed; see $VENV/install.log" >&2; exit 1; }
  fi
}

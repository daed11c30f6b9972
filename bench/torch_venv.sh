# Sourced by the bench scripts: `ensure_torch` installs torch into bench/.venv when it lacks it
# (the CPU wheel index first, PyPI's CUDA build as the fallback; both run on the CPU) and sets
# PY and TORCH_SOURCE. Run from the repository root.
VENV=bench/.venv
PY="$VENV/bin/python"

ensure_torch() {
  if ! "$PY" -c 'import torch' 2>/dev/null; then
    echo "== installing torch into $VENV (log: $VENV/install.log)"
    [ -x "$PY" ] || python3 -m venv "$VENV"
    if "$VENV/bin/pip" install --retries 1 --timeout 30 torch \
         --index-url https://download.pytorch.org/whl/cpu >"$VENV/install.log" 2>&1; then
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

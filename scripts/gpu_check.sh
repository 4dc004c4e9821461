#!/usr/bin/env bash
# The GPU check on a machine with one GPU and its own Python stack (torch with CUDA), with or
# without a package registry: installs the kit that `python scripts/gpu_kit.py` built (gpu_kit/,
# carried beside the tree), then runs scripts/gpu_check.py (its docstring lists the steps).
#
#   bash scripts/gpu_check.sh [OUT_DIR] [--cpu]     # default OUT_DIR=gpu_check_out; about 8 minutes
#
# Writes OUT_DIR/result.json (every step's figures, or the failing step's name and error) and
# OUT_DIR/log.txt, plus OUT_DIR/logs.tar.gz (one log per command). Exit 0 only when every step passed.
# PYTHON picks the interpreter (default python3); the kit goes to GPU_KIT_SITE (default /tmp/m3c-gpu-kit).
# GPU_KIT_INSTALL=0 installs no wheels: for an interpreter that already has the project's pins (a
# machine with a registry: `make install`, then PYTHON=.venv/bin/python); gpu_kit/assets.tar.gz is
# still read (the tokenizer and the sample data).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-gpu_check_out}
shift || true
PY=${PYTHON:-python3}
SITE=${GPU_KIT_SITE:-/tmp/m3c-gpu-kit}
mkdir -p "$OUT"
if [ "${GPU_KIT_INSTALL:-1}" != 0 ]; then
  if ! ls gpu_kit/wheels/*.whl >/dev/null 2>&1; then
    echo '{"ok": false, "failed_step": "kit", "error": "gpu_kit/wheels is empty: run python scripts/gpu_kit.py here, carry gpu_kit"}' > "$OUT/result.json"
    cat "$OUT/result.json"; exit 1
  fi
  # The kit's wheels only, never an index: the lent machine reaches no registry.
  if ! "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
       gpu_kit/wheels/*.whl > "$OUT/kit-install.log" 2>&1; then
    tail -n 20 "$OUT/kit-install.log"
    echo '{"ok": false, "failed_step": "kit", "error": "pip install of gpu_kit/wheels failed: see kit-install.log"}' > "$OUT/result.json"
    exit 1
  fi
  SITE_PATH="$SITE:"
else
  SITE_PATH=""
fi
export PYTHONPATH="$SITE_PATH$PWD" PYTHONUNBUFFERED=1
"$PY" scripts/gpu_check.py --out "$OUT" "$@" 2>&1 | tee "$OUT/log.txt"
exit "${PIPESTATUS[0]}"

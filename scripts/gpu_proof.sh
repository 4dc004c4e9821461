#!/usr/bin/env bash
# The GPU check proven on this machine, on the CPU, before any GPU minute is spent: a throwaway
# Python 3.12 venv with the lent machine's own torch (2.11, from the registry: a CUDA build, ~5 GB
# in the venv), numpy, transformers, tokenizers and huggingface_hub, then the kit exactly as the
# check installs it (`pip install --no-index --no-deps --target`, on PYTHONPATH), then every step
# of the check, shortened (`gpu_check.py --cpu`). Not part of `make test`: it downloads torch.
#
#   bash scripts/gpu_proof.sh [OUT_DIR]      # default OUT_DIR=gpu_check_out/cpu-proof; ~10 min + the venv
#
# PYTHON312 names a Python 3.12 interpreter (default: python3.12 on PATH, else pyenv's 3.12);
# GPU_PROOF_VENV the venv (default /tmp/m3c-gpu-proof-venv, reused when it exists).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-gpu_check_out/cpu-proof}
VENV=${GPU_PROOF_VENV:-/tmp/m3c-gpu-proof-venv}
PY312=${PYTHON312:-$(command -v python3.12 || ls -d "$(pyenv root 2>/dev/null || echo /root/.pyenv)"/versions/3.12*/bin/python3.12 2>/dev/null | tail -n 1)}
[ -x "$PY312" ] || { echo "gpu_proof.sh: no Python 3.12 found (set PYTHON312)"; exit 1; }
# What the lent machine has (the device tool's list of its packages), by version.
MACHINE=(torch==2.11.0 numpy==2.5.2 transformers==5.17.0 tokenizers==0.23.2 huggingface_hub==1.33.0
         safetensors==0.8.0 torchmetrics==1.9.0 torchvision==0.26.0 sentencepiece protobuf pyyaml requests
         tqdm psutil packaging xxhash matplotlib)
if [ ! -f "$VENV/.machine-stack" ]; then
  rm -rf "$VENV"
  "$PY312" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q "${MACHINE[@]}"
  echo "${MACHINE[*]}" > "$VENV/.machine-stack"
fi
[ -d gpu_kit/wheels ] || python scripts/gpu_kit.py
rm -rf "$OUT"
PYTHON="$VENV/bin/python" GPU_KIT_SITE="$OUT.site" bash scripts/gpu_check.sh "$OUT" --cpu

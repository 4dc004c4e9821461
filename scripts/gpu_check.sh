#!/usr/bin/env bash
# One command for a machine with one GPU (about 5-8 minutes): the e5-small recipe (bf16 autocast,
# sdpa, gradient checkpointing, unified loss + self-distillation, G=8) with and without the gradient
# cache at two bucket lengths (`bench_memory.py --throughput`, which the test suite runs on the CPU),
# then the largest uncached and cached batch at 8192 tokens on the tiny 250k-vocabulary model.
#
#   bash scripts/gpu_check.sh [OUT_DIR]          # default OUT_DIR=gpu_check_out
#
# Needs: a CUDA GPU, this checkout's Python environment (torch >= 2.4 and transformers >= 4.40;
# newer than the pins is fine), the e5-small asset (built offline by `m3c assets` if missing; no
# network). Writes OUT_DIR/throughput.json (samples/s, TFLOP/s against the bf16 peak, peak GPU
# memory per length, cached and uncached) and OUT_DIR/largest_8192.json; prints both.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-gpu_check_out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
PY=${PYTHON:-python}

"$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "gpu_check.sh needs a CUDA GPU")'
# The e5-small recipe at two buckets of its batch table (bf16 autocast on the GPU, sdpa, gradient
# checkpointing, unified loss + self-distillation, G=8), uncached then cached: median of 5 steps.
"$PY" scripts/bench_memory.py --throughput 128:64,512:32 --models e5-small --steps 5 \
    --cache-sequences 64 --cache-tokens 32768 --out "$OUT/throughput.json"

# Largest cached batch at 8192 (tiny model over the 250k vocabulary, 1 step each, GPU memory is the
# limit; the address-space cap is lifted: CUDA reserves large virtual ranges).
"$PY" scripts/bench_memory.py --models tiny-v250k --lengths 8192 --steps 1 --time-batch 0 \
    --mem-cap-gib 100000 --max-batch 256 --cache-sequences 8 --cache-tokens 65536 \
    --out "$OUT/largest_8192.json" | tail -n 3

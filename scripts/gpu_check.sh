#!/usr/bin/env bash
# One command for a machine with one GPU (about 5-8 minutes): the e5-small recipe (bf16 autocast,
# sdpa, gradient checkpointing, unified loss + self-distillation, G=8) with and without the gradient
# cache at two bucket lengths, then the largest cached batch at 8192 tokens on the tiny 250k-vocabulary
# model (e5-small's position table stops at 512).
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

"$PY" - "$OUT/throughput.json" <<'EOF'
import json, sys, time
import torch
sys.path.insert(0, "scripts")
from bench_memory import build_composer_model, make_batch, train_steps

assert torch.cuda.is_available(), "gpu_check.sh needs a CUDA GPU"
name = torch.cuda.get_device_name()
# dense bf16 peak (TFLOP/s) of common parts; unknown parts: set BF16_PEAK_TFLOPS
import os
PEAKS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "L4": 121.0, "4090": 165.0}
peak = float(os.environ.get("BF16_PEAK_TFLOPS", next((v for k, v in PEAKS.items() if k in name), "nan")))

class Args: pass
rows = []
for length, batch in ((128, 64), (512, 32)):          # two buckets of the recipe's table, e5-small
    for cached in (False, True):
        a = Args(); a.model, a.length, a.group_size = "e5-small", length, 8
        a.cache_sequences, a.cache_tokens = 64, 32768
        torch.cuda.reset_peak_memory_stats()
        model, opt, device = build_composer_model(a, cached)
        b = make_batch(batch, 8, length, model.model.vocab_size, device)
        train_steps(model, opt, b, 2)                     # warm-up
        times = train_steps(model, opt, b, 5)
        step = sorted(times)[2]
        cfg = model.model.encoder.config
        tokens = batch * (32 + 8 * length)
        # FLOPs executed: a step is 4 forwards with checkpointing (forward, backward = 2, recompute),
        # 5 with the cache (its no-graph forward); a forward costs 2·params per token plus attention
        # 4·layers·H·L per token. ColBERT max-sim and the sparse scores are left out.
        params = sum(p.numel() for n, p in model.model.encoder.named_parameters() if "embeddings" not in n)
        attn = 4 * cfg.num_hidden_layers * cfg.hidden_size * (batch * 32 ** 2 + batch * 8 * length ** 2)
        flops = (2 * params * tokens + attn) * (5 if cached else 4)
        rows.append({"gpu": name, "length": length, "batch": batch, "cached": cached, "step_s": step,
                     "samples_per_s": batch / step, "tflops": flops / step / 1e12,
                     "tflops_vs_bf16_peak": flops / step / 1e12 / peak,
                     "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2 ** 30})
        print(json.dumps(rows[-1]), flush=True)
        del model, opt, b
        torch.cuda.empty_cache()
open(sys.argv[1], "w").write(json.dumps(rows, indent=2) + "\n")
EOF

# Largest cached batch at 8192 (tiny model over the 250k vocabulary, 1 step each, GPU memory is the
# limit; the address-space cap is lifted: CUDA reserves large virtual ranges).
"$PY" scripts/bench_memory.py --models tiny-v250k --lengths 8192 --steps 1 --time-batch 0 \
    --mem-cap-gib 100000 --max-batch 256 --cache-sequences 8 --cache-tokens 65536 \
    --out "$OUT/largest_8192.json" | tail -n 3

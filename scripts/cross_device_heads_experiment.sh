#!/usr/bin/env bash
# Issue 16's experiment on the quickstart's exact layout (yamls/quickstart-cpu.yaml, `composer -n 2`,
# 32 steps of 8 queries per rank): does gathering every head's vectors across ranks
# (loss.negatives_cross_device_heads=all) let the fresh sparse head learn as it does in one process?
# For each seed in SEEDS and each setting in HEADS (dense = the recipe, all = every head gathered) it
# trains, evaluates per query on the held-out split (`m3c eval --per-query`) and compares against the
# base model, against the seed's untrained start, and, when both exist, `all` against `dense` of the
# same seed (paired bootstrap, `m3c compare`).
# Outputs: $RUN/<heads>-s<seed>/{export,losses.jsonl}, $RUN/eval_<heads>-s<seed>.json, $RUN/compare_*.txt;
# a rerun skips what is already there. One training at a time (~13 GB for the 2 ranks).
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${RUN:-runs/cross-device-heads}
PY=${PY:-python}
M3C=("$PY" -m m3composer.cli)
COMPOSER=${COMPOSER:-composer}
SEEDS=${SEEDS:-42 43 44}
HEADS=${HEADS:-all dense}
# EXTRA: more key=value overrides for every training and start (e.g. model.sparse_init_passages=4096);
# TAG: a suffix of every output name for such a variant (e.g. -fit4096)
read -r -a EXTRA_ARGS <<< "${EXTRA:-}"
TAG=${TAG:-}
START=${START:-1}      # 0: skip the untrained-start evaluation (it does not depend on HEADS)
EVAL_ARGS=(--passage-max-len 192 --per-query)
step() { printf '\n=== [%s] %s ===\n' "$(date +%H:%M:%S)" "$*"; }
mkdir -p "$RUN"
"${M3C[@]}" assets >/dev/null
[ -d "$RUN/sample/train" ] || "${M3C[@]}" sample-data "$RUN/sample" --overwrite
[ -f "$RUN/mds/m3_index.json" ] || "${M3C[@]}" convert "$RUN/sample/train" --out "$RUN/mds" --overwrite --no-progress | tail -1
[ -f "$RUN/eval_base.json" ] || "${M3C[@]}" eval asset:e5-small "$RUN/sample/eval" "${EVAL_ARGS[@]}" \
  --output "$RUN/eval_base.json" | tail -6

for seed in $SEEDS; do
  # the untrained start of this seed (fresh heads as initialised, the sparse head's idf fit), for
  # "its start" intervals: the model build_trainer builds before step 0, saved and evaluated
  start="$RUN/start$TAG-s$seed"
  if [ "$START" = 1 ] && [ ! -f "$RUN/eval_start$TAG-s$seed.json" ]; then
    step "start of seed $seed"
    "$PY" - "$seed" "$start" "$RUN/mds" "${EXTRA_ARGS[@]}" <<'EOF'
import sys
from m3composer.config import load_config
from m3composer.train import build_trainer
seed, out, mds, *extra = sys.argv[1:]
trainer = build_trainer(load_config("yamls/quickstart-cpu.yaml", [
    f"seed={seed}", f"run_dir={out}-run", f"data.train_data={mds}", "trainer.save_folder=null",
    f"callbacks.export_dir={out}-run/export", *extra]))
trainer.state.model.model.save_pretrained(out)
trainer.close()
EOF
    "${M3C[@]}" eval "$start" "$RUN/sample/eval" "${EVAL_ARGS[@]}" --output "$RUN/eval_start$TAG-s$seed.json" | tail -6
  fi
  for heads in $HEADS; do
    name="$heads$TAG-s$seed"; out="$RUN/$name"
    if [ ! -f "$out/export/model.safetensors" ]; then
      step "train $name"
      rm -rf "$out"
      "$COMPOSER" -n 2 scripts/train.py yamls/quickstart-cpu.yaml seed="$seed" run_dir="$out" \
        loss.negatives_cross_device_heads="$heads" data.train_data="$RUN/mds" trainer.save_folder=null \
        callbacks.export_dir="$out/export" callbacks.loss_log="$out/losses.jsonl" "${EXTRA_ARGS[@]}" > "$out.log" 2>&1
    fi
    [ -f "$RUN/eval_$name.json" ] || "${M3C[@]}" eval "$out/export" "$RUN/sample/eval" "${EVAL_ARGS[@]}" \
      --output "$RUN/eval_$name.json" | tail -6
    "${M3C[@]}" compare "$RUN/eval_base.json" "$RUN/eval_$name.json" --base-head dense > "$RUN/compare_base_$name.txt"
    [ -f "$RUN/eval_start$TAG-s$seed.json" ] && "${M3C[@]}" compare "$RUN/eval_start$TAG-s$seed.json" \
      "$RUN/eval_$name.json" > "$RUN/compare_start_$name.txt"
  done
  if [ -f "$RUN/eval_all$TAG-s$seed.json" ] && [ -f "$RUN/eval_dense$TAG-s$seed.json" ]; then
    "${M3C[@]}" compare "$RUN/eval_dense$TAG-s$seed.json" "$RUN/eval_all$TAG-s$seed.json" \
      > "$RUN/compare_all_vs_dense$TAG-s$seed.txt"
  fi
done
step "nDCG@10 per head"
"$PY" - "$RUN" <<'EOF'
import json, sys
from pathlib import Path
run = Path(sys.argv[1])
for path in sorted(run.glob("eval_*.json")):
    result = json.loads(path.read_text())
    cells = [f"{head} {result[head]['ndcg@10']:.4f}" if head in result else f"{head} -"
             for head in ("dense", "sparse", "colbert", "ensemble")]
    print(f"{path.stem[5:]:>12}: " + ", ".join(cells))
EOF

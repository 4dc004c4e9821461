#!/usr/bin/env bash
# The README's main job on the embedded default: a real small model (multilingual-e5-small,
# converted offline) and real sample data, end to end: assets -> sample data -> MDS shards ->
# fine-tune on 2 CPU ranks -> evaluate base and fine-tuned on held-out data -> side by side.
# Run through `make quickstart`, which creates the environment first. Outputs: runs/quickstart/.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=runs/quickstart
# m3c eval draws its progress bars only when stderr is a terminal (silent in logs and CI)
EVAL_ARGS=(--passage-max-len 192 --per-query)
mkdir -p "$RUN"
step() { printf '\n=== [%s] %s ===\n' "$(date +%H:%M:%S)" "$*"; }
start=$(date +%s)

step "1/6 offline model assets (m3c assets)"
m3c assets

step "2/6 sample data (m3c sample-data)"
m3c sample-data "$RUN/sample" --overwrite

step "3/6 JSONL -> MDS shards (m3c convert)"
TRAIN_JSONL="$RUN/sample/train"
# MINE=1: replace the BM25 negatives by negatives mined with the base model (m3c mine, one pool per file)
if [ "${MINE:-0}" = 1 ]; then
  (cd "$RUN/sample/train" && find . -name '*.jsonl') | while read -r f; do mkdir -p "$RUN/mined/$(dirname "$f")"
    m3c mine "$RUN/sample/train/$f" "$RUN/mined/$f" --model asset:e5-small --range 10-100 --negatives 7 \
      --max-score-ratio 0.95 --exclude-positives-of-query --passage-max-len 128 --no-progress; done
  TRAIN_JSONL="$RUN/mined"
fi
m3c convert "$TRAIN_JSONL" --out "$RUN/mds" --overwrite --no-progress

step "4/6 fine-tune on 2 CPU ranks (composer -n 2 scripts/train.py yamls/quickstart-cpu.yaml)"
rm -rf "$RUN/checkpoints"
composer -n 2 scripts/train.py yamls/quickstart-cpu.yaml

step "5/6 held-out retrieval: base model (dense only: it has no trained sparse/ColBERT heads), then fine-tuned"
m3c eval asset:e5-small "$RUN/sample/eval" "${EVAL_ARGS[@]}" --output "$RUN/eval_base.json"
m3c eval "$RUN/export" "$RUN/sample/eval" "${EVAL_ARGS[@]}" --output "$RUN/eval_finetuned.json"

step "6/6 base vs fine-tuned"
python scripts/compare_eval.py "$RUN/eval_base.json" "$RUN/eval_finetuned.json" | tee "$RUN/comparison.txt"
# paired bootstrap over the queries: each fine-tuned head against the same head of the base model; the
# base has only dense, so the fresh sparse/ColBERT heads and the ensemble are listed, not compared. With
# loss.heads=[...] a subset, m3c eval skips the fresh heads the run left untrained (recipe.md §Choosing the heads)
m3c compare "$RUN/eval_base.json" "$RUN/eval_finetuned.json" | tee -a "$RUN/comparison.txt"
echo
echo "export (loads with BGEM3FlagModel and AutoModel): $RUN/export"
echo "plots: $RUN/plots/losses.png"
echo "quickstart wall time: $(( $(date +%s) - start )) s"

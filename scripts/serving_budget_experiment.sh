#!/usr/bin/env bash
# Issue 32's measured table (docs/experiments/2026-12-07-serving-budget.md): the quickstart's training
# (yamls/quickstart-cpu.yaml: 32 steps of 16 queries) with one serving choice per row, each seed, then
# per-query nDCG@10 on the held-out split and paired bootstrap intervals over queries
# (`m3c eval --per-query`, `m3c compare`). Rows (ROWS, default all of them):
#   all           the recipe: dense + sparse + ColBERT (the reference of every other row)
#   mrl           all three + Matryoshka at 96 of e5-small's 384 for dense and ColBERT (loss.matryoshka)
#   mrlw<W>       the same with weight W on the 96 size (e.g. mrlw4; the full size keeps weight 1)
#   dense         loss.heads=[dense] (self-distillation off: one head has no ensemble)
#   dense_sparse  loss.heads=[dense,sparse]
#   sparse        loss.heads=[sparse] (self-distillation off)
#   flops<λ>      all three + the FLOPS regulariser, λ for queries and passages (e.g. flops1, flops10),
#                 warm-up 16ba (SPARSE_WARMUP)
#   l1-<λ>        the same with the L1 regulariser (e.g. l1-1)
# `all` and `mrl*` are also evaluated with the vectors cut to 96 (--dims 96: plain truncation for `all`);
# THRESHOLDS (default "0.05 0.1 0.125 0.15") re-evaluates dense + sparse (eval needs dense) of `all` and every regularised row with
# that model.sparse_threshold (`m3c eval --heads dense,sparse --sparse-threshold T`): the trade-off curve.
# One process per training (NPROC=1) with the quickstart's global batch (16 queries, the 2 ranks'
# gathered negatives), activation checkpointing on (memory only); trainer.save_folder=null.
# Outputs: $RUN/<row>-s<seed>/{export,losses.jsonl,train.log}, $RUN/eval_<row>-s<seed>.json,
# $RUN/eval_<row>-s<seed>-t<T>.json, $RUN/compare_*.txt; a rerun skips what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${RUN:-runs/serving-budget}
PY=${PY:-python}
M3C=("$PY" -m m3composer.cli)
COMPOSER=${COMPOSER:-composer}
SEEDS=${SEEDS:-42 43 44}
ROWS=${ROWS:-all mrl dense dense_sparse sparse}
DIM=${DIM:-96}
SPARSE_WARMUP=${SPARSE_WARMUP:-16ba}
THRESHOLDS=${THRESHOLDS:-0.05 0.1 0.125 0.15}
EVAL_ARGS=(--passage-max-len 192 --per-query --no-progress)
step() { printf '\n=== [%s] %s ===\n' "$(date +%H:%M:%S)" "$*"; }
mkdir -p "$RUN"
"${M3C[@]}" assets >/dev/null
[ -d "$RUN/sample/train" ] || "${M3C[@]}" sample-data "$RUN/sample" --overwrite
[ -f "$RUN/mds/m3_index.json" ] || "${M3C[@]}" convert "$RUN/sample/train" --out "$RUN/mds" --overwrite --no-progress | tail -1

row_args() {  # the overrides of one row
  case "$1" in
    all) ;;
    mrl) echo "loss.matryoshka.dense_dims=[$DIM] loss.matryoshka.colbert_dims=[$DIM]" ;;
    mrlw*) w=${1#mrlw}
           echo "loss.matryoshka.dense_dims=[$DIM] loss.matryoshka.colbert_dims=[$DIM] loss.matryoshka.dense_weights=[$w] loss.matryoshka.colbert_weights=[$w]" ;;
    dense) echo "loss.heads=[dense] loss.use_self_distill=false" ;;   # one head: no ensemble to distil from
    dense_sparse) echo "loss.heads=[dense,sparse]" ;;
    sparse) echo "loss.heads=[sparse] loss.use_self_distill=false" ;;
    flops*|l1-*) reg=flops; l=${1#flops}; [[ $1 == l1-* ]] && { reg=l1; l=${1#l1-}; }
            echo "loss.sparsity.regularizer=$reg loss.sparsity.query_weight=$l loss.sparsity.passage_weight=$l loss.sparsity.warmup=$SPARSE_WARMUP" ;;
    *) echo "unknown row $1" >&2; exit 2 ;;
  esac
}

for seed in $SEEDS; do
  for row in $ROWS; do
    name="$row-s$seed"; out="$RUN/$name"
    [ -f "$RUN/eval_$name.json" ] && continue
    read -r -a extra <<< "$(row_args "$row")"
    step "$name: train ${extra[*]:-}"
    rm -rf "$out"; mkdir -p "$out"
    # a shared machine: start only with room for the run (MIN_FREE_GB of available memory)
    while [ "$(free -g | awk '/^Mem/{print $7}')" -lt "${MIN_FREE_GB:-7}" ]; do sleep 15; done
    started=$(date +%s)
    "$COMPOSER" -n 1 scripts/train.py yamls/quickstart-cpu.yaml \
      run_name="budget-$name" seed="$seed" data.default_batch_size=16 model.gradient_checkpointing=true \
      trainer.save_folder=null run_dir="$out" data.train_data="$RUN/mds" callbacks.export_dir="$out/export" \
      callbacks.loss_log="$out/losses.jsonl" "${extra[@]}" > "$out/train.log" 2>&1
    echo "trained in $(( $(date +%s) - started )) s"
    dims=(); case "$row" in all|mrl*) dims=(--dims "$DIM") ;; esac
    step "$name: held-out eval"
    "${M3C[@]}" eval "$out/export" "$RUN/sample/eval" "${EVAL_ARGS[@]}" "${dims[@]}" \
      --output "$RUN/eval_$name.json" | tail -12
  done
  for row in $ROWS; do
    case "$row" in all|flops*|l1-*) ;; *) continue ;; esac
    for t in $THRESHOLDS; do
      f="$RUN/eval_$row-s$seed-t$t.json"
      [ -f "$f" ] || [ ! -d "$RUN/$row-s$seed/export" ] && continue
      step "$row-s$seed: sparse head at threshold $t"
      "${M3C[@]}" eval "$RUN/$row-s$seed/export" "$RUN/sample/eval" "${EVAL_ARGS[@]}" --heads dense,sparse \
        --sparse-threshold "$t" --dims none --output "$f" | tail -2
    done
  done
done

step "paired bootstrap over queries (nDCG@10)"
cmp() {  # cmp NAME BASE OTHER [m3c compare options]
  local name=$1 base=$2 other=$3; shift 3
  [ -f "$base" ] && [ -f "$other" ] || return 0
  "${M3C[@]}" compare "$base" "$other" --output "$RUN/compare_$name.json" "$@" > "$RUN/compare_$name.txt"
  echo "--- $name"; cat "$RUN/compare_$name.txt"
}
for seed in $SEEDS; do
  for row in $ROWS; do
    [ "$row" = all ] && continue
    cmp "all_$row-s$seed" "$RUN/eval_all-s$seed.json" "$RUN/eval_$row-s$seed.json"
  done
  for t in $THRESHOLDS; do
    for row in $ROWS; do
      case "$row" in all|flops*|l1-*) cmp "all_${row}_t$t-s$seed" "$RUN/eval_all-s$seed.json" "$RUN/eval_$row-s$seed-t$t.json" ;; esac
    done
  done
done

#!/usr/bin/env bash
# Issue 17's quality table: the quickstart's training (yamls/quickstart-cpu.yaml: 32 steps of 16
# queries, same seed per row) on four versions of the same pairs, then per-query nDCG@10 on the
# held-out split with paired bootstrap intervals over queries (`m3c eval --per-query`, `m3c compare`):
#   a) negatives removed (rows borrow other rows' positives: the behaviour without hard negatives)
#   b) negatives mined by `m3c mine` with the base model (dense, ranks 2-100 of the file's positives, no
#      score filter: with e5-small's narrow cosine range, --max-score-ratio 0.95 left 397 of 751 rows of
#      stdlib_docstrings_len-0-500 without any candidate; BENCHMARKS.md §Mining)
#   c) (b) plus one NegativeRefresh (callbacks.negative_refresh, same range) with the model after 16 steps
#   d) the sample data's own BM25 negatives (the quickstart)
# Every row trains 2 epochs of 16 steps (trainer.train_subset_num_batches=16), so that (c)'s refresh
# falls in the middle of the same 32 steps; each epoch draws its own plan.
# SEEDS="42 43" (default) trains every row once per seed. Needs `m3c sample-data` output in
# $RUN/sample (this script makes it). One training job at a time; NPROC=1 (the default, ~6 GB) trains
# one process with the global batch of the quickstart's 2 ranks (16 queries), NPROC=2 the quickstart's
# exact layout; activation checkpointing on (memory only: the same losses and gradients; one process
# of 16 queries peaks at ~8 GB without it). Outputs: $RUN/<row>-s<seed>/export, $RUN/eval_<row>-s<seed>.json, $RUN/compare_*.txt;
# a rerun skips what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${RUN:-runs/negatives}
PY=${PY:-python}
M3C=("$PY" -m m3composer.cli)
COMPOSER=${COMPOSER:-composer}
NPROC=${NPROC:-1}
SEEDS=${SEEDS:-42 43}
ROWS=${ROWS:-a b c d}
# EXTRA: more key=value overrides for every training (e.g. model.sparse_init_passages=1024, the
# default when the README's table was first run)
read -r -a EXTRA_ARGS <<< "${EXTRA:-}"
EVAL_ARGS=(--passage-max-len 192 --per-query)
step() { printf '\n=== [%s] %s ===\n' "$(date +%H:%M:%S)" "$*"; }
mkdir -p "$RUN"
[ -d "$RUN/sample/train" ] || "${M3C[@]}" sample-data "$RUN/sample" --overwrite

step "a) strip negatives"
(cd "$RUN/sample/train" && find . -name '*.jsonl') | while read -r f; do
  [ -s "$RUN/data-a/$f" ] && continue
  mkdir -p "$RUN/data-a/$(dirname "$f")"
  "$PY" -c 'import json,sys
for line in open(sys.argv[1]):
    row = json.loads(line); [row.pop(k, None) for k in ("neg", "pos_scores", "neg_scores")]; print(json.dumps(row, ensure_ascii=False))' \
    "$RUN/sample/train/$f" > "$RUN/data-a/$f"
done

step "b) mine negatives with the base model (one pool per file)"
(cd "$RUN/data-a" && find . -name '*.jsonl') | while read -r f; do
  [ -s "$RUN/data-b/$f" ] && continue        # already mined (a rerun)
  mkdir -p "$RUN/data-b/$(dirname "$f")"
  "${M3C[@]}" mine "$RUN/data-a/$f" "$RUN/data-b/$f" --model asset:e5-small --head dense --range 2-100 \
    --negatives 7 --exclude-positives-of-query --passage-max-len 128 --no-progress
done

for data in a b d; do
  src="$RUN/data-$data"; [ "$data" = d ] && src="$RUN/sample/train"
  [ -f "$RUN/mds-$data/m3_index.json" ] && continue
  step "convert $data"
  "${M3C[@]}" convert "$src" --out "$RUN/mds-$data" --overwrite --no-progress | tail -1
done

[ -f "$RUN/eval_base.json" ] || "${M3C[@]}" eval asset:e5-small "$RUN/sample/eval" "${EVAL_ARGS[@]}" \
  --output "$RUN/eval_base.json" | tail -6

for seed in $SEEDS; do
  for row in $ROWS; do
    name="$row-s$seed"; out="$RUN/$name"
    [ -f "$RUN/eval_$name.json" ] && continue
    data="$row"; extra=()
    if [ "$row" = c ]; then
      data=b; extra=(callbacks.negative_refresh.range=2-100)
    fi
    step "$name: train"
    rm -rf "$out"; mkdir -p "$out"
    # a shared machine: start only with room for the run (MIN_FREE_GB of available memory)
    while [ "$(free -g | awk '/^Mem/{print $7}')" -lt "${MIN_FREE_GB:-7}" ]; do sleep 15; done
    OMP_NUM_THREADS=$(( 2 / NPROC )) "$COMPOSER" -n "$NPROC" scripts/train.py yamls/quickstart-cpu.yaml \
      run_name="neg-$name" seed="$seed" data.default_batch_size=$(( 16 / NPROC )) model.gradient_checkpointing=true \
      trainer.max_duration=2ep trainer.train_subset_num_batches=16 trainer.save_folder=null \
      run_dir="$out" data.train_data="$RUN/mds-$data" callbacks.export_dir="$out/export" \
      callbacks.loss_log="$out/losses.jsonl" "${extra[@]}" "${EXTRA_ARGS[@]}" > "$out/train.log" 2>&1
    grep -h "negative refresh\|NegativeRefresh" "$out/train.log" | tail -2 || true
    step "$name: held-out eval"
    "${M3C[@]}" eval "$out/export" "$RUN/sample/eval" "${EVAL_ARGS[@]}" --output "$RUN/eval_$name.json" | tail -6
  done
done

step "paired bootstrap over queries (nDCG@10)"
for seed in $SEEDS; do
  for pair in "a b" "a c" "b c" "a d" "d b"; do
    set -- $pair
    [ -f "$RUN/eval_$1-s$seed.json" ] && [ -f "$RUN/eval_$2-s$seed.json" ] || continue
    "${M3C[@]}" compare "$RUN/eval_$1-s$seed.json" "$RUN/eval_$2-s$seed.json" --output "$RUN/compare_$1_$2-s$seed.json" \
      > "$RUN/compare_$1_$2-s$seed.txt"
    echo "--- seed $seed: $1 -> $2"; cat "$RUN/compare_$1_$2-s$seed.txt"
  done
done

#!/usr/bin/env bash
# Issue 17's quality table: the quickstart's training (yamls/quickstart-cpu.yaml, same steps and seed)
# on three versions of the same pairs, then per-query nDCG@10 on the held-out split with paired
# bootstrap intervals over queries (`m3c eval --per-query`, `m3c compare`):
#   a) negatives removed (rows borrow other rows' positives: the behaviour without hard negatives)
#   b) negatives mined by `m3c mine` with the base model (dense, ranks 2-100 of the file's positives, no
#      score filter: with e5-small's narrow cosine range, --max-score-ratio 0.95 left 397 of 751 rows of
#      stdlib_docstrings_len-0-500 without any candidate; BENCHMARKS.md §Mining)
#   d) the sample data's own BM25 negatives (the quickstart)
# Needs `m3c sample-data` output in $RUN/sample (run scripts/quickstart.sh's first steps, or this
# script makes it). One training job at a time; NPROC=1 (the default, ~6 GB) trains one process with
# the global batch of the quickstart's 2 ranks (16 queries), NPROC=2 the quickstart's exact layout;
# activation checkpointing on (memory only: the same losses and gradients).
# Outputs: $RUN/{a,b,d}/export, $RUN/eval_{a,b,d}.json and $RUN/compare_*.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${RUN:-runs/negatives}
PY=${PY:-python}
M3C=("$PY" -m m3composer.cli)
COMPOSER=${COMPOSER:-composer}
NPROC=${NPROC:-1}
step() { printf '\n=== [%s] %s ===\n' "$(date +%H:%M:%S)" "$*"; }
mkdir -p "$RUN"
[ -d "$RUN/sample/train" ] || "${M3C[@]}" sample-data "$RUN/sample" --overwrite

step "a) strip negatives"
mkdir -p "$RUN/data-a"
(cd "$RUN/sample/train" && find . -name '*.jsonl') | while read -r f; do
  mkdir -p "$RUN/data-a/$(dirname "$f")"
  "$PY" -c 'import json,sys
for line in open(sys.argv[1]):
    row = json.loads(line); [row.pop(k, None) for k in ("neg", "pos_scores", "neg_scores")]; print(json.dumps(row, ensure_ascii=False))' \
    "$RUN/sample/train/$f" > "$RUN/data-a/$f"
done

step "b) mine negatives with the base model (one pool per file)"
mkdir -p "$RUN/data-b"
(cd "$RUN/data-a" && find . -name '*.jsonl') | while read -r f; do
  [ -s "$RUN/data-b/$f" ] && continue        # already mined (a rerun)
  mkdir -p "$RUN/data-b/$(dirname "$f")"
  "${M3C[@]}" mine "$RUN/data-a/$f" "$RUN/data-b/$f" --model asset:e5-small --head dense --range 2-100 \
    --negatives 7 --exclude-positives-of-query --passage-max-len 128 --no-progress
done

for c in a b d; do
  data="$RUN/data-$c"; [ "$c" = d ] && data="$RUN/sample/train"
  step "$c) convert + train"
  mkdir -p "$RUN/$c"
  "${M3C[@]}" convert "$data" --out "$RUN/$c/mds" --overwrite --no-progress | tail -1
  rm -rf "$RUN/$c/checkpoints"
  # a shared machine: start only with room for the run (MIN_FREE_GB of available memory)
  while [ "$(free -g | awk '/^Mem/{print $7}')" -lt "${MIN_FREE_GB:-9}" ]; do sleep 15; done
  OMP_NUM_THREADS=$(( 2 / NPROC )) "$COMPOSER" -n "$NPROC" scripts/train.py yamls/quickstart-cpu.yaml run_name="neg-$c" \
    data.default_batch_size=$(( 16 / NPROC )) model.gradient_checkpointing=true \
    run_dir="$RUN/$c" data.train_data="$RUN/$c/mds" trainer.save_folder="$RUN/$c/checkpoints" \
    callbacks.export_dir="$RUN/$c/export" > "$RUN/$c/train.log" 2>&1
  tail -2 "$RUN/$c/train.log"
done

step "held-out nDCG@10 per query, paired bootstrap"
for c in a b d; do
  "${M3C[@]}" eval "$RUN/$c/export" "$RUN/sample/eval" --passage-max-len 192 --per-query \
    --output "$RUN/eval_$c.json" | tail -6
done
for pair in "a b" "a d" "d b"; do
  set -- $pair
  "${M3C[@]}" compare "$RUN/eval_$1.json" "$RUN/eval_$2.json" | tee "$RUN/compare_$1_$2.txt"
done

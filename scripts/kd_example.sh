#!/usr/bin/env bash
# The knowledge-distillation recipe end to end, after `make quickstart` (its export is the teacher):
# teacher scores (m3c score-teacher) -> MDS (m3c convert) -> train with m3_kd_loss (yamls/kd-cpu.yaml)
# -> held-out evaluation. Outputs: runs/kd/.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -d .venv ] && PATH="$PWD/.venv/bin:$PATH"
TEACHER=${TEACHER:-runs/quickstart/export}
SRC=runs/quickstart/sample/train/stdlib_docstrings/stdlib_docstrings_len-0-500.jsonl
RUN=runs/kd
[ -d "$TEACHER" ] && [ -f "$SRC" ] || { echo "run 'make quickstart' first (needs $TEACHER and $SRC)" >&2; exit 2; }
mkdir -p "$RUN/scored/stdlib_docstrings"

echo "=== teacher scores from $TEACHER (dense, scaled by 1/tau = 50) ==="
m3c score-teacher "$SRC" "$RUN/scored/stdlib_docstrings/stdlib_docstrings_len-0-500.jsonl" \
    --model "$TEACHER" --score dense --scale 50 --passage-max-len 128 --no-progress
echo "=== convert ==="
m3c convert "$RUN/scored" --out "$RUN/mds" --overwrite --no-progress
echo "=== train the base model on the teacher's scores (m3_kd_loss), 2 ranks ==="
rm -rf "$RUN/checkpoints"
composer -n 2 scripts/train.py yamls/kd-cpu.yaml
echo "=== held-out evaluation of the student ==="
m3c eval "$RUN/export" runs/quickstart/sample/eval --passage-max-len 256 --output "$RUN/eval.json"

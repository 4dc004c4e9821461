#!/usr/bin/env bash
# The README's main job on the embedded default: a real small model (multilingual-e5-small,
# converted offline) and real sample data, end to end. Run through `make quickstart`, which
# creates the environment first. Every step prints its own progress; outputs go to runs/quickstart.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=runs/quickstart
mkdir -p "$RUN"
step() { printf '\n=== [%s] %s ===\n' "$(date +%H:%M:%S)" "$*"; }

step "1/3 offline model assets (m3c assets)"
m3c assets

step "2/3 sample data (m3c sample-data)"
m3c sample-data "$RUN/sample" --overwrite

step "3/3 JSONL -> MDS shards (m3c convert)"
m3c convert "$RUN/sample/train" --out "$RUN/mds" --overwrite

step "done"
echo "outputs in $RUN"

#!/usr/bin/env python
"""Parallel conversion benchmark: `convert(workers=N)` rows/s for each N, on the same input.

    python scripts/bench_convert.py --data SAMPLE/train [--copies 4] [--workers 1,2] [--repeats 3]
                                    [--tokenizer MODEL_DIR]

`--copies K` converts K copies of the input files (separate files, so no extra deduplication).
Each round converts the input once per worker count (interleaved, so load drift on a shared box
hits all alike); the table gives the best and median of `--repeats` rounds. The first parallel
run of the process also starts the fork server, which imports Streaming/torch and transformers
once; that start-up is reported on its own row and not in the rounds. Every parallel output is
checked against the one-worker output's m3_index.json (rows, ids' files, token statistics per
stream), so a speed-up never hides a difference; tests/data/test_convert_parallel.py checks the rows. Prints a Markdown table (for BENCHMARKS.md) and the raw numbers as JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def copy_inputs(data: Path, copies: int, dest: Path) -> Path:
    files = sorted(p for p in data.rglob("*") if p.is_file() and p.name.endswith((".jsonl", ".jsonl.gz")))
    for k in range(copies):
        for f in files:
            target = dest / f"copy{k}" / f.relative_to(data)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, target)
    return dest


def main(argv: list[str] | None = None) -> None:
    from m3composer.data.convert import convert, load_tokenizer
    from m3composer.data.index import read_index

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, type=Path)
    parser.add_argument("--copies", type=int, default=4)
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tokenizer", default=None, help="model folder (default: the e5-small asset)")
    args = parser.parse_args(argv)
    if args.tokenizer is None:
        from m3composer.assets.build import ensure_assets
        from m3composer.assets.paths import E5_SMALL

        args.tokenizer = str(ensure_assets()[E5_SMALL])
    counts = [int(w) for w in args.workers.split(",")]

    scratch = Path(tempfile.mkdtemp(prefix="m3c-bench-convert-"))
    try:
        inputs = copy_inputs(args.data, args.copies, scratch / "in")
        in_bytes = sum(p.stat().st_size for p in inputs.rglob("*") if p.is_file())
        tok = load_tokenizer(args.tokenizer)   # loaded once, like bench_data.py; workers load their own

        def run(n: int, tag: str):
            out = scratch / f"out-{tag}-{n}"
            start = time.perf_counter()
            summary = convert(inputs, out, tok if n == 1 else args.tokenizer, workers=n, overwrite=True,
                              progress=False)
            return time.perf_counter() - start, summary, out

        startup = {}
        if any(n > 1 for n in counts):
            seconds, _, _ = run(max(counts), "warmup")   # starts the fork server
            startup = {"workers": max(counts), "seconds": seconds}
        times = {n: [] for n in counts}
        summaries = {}
        reference = None
        for _ in range(args.repeats):
            for n in counts:
                seconds, summary, out = run(n, "round")
                times[n].append(seconds)
                summaries[n] = summary
                if n == counts[0]:
                    reference = read_index(out)
                elif reference is not None:
                    assert read_index(out) == reference, f"workers={n} differs from workers={counts[0]}"
        rows = summaries[counts[0]].rows_kept
        result = {
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_avg": os.getloadavg()},
            "input": {"rows": rows, "bytes": in_bytes, "files": summaries[counts[0]].files, "copies": args.copies},
            "fork_server_start_run": startup,
            "runs": {n: {"best_s": min(t), "median_s": statistics.median(t), "rows_per_s": rows / min(t),
                         "rows_per_s_median": rows / statistics.median(t),
                         "partitions": summaries[n].partitions} for n, t in times.items()},
        }
        base = result["runs"][counts[0]]["best_s"]
        print("| workers | best s | median s | rows/s (best) | rows/s (median) | speed-up | pieces |")
        print("|---:|---:|---:|---:|---:|---:|---:|")
        for n, r in result["runs"].items():
            print(f"| {n} | {r['best_s']:.2f} | {r['median_s']:.2f} | {r['rows_per_s']:,.0f} | "
                  f"{r['rows_per_s_median']:,.0f} | {base / r['best_s']:.2f}× | {r['partitions'] or '-'} |")
        if startup:
            print(f"\nfirst parallel run of the process (fork server start included): {startup['seconds']:.2f} s")
        print(json.dumps(result, indent=2, default=str))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()

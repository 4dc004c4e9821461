#!/usr/bin/env python
"""Data-pipeline benchmark: `m3c convert` throughput against the tokenizer's own, and dataloader time.

    python scripts/bench_data.py --data SAMPLE/train [--tokenizer MODEL_DIR] [--batch-rows 1024]
                                 [--repeats 3] [--dataloader-steps 40]

Figures (best of `--repeats`, wall clock, this process only):
* raw tokenizer: the fast tokenizer on exactly the texts of the rows (query, every positive,
  every negative of every row), in the batches conversion uses (each file cut into runs of
  `--batch-rows` rows), with the same call (`add_special_tokens=True, truncation=False`);
  once with every text, once with each batch's identical texts tokenised once, as convert does;
* conversion: `convert()` end to end (discover, read, validate, tokenise, write zstd MDS, index),
  tokenizer already loaded; tokens/s counts every row's tokens, duplicates included, like the raw
  run, so the ratio compares the same work;
* parse only: reading + validating the lines (no tokenizer), to show where the rest goes;
* dataloader: `M3TrainDataset` batches (G=8, FlagEmbedding's batch tables, recipe max lengths
  512/8192) through a `DataLoader(batch_size=None, num_workers=0)` from an empty shard cache
  (shards are decompressed into it when a row first needs them: that cost is in the first
  batches of each stream, hence median and max).
Prints a Markdown table (for BENCHMARKS.md) and the raw numbers as JSON.
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


def best_of(repeats: int, fn):
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), statistics.median(times), result


def interleaved(repeats: int, fns: dict):
    """Run each fn once per round, `repeats` rounds, so load drift on a shared box hits all alike."""
    times = {name: [] for name in fns}
    results = {}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            results[name] = fn()
            times[name].append(time.perf_counter() - start)
    return {name: (min(t), statistics.median(t), results[name]) for name, t in times.items()}


def load_rows(data: list[str], max_line_bytes: int):
    from m3composer.data.convert import discover_inputs
    from m3composer.data.rows import Row, iter_lines, parse_line

    per_file, lines = [], 0
    for inp in discover_inputs(data):
        per_file.append([])
        for line_no, raw, _ in iter_lines(inp.path, max_line_bytes):
            lines += 1
            result = parse_line(raw, path=inp.source_name, line_no=line_no, max_line_bytes=max_line_bytes)
            if isinstance(result, Row):
                per_file[-1].append(result)
    return per_file, lines


def batches(per_file, batch_rows: int):
    """The batches convert() tokenises: each file cut into runs of `batch_rows` rows."""
    for rows in per_file:
        for start in range(0, len(rows), batch_rows):
            yield rows[start:start + batch_rows]


def raw_tokenizer_run(tok, per_file, batch_rows: int, dedup: bool = False) -> int:
    tokens = 0
    for batch in batches(per_file, batch_rows):
        texts = [t for row in batch for t in (row.query, *row.pos, *row.neg)]
        if dedup:
            texts = list(dict.fromkeys(texts))
        ids = tok(texts, add_special_tokens=True, truncation=False, return_attention_mask=False,
                  return_token_type_ids=False)["input_ids"]
        tokens += sum(len(x) for x in ids)
    return tokens


def dataloader_run(out_dir: str, tokenizer_dir: str, steps: int, cache: str | None):
    from torch.utils.data import DataLoader

    from m3composer.data.dataset import M3TrainDataset

    ds = M3TrainDataset(out_dir, local_cache=cache, tokenizer=tokenizer_dir, train_group_size=8, default_batch_size=8,
                        query_max_len=512, passage_max_len=8192, world_size=1, rank=0)
    loader = DataLoader(ds, batch_size=None, num_workers=0)
    n = min(steps, len(ds))
    per_batch, queries = [], 0
    it = iter(loader)
    for _ in range(n):
        start = time.perf_counter()
        batch = next(it)
        per_batch.append(time.perf_counter() - start)
        queries += int(batch["query_input_ids"].shape[0])
    return per_batch, queries


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", nargs="+", required=True, help="JSONL file(s) or directories (e.g. SAMPLE/train)")
    ap.add_argument("--tokenizer", default=None, help="local model folder (default: the e5-small asset)")
    ap.add_argument("--batch-rows", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dataloader-steps", type=int, default=40)
    ap.add_argument("--max-line-bytes", type=int, default=1 << 20)
    ap.add_argument("--copies", type=int, default=1,
                    help="convert K copies of the input (separate files, so no extra dedup) to amortise "
                         "the per-run fixed costs (tokenizer facts, writers, index)")
    args = ap.parse_args(argv)

    from transformers import AutoTokenizer

    from m3composer.data.convert import convert

    tokenizer_dir = args.tokenizer
    if tokenizer_dir is None:
        from m3composer.assets.build import ensure_assets

        tokenizer_dir = str(ensure_assets(log=lambda *a: None)["e5-small"])
    tok = AutoTokenizer.from_pretrained(tokenizer_dir, use_fast=True, local_files_only=True)
    tok.model_max_length = sys.maxsize

    copies_dir = None
    if args.copies > 1:
        copies_dir = Path(tempfile.mkdtemp(prefix="m3c-bench-input-"))
        for k in range(args.copies):
            for i, given in enumerate(map(Path, args.data)):
                target = copies_dir / f"copy{k}" / f"{i}_{given.name}"
                if given.is_dir():
                    shutil.copytree(given, target)
                else:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy(given, target)
        args.data = [str(copies_dir)]

    parse_best, parse_med, (per_file, lines) = best_of(args.repeats,
                                                       lambda: load_rows(args.data, args.max_line_bytes))
    rows = [row for file_rows in per_file for row in file_rows]
    n_texts = sum(1 + len(r.pos) + len(r.neg) for r in rows)
    n_unique = sum(len(set(t for r in batch for t in (r.query, *r.pos, *r.neg)))
                   for batch in batches(per_file, args.batch_rows))

    work = Path(tempfile.mkdtemp(prefix="m3c-bench-"))
    try:
        counter = iter(range(10**6))

        def one_conversion():
            return convert(args.data, work / f"out{next(counter)}", tok, batch_rows=args.batch_rows,
                           max_line_bytes=args.max_line_bytes, progress=False)

        runs = interleaved(args.repeats, {
            "raw": lambda: raw_tokenizer_run(tok, per_file, args.batch_rows),
            "dedup": lambda: raw_tokenizer_run(tok, per_file, args.batch_rows, dedup=True),
            "convert": one_conversion})
        raw_best, raw_med, raw_tokens = runs["raw"]
        uniq_best, uniq_med, uniq_tokens = runs["dedup"]
        conv_best, conv_med, summary = runs["convert"]
        assert summary.tokens == raw_tokens, (summary.tokens, raw_tokens)
        out_dir = str(work / "out0")
        mds_bytes = sum(p.stat().st_size for p in Path(out_dir).rglob("*") if p.is_file())
        in_bytes = sum(p.stat().st_size for d in args.data for p in ([Path(d)] if Path(d).is_file()
                                                                    else Path(d).rglob("*.jsonl*")))

        loader = {}
        try:
            times, queries = dataloader_run(out_dir, tokenizer_dir, args.dataloader_steps, str(work / "cache"))
            loader = {"steps": len(times), "queries": queries, "ms_first": 1000 * times[0],
                      "ms_median": 1000 * statistics.median(times), "ms_mean": 1000 * statistics.mean(times),
                      "ms_max": 1000 * max(times), "queries_per_s": queries / sum(times)}
        except ImportError as exc:
            loader = {"skipped": f"m3composer.data.dataset not importable: {exc}"}
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if copies_dir is not None:
            shutil.rmtree(copies_dir, ignore_errors=True)

    result = {
        "machine": f"{os.cpu_count()} CPU cores, {platform.processor() or platform.machine()}, Python "
                   f"{platform.python_version()}, no GPU",
        "tokenizer": Path(tokenizer_dir).name, "files": summary.files, "rows": len(rows), "lines": lines,
        "input_bytes": in_bytes, "mds_bytes": mds_bytes, "streams": len(summary.streams), "tokens": raw_tokens,
        "batch_rows": args.batch_rows, "repeats": args.repeats, "copies": args.copies,
        "parse_s": parse_best,
        "raw_s": raw_best, "raw_s_median": raw_med,
        "raw_rows_per_s": len(rows) / raw_best, "raw_tokens_per_s": raw_tokens / raw_best,
        "convert_s": conv_best, "convert_s_median": conv_med,
        "convert_rows_per_s": len(rows) / conv_best, "convert_tokens_per_s": raw_tokens / conv_best,
        "ratio": raw_best / conv_best, "ratio_median": raw_med / conv_med,
        "texts": n_texts, "unique_texts_per_batch_sum": n_unique, "unique_tokens": uniq_tokens,
        "raw_dedup_s": uniq_best, "raw_dedup_s_median": uniq_med,
        # conversion against the tokenizer doing only the tokenising conversion does (overhead figure)
        "ratio_vs_dedup": uniq_best / conv_best, "ratio_vs_dedup_median": uniq_med / conv_med,
        "dataloader": loader,
    }
    r = result
    print(f"| run | seconds (best of {r['repeats']}) | rows/s | tokens/s |")
    print("|---|---:|---:|---:|")
    print(f"| raw tokenizer, same texts, {r['batch_rows']} rows/call | {r['raw_s']:.2f} | "
          f"{r['raw_rows_per_s']:,.0f} | {r['raw_tokens_per_s']:,.0f} |")
    print(f"| `convert()` end to end | {r['convert_s']:.2f} | {r['convert_rows_per_s']:,.0f} | "
          f"{r['convert_tokens_per_s']:,.0f} |")
    print(f"| raw tokenizer, the same batches deduplicated ({n_unique:,} of {n_texts:,} texts) | {uniq_best:.2f} | "
          f"{len(rows) / uniq_best:,.0f} | {raw_tokens / uniq_best:,.0f} |")
    print(f"| read + validate only | {r['parse_s']:.2f} | {len(rows) / r['parse_s']:,.0f} | |")
    print(f"\nconversion / raw tokenizer throughput: {r['ratio']:.2f}x (medians: {r['ratio_median']:.2f}x); "
          f"against the deduplicated tokenizer run: {r['ratio_vs_dedup']:.2f}x (medians {r['ratio_vs_dedup_median']:.2f}x)")
    if "ms_median" in loader:
        print(f"dataloader: {loader['steps']} batches, {loader['queries']} queries: {loader['ms_median']:.1f} ms median "
              f"per batch ({loader['ms_mean']:.1f} mean, {loader['ms_max']:.1f} max, first {loader['ms_first']:.1f}); "
              f"{loader['queries_per_s']:,.0f} queries/s")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

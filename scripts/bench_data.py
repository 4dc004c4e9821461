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

from m3composer.testing.disk import bytes_under


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
    from m3composer.testing.settings import dataset_settings

    ds = M3TrainDataset(out_dir, local_cache=cache, tokenizer=tokenizer_dir, world_size=1, rank=0,
                        **dataset_settings(train_group_size=8, default_batch_size=8, query_max_len=512,
                                           passage_max_len=8192))
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


# ---- prefetch and the bounded cache (issue 19) --------------------------------------------------
def synthetic_jsonl(out: Path, rows: int, seed: int = 0) -> Path:
    """`rows` FlagEmbedding rows of short random sentences (from the words of Python's docs topics)."""
    import random

    rng = random.Random(seed)
    words = [w for w in Path(os.__file__).read_text().split() if w.isalpha()][:3000]

    def text(n):
        return " ".join(rng.choice(words) for _ in range(n))

    out.mkdir(parents=True, exist_ok=True)
    path = out / "synthetic_len-0-500.jsonl"
    with open(path, "w") as f:
        for _ in range(rows):
            f.write(json.dumps({"query": text(8), "pos": [text(24)], "neg": [text(24) for _ in range(3)]}) + "\n")
    return out


def cache_watcher(cache: Path, stop, peak: list):
    """Sample the bytes on disk under `cache` every 20 ms; peak[0] keeps the largest."""
    while not stop.is_set():
        peak[0] = max(peak[0], bytes_under(cache))
        stop.wait(0.02)


def train_steps(ds, model_dir: str, steps: int, num_workers: int = 0):
    """Train the tiny model on the dataset's batches: (seconds waiting for each batch, seconds of each step).
    With `num_workers` > 0 the batches come through the DataLoader train.py builds (`data.num_workers`)."""
    import torch
    from torch.utils.data import DataLoader

    from m3composer.config import LossConfig
    from m3composer.model.composer_model import ComposerM3
    from m3composer.model.m3 import M3Model
    from m3composer.train import loss_settings

    torch.manual_seed(0)
    model = ComposerM3(M3Model.from_pretrained(model_dir), **loss_settings(LossConfig()), gradient_checkpointing=False,
                       gradient_cache=None)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)     # as train.build_optimizer
    waits, computes = [], []
    source = DataLoader(ds, batch_size=None, num_workers=num_workers, persistent_workers=False) if num_workers else ds
    it = iter(source)
    for _ in range(min(steps, len(ds))):
        start = time.perf_counter()
        batch = next(it)
        got = time.perf_counter()
        loss = model.loss(model(batch), batch)["total"]
        loss.backward()
        opt.step()
        opt.zero_grad()
        computes.append(time.perf_counter() - got)
        waits.append(got - start)
    if hasattr(it, "close"):
        it.close()
    else:
        del it                              # the DataLoader's iterator shuts its workers down
    return waits, computes


def prefetch_bench(args) -> dict:
    """Data-loader wait with and without prefetch, and peak cache with cache_limit = a tenth of the
    data, on a synthetic dataset of >= 1,000 shards in moto behind a proxy adding `--latency-ms`."""
    import threading

    from transformers import AutoTokenizer

    from m3composer.assets.build import ensure_assets
    from m3composer.data.convert import convert
    from m3composer.data.dataset import M3TrainDataset
    from m3composer.testing.s3 import FaultProxy, MotoS3
    from m3composer.testing.settings import dataset_settings

    model_dir = str(ensure_assets(log=lambda *a: None)["tiny-xlmr"])
    tok = AutoTokenizer.from_pretrained(model_dir, use_fast=True, local_files_only=True)
    work = Path(tempfile.mkdtemp(prefix="m3c-bench-prefetch-"))
    result = {}
    try:
        out = work / "mds"
        convert([str(synthetic_jsonl(work / "jsonl", args.rows))], out, tok, shard_size_limit=args.shard_bytes,
                progress=False)
        shard_files = [p for p in out.rglob("shard.*") if not p.name.endswith(".mds")]
        data_bytes = sum(p.stat().st_size for p in shard_files)
        with MotoS3() as s3:
            for p in out.rglob("*"):
                if p.is_file() and not p.name.endswith(".mds"):
                    s3.client.upload_file(str(p), s3.bucket, f"bench/{p.relative_to(out)}")
            with FaultProxy(s3.url, delay_s=args.latency_ms / 1000, max_in_flight=64) as proxy:
                os.environ.update(s3.env(proxy.url))
                remote = f"s3://{s3.bucket}/bench"
                common = dict(train_group_size=4, default_batch_size=args.batch, query_max_len=32,
                              passage_max_len=64, world_size=1, rank=0)
                probe = M3TrainDataset(remote, local_cache=str(work / "probe"),
                                       **dataset_settings(**common, prefetch_steps=0))
                result.update(shards=probe._sd.num_shards, rows=args.rows, shard_zip_bytes=data_bytes,
                              shard_bytes_zip_plus_raw=int(probe._shard_bytes.sum()), steps_per_epoch=len(probe),
                              latency_ms=args.latency_ms, batch=args.batch)
                runs = {}
                variants = [("no prefetch", dict(prefetch_steps=0), 0)]
                for pw in args.prefetch_workers:
                    for nw in args.loader_workers:
                        variants.append((f"prefetch {args.prefetch_steps} steps x {pw} threads, "
                                         f"num_workers {nw}",
                                         dict(prefetch_steps=args.prefetch_steps, prefetch_workers=pw), nw))
                for name, kw, nw in variants:
                    ds = M3TrainDataset(remote, local_cache=str(work / f"cache-{len(runs)}"),
                                        **dataset_settings(**common, **kw))
                    requests = proxy.requests
                    waits, computes = train_steps(ds, model_dir, args.train_steps, num_workers=nw)
                    wait, compute = sum(waits[2:]), sum(computes[2:])       # first two: model warm-up
                    runs[name] = {"steps": len(waits) - 2, "wait_ms_mean": 1000 * wait / (len(waits) - 2),
                                  "step_ms_mean": 1000 * compute / (len(waits) - 2),
                                  "wait_share": wait / (wait + compute), "requests": proxy.requests - requests,
                                  "wait_ms_median": 1000 * statistics.median(waits[2:]),
                                  "wait_ms_max": 1000 * max(waits[2:])}
                result["dataloader_wait"] = runs

                if args.skip_cache:
                    return result
                # a tenth of the shards (zip + raw, Streaming's measure), plus the stream indexes it always keeps
                limit = int(probe._shard_bytes.sum()) // 10 + sum(s.get_index_size() for s in probe._sd.streams)
                caches = {}
                for plan in ("rows", "shard_blocks"):
                    cache = work / f"bounded-{plan}"
                    ds = M3TrainDataset(remote, local_cache=str(cache), **dataset_settings(
                        cache_limit=limit, plan=plan, plan_block_shards=args.block_shards,
                        prefetch_steps=args.prefetch_steps, prefetch_workers=args.prefetch_workers[0], **common))
                    stop, peak = threading.Event(), [0]
                    watcher = threading.Thread(target=cache_watcher, args=(cache, stop, peak), daemon=True)
                    requests, start = proxy.requests, time.perf_counter()
                    watcher.start()
                    steps = 0
                    for _ in ds:
                        steps += 1
                    seconds = time.perf_counter() - start
                    stop.set()
                    watcher.join()
                    caches[plan] = {"cache_limit": limit, "peak_disk_bytes": peak[0], "under_limit": peak[0] <= limit,
                                    "steps": steps, "shard_requests": proxy.requests - requests,
                                    "loader_only_s": seconds}
                result["bounded_cache"] = caches
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return result


def print_prefetch(r: dict) -> None:
    print(f"{r['shards']} shards, {r['rows']} rows, {r['shard_zip_bytes']:,} bytes of zstd shards, "
          f"{r['latency_ms']} ms added per request, batch {r['batch']}")
    print("| run | steps | loader wait ms / step | train step ms | wait share | store requests |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, x in r["dataloader_wait"].items():
        print(f"| {name} | {x['steps']} | {x['wait_ms_mean']:.1f} | {x['step_ms_mean']:.1f} | "
              f"{100 * x['wait_share']:.2f} % | {x['requests']} |")
    if "bounded_cache" not in r:
        return
    print("| plan | cache_limit bytes | peak on disk | under the limit | steps | store requests | loader-only s |")
    print("|---|---:|---:|---|---:|---:|---:|")
    for plan, x in r["bounded_cache"].items():
        print(f"| {plan} | {x['cache_limit']:,} | {x['peak_disk_bytes']:,} | {x['under_limit']} | {x['steps']} | "
              f"{x['shard_requests']} | {x['loader_only_s']:.1f} |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", nargs="+", help="JSONL file(s) or directories (e.g. SAMPLE/train)")
    ap.add_argument("--prefetch", action="store_true",
                    help="run only the prefetch / bounded-cache benchmark (synthetic data on moto behind a proxy)")
    ap.add_argument("--rows", type=int, default=8000, help="--prefetch: synthetic rows")
    ap.add_argument("--shard-bytes", type=int, default=1 << 12, help="--prefetch: MDS shard size limit")
    ap.add_argument("--latency-ms", type=float, default=50.0, help="--prefetch: latency added to every request")
    ap.add_argument("--batch", type=int, default=8, help="--prefetch: per-device batch")
    ap.add_argument("--train-steps", type=int, default=60, help="--prefetch: tiny-model steps per run")
    ap.add_argument("--prefetch-steps", type=int, default=4)
    ap.add_argument("--prefetch-workers", type=int, nargs="+", default=[8],
                    help="--prefetch: prefetch thread counts to compare (the bounded-cache runs use the first)")
    ap.add_argument("--loader-workers", type=int, nargs="+", default=[0],
                    help="--prefetch: DataLoader num_workers to compare (train.py's data.num_workers)")
    ap.add_argument("--skip-cache", action="store_true", help="--prefetch: only the loader-wait runs")
    ap.add_argument("--block-shards", type=int, default=16)
    ap.add_argument("--tokenizer", default=None, help="local model folder (default: the e5-small asset)")
    ap.add_argument("--batch-rows", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dataloader-steps", type=int, default=40)
    ap.add_argument("--max-line-bytes", type=int, default=1 << 20)
    ap.add_argument("--copies", type=int, default=1,
                    help="convert K copies of the input (separate files, so no extra dedup) to amortise "
                         "the per-run fixed costs (tokenizer facts, writers, index)")
    args = ap.parse_args(argv)
    if args.prefetch:
        result = prefetch_bench(args)
        print_prefetch(result)
        print(json.dumps(result, indent=2))
        return 0
    if not args.data:
        ap.error("--data is required (or --prefetch)")

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

#!/usr/bin/env python
"""What the shard hash (`data.index.SHARD_HASH`, xxh64) costs: writing, and the first read.

    python scripts/bench_shard_hash.py [--rows 20000] [--passage-tokens 120] [--repeats 3]

Rows have `m3c convert`'s columns: a 20-token query and 8 passages (1 positive, 7 negatives) of
`--passage-tokens` token ids each, drawn from the 250,002-id vocabulary (random ids compress
worse than text; the shards are zstd as convert writes them, 64 MB size limit).
Figures, best of `--repeats` interleaved rounds, wall clock:
* write: MDSWriter over the same rows without hashes and with `hashes=[SHARD_HASH]`;
* first read: every row by index from a StreamingDataset whose local cache starts empty (each
  shard copied from the written folder, decompressed), with `validate_hash` off and on;
* the hashing itself: xxh64 over the shard bytes, timed alone (steadier than the difference of
  two noisy end-to-end times): writing hashes the raw and the zstd shard; a first read hashes the
  zstd one (Streaming's `validate_hash`) and the decompressed one (`shard_checks.verify_shard`, once
  per shard and process).
Prints a Markdown table for BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from m3composer.data.convert import COLUMNS  # noqa: E402
from m3composer.data.index import SHARD_HASH  # noqa: E402


def rows(n: int, passage_tokens: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        passages = rng.integers(3, 250_002, size=8 * passage_tokens, dtype=np.int32)
        out.append({"query": rng.integers(3, 250_002, size=20, dtype=np.int32), "passages": passages,
                    "passage_offsets": np.arange(0, 9 * passage_tokens, passage_tokens, dtype=np.int32),
                    "num_pos": 1, "scores": np.full(8, np.nan, dtype=np.float32), "row_id": i,
                    "source": f"bench.jsonl:{i + 1}"})
    return out


def write(folder: Path, data: list[dict], hashes: list[str]) -> float:
    from streaming import MDSWriter

    shutil.rmtree(folder, ignore_errors=True)
    start = time.perf_counter()
    with MDSWriter(out=str(folder), columns=COLUMNS, compression="zstd", size_limit=1 << 26, hashes=hashes,
                   max_workers=1) as writer:
        for row in data:
            writer.write(row)
    return time.perf_counter() - start


def first_read(folder: Path, cache: Path, validate: bool) -> float:
    import gc

    from streaming import Stream, StreamingDataset

    from m3composer.data.streaming_internals import open_releasing_shared_memory

    shutil.rmtree(cache, ignore_errors=True)
    start = time.perf_counter()
    sd = open_releasing_shared_memory(lambda: StreamingDataset(
        streams=[Stream(remote=str(folder), local=str(cache))], batch_size=1, shuffle=False,
        validate_hash=SHARD_HASH if validate else None))
    for i in range(len(sd)):
        sd[i]
    elapsed = time.perf_counter() - start
    del sd
    gc.collect()        # its shared memory is given back, so the next read can use the same cache folder
    return elapsed


def hash_pass(files: list[Path]) -> float:
    """Seconds of xxh64 over the files' bytes (read first: the writer and reader hold them in memory)."""
    from streaming.base.hashing import get_hash

    blobs = [f.read_bytes() for f in files]
    start = time.perf_counter()
    for blob in blobs:
        get_hash(SHARD_HASH, blob)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--passage-tokens", type=int, default=120)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    data = rows(args.rows, args.passage_tokens)
    times: dict[str, list[float]] = {k: [] for k in ("write", "write_hashed", "read", "read_hashed", "raw", "zip")}
    with tempfile.TemporaryDirectory(prefix="bench-hash-") as tmp:
        tmp = Path(tmp)
        for _ in range(args.repeats):
            times["write"].append(write(tmp / "plain", data, []))
            times["write_hashed"].append(write(tmp / "hashed", data, [SHARD_HASH]))
            times["read"].append(first_read(tmp / "plain", tmp / "cache-plain", validate=False))
            times["read_hashed"].append(first_read(tmp / "hashed", tmp / "cache-hashed", validate=True))
            times["raw"].append(hash_pass(sorted((tmp / "cache-hashed").glob("shard.*.mds"))))
            times["zip"].append(hash_pass(sorted((tmp / "hashed").glob("shard.*.zstd"))))
        raw_mb = sum(p.stat().st_size for p in (tmp / "cache-hashed").glob("shard.*.mds")) / 1e6
        zip_mb = sum(p.stat().st_size for p in (tmp / "hashed").glob("shard.*.zstd")) / 1e6
    best = {k: min(v) for k, v in times.items()}
    print(f"{args.rows:,} rows, {raw_mb:.1f} MB raw MDS, {zip_mb:.1f} MB zstd, best of {args.repeats}, "
          f"{os.cpu_count()} CPUs\n")
    print("| step | no hash (s) | xxh64 (s) | the hashing itself (s) | its share |")
    print("|---|---:|---:|---:|---:|")
    write_hash = best["raw"] + best["zip"]          # the writer hashes the raw and the zstd shard
    read_hash = best["zip"] + best["raw"]           # Streaming checks the zstd, the dataset the raw
    for name, plain, hashed, work in (("write (MDSWriter, zstd)", "write", "write_hashed", write_hash),
                                      ("first read (copy + decompress + every row)", "read", "read_hashed",
                                       read_hash)):
        print(f"| {name} | {best[plain]:.2f} | {best[hashed]:.2f} | {work:.3f} | "
              f"{100 * work / best[plain]:.1f} % |")
    print(f"\nxxh64: {(raw_mb + zip_mb) / (best['raw'] + best['zip']):.0f} MB/s")


if __name__ == "__main__":
    main()

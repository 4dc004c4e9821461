"""Throughput of `m3c mine` (dense, faiss) with e5-small on this machine.

usage: python scripts/bench_mine.py SAMPLE_TRAIN_DIR [--pool 2000] [--queries 500] [--faiss-pool 100000]
                                    [--faiss-queries 2000] [--model asset:e5-small]

1. Real texts: a pool of the first `--pool` distinct passages of the sample data's training files
   (positives and negatives, all tasks) and the first `--queries` queries; `mine()` end to end,
   reporting queries/s and pool passages/s of the encoder (passages cut at 128 tokens, as the
   quickstart trains) and the faiss search time.
2. The index alone: faiss IndexFlatIP and IndexHNSWFlat over `--faiss-pool` random 384-d unit
   vectors, searched by `--faiss-queries` (2,000) queries for k = 100 (the search cost at a pool
   size the encoder would take hours to fill here).
"""
import argparse
import json
import time
from pathlib import Path

import numpy as np

from m3composer.assets.build import resolve_model_dir
from m3composer.model.inference import load_model_for_inference
from m3composer.retrieval.mine import faiss_top_k, mine


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("train_dir")
    parser.add_argument("--pool", type=int, default=2000)
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--faiss-pool", type=int, default=100_000)
    parser.add_argument("--faiss-queries", type=int, default=2000)
    parser.add_argument("--model", default="asset:e5-small", help="the encoder (the test suite runs asset:tiny-xlmr)")
    parser.add_argument("--out", default="runs/bench_mine")
    args = parser.parse_args(argv)
    rows, texts = [], {}
    for path in sorted(Path(args.train_dir).rglob("*.jsonl")):
        for line in path.open():
            row = json.loads(line)
            rows.append(row)
            for t in row["pos"] + row.get("neg", []):
                texts.setdefault(t, None)
    pool = list(texts)[:args.pool]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "corpus.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in pool))
    (out / "in.jsonl").write_text("".join(json.dumps({"query": r["query"], "pos": r["pos"]}) + "\n"
                                          for r in rows[:args.queries]))
    model = load_model_for_inference(resolve_model_dir(args.model))
    s = mine(out / "in.jsonl", out / "out.jsonl", model, corpus=out / "corpus.jsonl", rank_range=(10, 100),
             negatives=7, passage_max_len=128, progress=False)["seconds"]
    print(f"real texts: {args.queries} queries in {s['encode_queries']:.1f} s "
          f"({args.queries / s['encode_queries']:.1f} queries/s), pool of {len(pool)} passages in "
          f"{s['encode_pool']:.1f} s ({len(pool) / s['encode_pool']:.1f} passages/s), faiss flat search "
          f"{s['search_only']:.3f} s, total {s['total']:.1f} s")
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((args.faiss_pool, 384)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    queries = vectors[rng.choice(args.faiss_pool, args.faiss_queries, replace=False)] + 0.01
    for index in ("flat", "hnsw"):
        started = time.perf_counter()
        faiss_top_k(queries, vectors, 100, index)
        print(f"faiss {index}: {args.faiss_pool:,} vectors, {args.faiss_queries:,} queries, k=100: "
              f"{time.perf_counter() - started:.1f} s (build + search)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Per-query nDCG@10 of several models on one eval set, and paired bootstrap intervals between them.

usage: python scripts/paired_bootstrap.py EVAL_PATH OUT.json LABEL=MODEL_DIR [LABEL=MODEL_DIR ...]
       [--passage-max-len 192] [--resamples 10000] [--seed 0]

Every model is searched with every head it has (search.rank_corpus, the engine of `m3c eval`) and
each query's nDCG@10 is kept. For each pair of labels (A, B) and each head both have, it prints
mean(B) − mean(A) with a 95 % interval from resampling the queries with replacement (the same
resampled queries for both models: a paired bootstrap).
"""
import argparse
import itertools
import json

import numpy as np

from m3composer.model.inference import heads_in_folder, load_model_for_inference
from m3composer.retrieval.beir import load_eval_set
from m3composer.retrieval.metrics import ndcg_at_k
from m3composer.retrieval.search import rank_corpus


def per_query_ndcg(model_dir: str, eval_set, passage_max_len: int) -> dict[str, list[float]]:
    model = load_model_for_inference(model_dir)
    rankings = rank_corpus(model, eval_set, query_instruction=model.query_instruction or "",
                           passage_instruction=model.passage_instruction or "", passage_max_len=passage_max_len,
                           heads=heads_in_folder(model_dir), top_k=10, progress=False)
    return {head: [ndcg_at_k(ranked[q], eval_set.qrels[q], 10) for q in eval_set.query_ids]
            for head, ranked in rankings.items()}


def paired_bootstrap(a: np.ndarray, b: np.ndarray, resamples: int, seed: int) -> tuple[float, float, float]:
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(a), size=(resamples, len(a)))
    diffs = (b[idx] - a[idx]).mean(axis=1)
    low, high = np.percentile(diffs, [2.5, 97.5])
    return float(b.mean() - a.mean()), float(low), float(high)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("eval_path")
    parser.add_argument("output")
    parser.add_argument("models", nargs="+", help="LABEL=MODEL_DIR")
    parser.add_argument("--passage-max-len", type=int, default=192)
    parser.add_argument("--resamples", type=int, default=10000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    eval_set = load_eval_set(args.eval_path)
    scores = {}
    for item in args.models:
        label, folder = item.split("=", 1)
        scores[label] = per_query_ndcg(folder, eval_set, args.passage_max_len)
        print(label, {h: round(float(np.mean(v)), 4) for h, v in scores[label].items()}, flush=True)
    pairs = {}
    for (la, sa), (lb, sb) in itertools.combinations(scores.items(), 2):
        for head in (h for h in sa if h in sb):
            delta, low, high = paired_bootstrap(np.array(sa[head]), np.array(sb[head]), args.resamples, args.seed)
            pairs[f"{lb} - {la} / {head}"] = {"delta": delta, "ci95": [low, high]}
            print(f"{lb} - {la}  {head:<9} {delta:+.4f}  [{low:+.4f}, {high:+.4f}]")
    with open(args.output, "w") as f:
        json.dump({"num_queries": eval_set.num_queries, "per_query_ndcg@10": scores,
                   "mean": {l: {h: float(np.mean(v)) for h, v in s.items()} for l, s in scores.items()},
                   "paired_bootstrap": pairs}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

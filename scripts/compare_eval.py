"""Print two `m3c eval --output` JSON files side by side: base model vs fine-tuned model.

usage: python scripts/compare_eval.py BASE.json FINETUNED.json

Rows are the heads present in either file (a base encoder without trained heads has only dense);
the verdict line compares like with like: the fine-tuned dense head against the base dense head.
Exit status 0 either way: this reports, it does not judge the run.
"""
import json
import sys

METRICS = ("recall@1", "recall@10", "mrr@10", "ndcg@10")
HEADS = ("dense", "sparse", "colbert", "ensemble")


def cell(results: dict, head: str, metric: str) -> str:
    value = results.get(head, {}).get(metric) if isinstance(results.get(head), dict) else None
    return "   -  " if value is None else f"{value:.4f}"


def main(base_path: str, tuned_path: str) -> int:
    base, tuned = (json.load(open(p)) for p in (base_path, tuned_path))
    print(f"held-out retrieval: {tuned['num_queries']} queries, {tuned['num_docs']} documents")
    header = "head       " + "  ".join(f"{m:>17}" for m in METRICS)
    print(header + "\n" + " " * 11 + "  ".join(f"{'base':>8} {'tuned':>8}" for _ in METRICS))
    for head in HEADS:
        if head not in base and head not in tuned:
            continue
        print(f"{head:<11}" + "  ".join(f"{cell(base, head, m):>8} {cell(tuned, head, m):>8}" for m in METRICS))
    d_base, d_tuned = base["dense"], tuned["dense"]
    better = all(d_tuned[m] > d_base[m] for m in ("recall@10", "ndcg@10"))
    print(f"\nfine-tuned dense vs base dense: recall@10 {d_base['recall@10']:.4f} -> {d_tuned['recall@10']:.4f}, "
          f"nDCG@10 {d_base['ndcg@10']:.4f} -> {d_tuned['ndcg@10']:.4f}: "
          + ("the fine-tuned model is better" if better else "NOT better on both"))
    singles = {h: tuned[h]["ndcg@10"] for h in ("dense", "sparse", "colbert") if h in tuned}
    if "ensemble" in tuned and singles:
        best = max(singles, key=singles.get)
        verdict = "beats" if tuned["ensemble"]["ndcg@10"] > singles[best] else "does not beat"
        print(f"fine-tuned ensemble nDCG@10 {tuned['ensemble']['ndcg@10']:.4f} {verdict} the best single head "
              f"({best} {singles[best]:.4f})")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    sys.exit(main(sys.argv[1], sys.argv[2]))

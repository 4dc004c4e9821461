"""Print two `m3c eval --per-query --output` JSON files side by side (base model vs fine-tuned model)
and say whether fine-tuning helped, from paired bootstrap intervals over the queries.

usage: python scripts/compare_eval.py BASE.json FINETUNED.json

Rows are the heads present in either file (a base encoder without trained heads has only dense; a
fine-tuned folder's fresh heads that its run did not train are not evaluated, and a head evaluated
but not in the run's `loss.heads` is marked "not trained"). The verdict compares like with like:
the fine-tuned dense head against the base dense head (or, when the run did not train dense, its
first trained head that the base has too; none: no verdict) on recall@10 and nDCG@10, each as the mean difference with its paired 95 % interval
(`m3composer.retrieval.compare`). "better" only when both intervals lie above 0, "worse" when one
lies below 0 and none above, otherwise "no clear difference": a difference of means that the query
sample does not support is not a gain. The fine-tuned ensemble is compared with its best single
head the same way. Exit status 0 whatever the verdict (this reports, it does not judge the run);
2 when a file cannot be read or has no per-query metrics.
"""
import json
import sys

from m3composer.retrieval.compare import combined_verdict, paired_bootstrap, per_query

METRICS = ("recall@1", "recall@10", "mrr@10", "ndcg@10")
HEADS = ("dense", "sparse", "colbert", "ensemble")
VERDICT_METRICS = ("recall@10", "ndcg@10")
HEADLINE = {"better": "the fine-tuned model is better", "worse": "the fine-tuned model is worse",
            "no clear difference": "no clear difference between the two models"}
ENSEMBLE = {"better": "beats", "worse": "is below", "no clear difference": "is not clearly above"}


def cell(results: dict, head: str, metric: str) -> str:
    value = results.get(head, {}).get(metric) if isinstance(results.get(head), dict) else None
    return "   -  " if value is None else f"{value:.4f}"


def interval(d) -> str:
    return f"{d.base:.4f} -> {d.other:.4f}, {d.difference:+.4f} [{d.low:+.4f}, {d.high:+.4f}]"


def verdict_head(base: dict, trained: list) -> str | None:
    """The head the verdict compares: the first trained head the base was evaluated with."""
    return next((h for h in trained if h in base.get("per_query", {})), None)


def main(base_path: str, tuned_path: str) -> int:
    try:
        base, tuned = (json.load(open(p, encoding="utf-8")) for p in (base_path, tuned_path))
        # `trained_heads`: the run's loss.heads, recorded in the export (absent: not a training export)
        for results, path in ((base, base_path), (tuned, tuned_path)):
            per_query(results, "dense", VERDICT_METRICS[0], path)     # no per-query metrics: the one-line error
        trained = tuned.get("trained_heads") or list(HEADS[:3])
        head = verdict_head(base, trained)
        like = {m: paired_bootstrap(per_query(base, head, m, base_path), per_query(tuned, head, m, tuned_path))
                for m in VERDICT_METRICS} if head else {}
    except (OSError, ValueError, TypeError) as err:
        print(f"compare_eval.py: error: {err}", file=sys.stderr)
        return 2
    print(f"held-out retrieval: {tuned['num_queries']} queries, {tuned['num_docs']} documents")
    if tuned.get("trained_heads"):
        print(f"heads trained (loss.heads): {', '.join(tuned['trained_heads'])}")
    header = "head       " + "  ".join(f"{m:>17}" for m in METRICS)
    print(header + "\n" + " " * 11 + "  ".join(f"{'base':>8} {'tuned':>8}" for _ in METRICS))
    for row in HEADS:
        if row not in base and row not in tuned:
            continue
        note = "   (not trained)" if row in HEADS[:3] and row not in trained and row in tuned else ""
        print(f"{row:<11}" + "  ".join(f"{cell(base, row, m):>8} {cell(tuned, row, m):>8}" for m in METRICS) + note)

    if head is None:
        print(f"\nno trained head ({', '.join(trained)}) was evaluated on the base model: no like-for-like verdict")
    else:
        queries = next(iter(like.values())).queries
        print(f"\nfine-tuned {head} vs base {head}, difference with its paired bootstrap 95 % interval over "
              f"{queries} queries:")
        for metric, d in like.items():
            print(f"  {metric:<10} {interval(d)}: {d.verdict}")
        print(f"verdict: {HEADLINE[combined_verdict(list(like.values()))]}")

    singles = {h: tuned[h]["ndcg@10"] for h in HEADS[:3] if h in tuned}
    if "ensemble" in tuned and singles:
        best = max(singles, key=singles.get)
        d = paired_bootstrap(per_query(tuned, best, "ndcg@10", tuned_path),
                             per_query(tuned, "ensemble", "ndcg@10", tuned_path))
        print(f"fine-tuned ensemble nDCG@10 {ENSEMBLE[d.verdict]} the best single head ({best}): {interval(d)}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    sys.exit(main(sys.argv[1], sys.argv[2]))

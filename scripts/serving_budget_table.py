"""The Markdown tables of scripts/serving_budget_experiment.sh's results (docs/experiments/2026-12-07-serving-budget.md).

    python scripts/serving_budget_table.py [RUN]      (default runs/serving-budget)

Reads RUN/eval_<row>-s<seed>[-t<T>].json (`m3c eval --per-query`) and RUN/compare_*.json (`m3c compare`);
prints the heads, Matryoshka and sparsity tables for whatever rows and seeds are there.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

HEADS = ("dense", "sparse", "colbert", "ensemble")


def load(path: Path):
    return json.loads(path.read_text()) if path.exists() else None


def ndcg(result: dict, head: str, dim: str | None = None):
    at = result.get("dims", {}).get(dim, {}) if dim else result
    return at.get(head, {}).get("ndcg@10")


def diff(cmp: dict | None, head: str) -> str:
    d = (cmp or {}).get(head)
    if not d:
        return "–"
    mark = "**" if d["excludes_zero"] else ""
    return f"{mark}{d['difference']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]{mark}"


def fmt(x) -> str:
    return "–" if x is None else f"{x:.3f}"


def main(run: Path) -> None:
    evals = {}
    for path in run.glob("eval_*-s*.json"):
        m = re.fullmatch(r"eval_(.+)-s(\d+)(?:-t([\d.]+))?\.json", path.name)
        if m:
            evals[(m[1], int(m[2]), m[3])] = load(path)
    seeds = sorted({s for _, s, _ in evals})
    rows = [r for r in ("all", "dense", "dense_sparse", "sparse") if any((r, s, None) in evals for s in seeds)]

    print("### Heads\n\nnDCG@10 on the held-out split (258 queries); the difference from `all` of the same seed, "
          "paired bootstrap 95 % interval over queries (bold: excludes 0).\n")
    print("| seed | heads | " + " | ".join(HEADS) + " | " + " | ".join(f"{h} − all" for h in HEADS) + " |")
    print("|---" * (2 + 2 * len(HEADS)) + "|")
    for seed in seeds:
        for row in rows:
            result = evals.get((row, seed, None))
            if result is None:
                continue
            cmp = load(run / f"compare_all_{row}-s{seed}.json")
            print(f"| {seed} | {row} | " + " | ".join(fmt(ndcg(result, h)) for h in HEADS) + " | "
                  + " | ".join(diff(cmp, h) if row != "all" else "" for h in HEADS) + " |")

    dims = sorted({d for r in evals.values() for d in r.get("dims", {})}, key=int)
    mrl_rows = sorted({r for r, _, t in evals if r.startswith("mrl") and t is None}, key=lambda r: (len(r), r))
    for dim in dims:
        print(f"\n### Matryoshka at {dim}\n\n`all` cut to {dim} is plain truncation of a model trained without MRL; "
              f"`mrl` trained {dim} beside the full size (`mrlw<W>`: with weight W on {dim}). Kept: nDCG@10 at "
              f"{dim} / the same model's full size.\n")
        print(f"| seed | run | head | all full | all@{dim} | run full | run@{dim} | kept | run@{dim} − all@{dim} | "
              "run full − all full |\n|---|---|---|---|---|---|---|---|---|---|")
        for seed in seeds:
            for row in mrl_rows:
                base, mrl = evals.get(("all", seed, None)), evals.get((row, seed, None))
                if base is None or mrl is None:
                    continue
                cmp = load(run / f"compare_all_{row}-s{seed}.json")
                for head in ("dense", "colbert", "ensemble"):
                    full, cut = ndcg(mrl, head), ndcg(mrl, head, dim)
                    print(f"| {seed} | {row} | {head} | {fmt(ndcg(base, head))} | {fmt(ndcg(base, head, dim))} | "
                          f"{fmt(full)} | {fmt(cut)} | {cut / full:.1%} | {diff(cmp, f'{head}@{dim}')} | "
                          f"{diff(cmp, head)} |")

    sparse_rows = sorted({(r, t) for r, _, t in evals if r == "all" or r.startswith(("flops", "l1-"))},
                         key=lambda rt: (rt[0] != "all", rt[0], float(rt[1] or 0)))
    if sparse_rows:
        print("\n### Sparsity\n\nThe sparse head of each run, at each threshold (`m3c eval --sparse-threshold`): "
              "non-zero terms per query and per passage, the expected multiplications of one sparse dot "
              "product, nDCG@10, and its difference from `all` at threshold 0 (same seed).\n")
        print("| seed | run | threshold | non-zero / query | non-zero / passage | expected cost | sparse nDCG@10 | "
              "− all |\n|---|---|---|---|---|---|---|---|")
        for seed in seeds:
            for row, t in sparse_rows:
                result = evals.get((row, seed, t))
                if result is None or "sparse_cost" not in result:
                    continue
                cost = result["sparse_cost"]
                name = row if t is None else f"{row}_t{t}"
                cmp = None if name == "all" else load(run / f"compare_all_{name}-s{seed}.json")
                print(f"| {seed} | {row} | {t or 0} | {cost['nonzero_per_query']:.1f} | "
                      f"{cost['nonzero_per_passage']:.1f} | {cost['expected_flops']:.2f} | "
                      f"{fmt(ndcg(result, 'sparse'))} | {diff(cmp, 'sparse') if cmp else ''} |")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/serving-budget"))

"""Paired comparison of two evaluations of the same queries; the `m3c compare` command.

    m3c eval BASE  EVAL --per-query --output base.json
    m3c eval MODEL EVAL --per-query --output model.json
    m3c compare base.json model.json [--metric ndcg@10] [--base-head dense]

Each head of the model is compared with the same head of the base. A head the base was not
evaluated with (a plain encoder such as e5-small has only dense; its eval JSON has no per-query
rows for the others) is shown without a comparison: a fine-tuned sparse head measured against the
base's dense head would read as "sparse got worse" when the base has no sparse head at all.
`--base-head dense` compares every head with the base's dense head instead, and says so.

Two models scored on the same queries differ query by query; the mean difference alone says
nothing about noise. `paired_bootstrap` resamples the queries with replacement (the same draw for
both models, so per-query differences stay paired) and reports the mean difference with a
percentile interval. An interval that excludes 0 is a difference the query sample supports.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from typing import Mapping, Optional

import numpy as np

from m3composer.fsutil import write_json_atomic
from m3composer.model.scores import SCORE_NAMES


@dataclass(frozen=True)
class PairedDifference:
    queries: int
    base: float          # mean over the queries
    other: float
    difference: float    # other - base
    low: float           # percentile bootstrap interval of the difference
    high: float

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    @property
    def verdict(self) -> str:
        """`better` / `worse` when the interval lies above / below 0, else `no clear difference`."""
        if self.low > 0:
            return "better"
        if self.high < 0:
            return "worse"
        return "no clear difference"


def paired_bootstrap(base: Mapping[str, float], other: Mapping[str, float], *, samples: int = 10_000,
                     confidence: float = 0.95, seed: int = 0) -> PairedDifference:
    """Mean of `other - base` over the queries both score, with a paired percentile bootstrap interval."""
    shared = sorted(set(base) & set(other))
    if not shared:
        raise ValueError("the two evaluations share no query")
    a = np.array([base[q] for q in shared], dtype=np.float64)
    b = np.array([other[q] for q in shared], dtype=np.float64)
    diff = b - a
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(diff), size=(samples, len(diff)))
    means = diff[draws].mean(axis=1)
    tail = (1 - confidence) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return PairedDifference(len(shared), float(a.mean()), float(b.mean()), float(diff.mean()), float(low), float(high))


def combined_verdict(differences: list[PairedDifference]) -> str:
    """One verdict over several metrics: `better` only when every interval lies above 0, `worse`
    when one lies below 0 and none above, else `no clear difference`."""
    verdicts = {d.verdict for d in differences}
    if verdicts == {"better"}:
        return "better"
    if "worse" in verdicts and "better" not in verdicts:
        return "worse"
    return "no clear difference"


def per_query(results: dict, head: str, metric: str, where: str) -> Optional[dict[str, float]]:
    """`{query id: metric}` of one head from an `m3c eval --per-query` JSON; None if the head is absent."""
    if "per_query" not in results:
        raise ValueError(f"{where}: no per-query metrics (run m3c eval with --per-query)")
    rows = results["per_query"].get(head)
    if rows is None:
        return None
    try:
        return {q: float(m[metric]) for q, m in rows.items()}
    except KeyError:
        raise ValueError(f"{where}: no metric {metric!r} (has {sorted(next(iter(rows.values())))})") from None


def compared_heads(results: dict) -> list[str]:
    """The heads of an `m3c eval --per-query` JSON in table order: dense, sparse, colbert, ensemble, then the
    Matryoshka rows (`dense@96`, …: `m3c eval --dims`), largest size first."""
    rows = results.get("per_query", {})
    at_size = sorted((h for h in rows if "@" in h),
                     key=lambda h: (-int(h.split("@")[1]), SCORE_NAMES.index(h.split("@")[0])))
    return [h for h in SCORE_NAMES if h in rows] + at_size


def compare(base: dict, other: dict, *, metric: str = "ndcg@10", base_head: Optional[str] = None,
            samples: int = 10_000, seed: int = 0,
            where: tuple[str, str] = ("base", "other")) -> dict[str, Optional[PairedDifference]]:
    """Every head of `other` (its Matryoshka rows too) against the same head of `base`, or against
    `base_head` of `base` for all.

    A head of `other` that `base` has no per-query rows for maps to None (not compared), unless
    `base_head` is given; a `base_head` that `base` lacks is an error."""
    for results, name in zip((base, other), where):
        if "per_query" not in results:
            raise ValueError(f"{name}: no per-query metrics (run m3c eval with --per-query)")
    out: dict[str, Optional[PairedDifference]] = {}
    for head in compared_heads(other):
        theirs = per_query(other, head, metric, where[1])
        if theirs is None:
            continue
        ours = per_query(base, base_head or head, metric, where[0])
        if ours is None and base_head:
            raise ValueError(f"{where[0]}: no per-query metrics of the {base_head} head (--base-head)")
        out[head] = None if ours is None else paired_bootstrap(ours, theirs, samples=samples, seed=seed)
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("base", help="`m3c eval --per-query --output` JSON of the reference model")
    parser.add_argument("other", help="the same for the model compared with it")
    parser.add_argument("--metric", default="ndcg@10", help="per-query metric to compare (default: ndcg@10)")
    parser.add_argument("--base-head", default=None,
                        help="compare every head with this one head of the base, e.g. dense (default: each "
                             "head with the same head of the base; a head the base lacks is not compared)")
    parser.add_argument("--samples", type=int, default=10_000, help="bootstrap resamples (default: 10000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=None, help="write the comparison as JSON here (a head not compared: null)")


def run(args: argparse.Namespace) -> int:
    try:
        base, other = (json.loads(open(path, encoding="utf-8").read()) for path in (args.base, args.other))
        result = compare(base, other, metric=args.metric, base_head=args.base_head, samples=args.samples,
                         seed=args.seed, where=(args.base, args.other))
    except (OSError, ValueError) as err:
        print(f"m3c compare: error: {err}", file=sys.stderr)
        return 2
    against = f"the base's {args.base_head} head" if args.base_head else "the same head of the base"
    print(f"{args.metric}, {args.other} vs {args.base}: each head against {against} "
          "(paired bootstrap over queries, 95 %)")
    print(f"{'head':<12}{'queries':>8}{'base':>9}{'other':>9}{'diff':>9}   interval")
    for head, d in result.items():
        if d is None:
            theirs = per_query(other, head, args.metric, args.other)
            print(f"{head:<12}{len(theirs):>8}{'-':>9}{np.mean(list(theirs.values())):>9.4f}{'-':>9}   "
                  f"no base {head} head: not compared")
            continue
        mark = "  *" if d.excludes_zero else ""
        print(f"{head:<12}{d.queries:>8}{d.base:>9.4f}{d.other:>9.4f}{d.difference:>+9.4f}   "
              f"[{d.low:+.4f}, {d.high:+.4f}]{mark}")
    print("* the interval excludes 0")
    if args.output:
        write_json_atomic(args.output, {head: None if d is None else {**vars(d), "excludes_zero": d.excludes_zero}
                                        for head, d in result.items()})
    return 0

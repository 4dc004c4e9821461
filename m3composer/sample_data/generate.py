"""`m3c sample-data`: real multi-task training data in FlagEmbedding JSONL, plus a held-out BEIR split.

    m3c sample-data OUT_DIR [--seed 42] [--tokenizer DIR] [--max-rows-per-task N]

Output (written to a temporary folder beside OUT_DIR, then renamed into place):

    OUT_DIR/train/<task>/<task>_len-<lo>-<hi>.jsonl   {"query", "pos", "neg"[, "pos_scores", "neg_scores"]}
    OUT_DIR/eval/corpus.jsonl   {"_id", "title", "text"}
    OUT_DIR/eval/queries.jsonl  {"_id", "text"}
    OUT_DIR/eval/qrels/test.tsv query-id <tab> corpus-id <tab> score
    OUT_DIR/info.json, OUT_DIR/README.md   sources, licences, counts, the BM25 baseline

Tasks (texts from `sources.py`):
* `pydoc_topics`       section title -> section body; negatives: sibling sections of the topic.
* `stdlib_docstrings`  docstring summary -> docstring body; negatives: docstrings of the same module.
* `parallel_en_xx`     English Django message -> its translation (de, es, fr, ru, zh_Hans);
                       negatives: neighbouring entries of the same catalogue.
Negatives of the two monolingual tasks are the group's siblings ranked by BM25 against the query
(topped up with the best BM25 passages of other groups when a group is small), so they are hard.
Their `pos_scores`/`neg_scores` are a lexical teacher: BM25 of the query against each passage,
scaled by 10 / (the row's largest BM25) so they sit in a reranker-like logit range [0, 10].

The eval split is drawn per source item *before* any training row is built: held-out items
appear in no training file (not as query, positive or negative). Its corpus is the held-out
positives plus every other passage of the same groups (all pydoc sections; all docstrings of the
held-out queries' modules), so the distractors are the hard siblings.

Length bucket of a row = the largest token count over query, positives and negatives, with the
real tokenizer, special tokens included, no truncation (docs/recipe.md §Length buckets; edges from `data.buckets`).
The output is byte-identical for the same seed, Python (stdlib text), Django and tokenizer.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import random
import shutil
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from m3composer.fsutil import publish_dir
from m3composer.sample_data.sources import (Item, Translation, django_translations, pydoc_sections,
                                              stdlib_docstrings)
from m3composer.data.buckets import DEFAULT_EDGES, bucket_for_length
from m3composer.retrieval.bm25 import BM25, evaluate_bm25_on_beir
from m3composer.seeds import HOLDOUT_TAG, SUBSAMPLE_TAG

TASK_PYDOC = "pydoc_topics"
TASK_DOCSTRINGS = "stdlib_docstrings"
TASK_PARALLEL = "parallel_en_xx"
DEFAULT_LANGUAGES = ("de", "es", "fr", "ru", "zh_Hans")
TEACHER_SCALE = 10.0

LICENCES = {
    "cpython": "PSF-2.0 (Python Software Foundation License); CPython documentation and source",
    "django": "BSD-3-Clause (Django's licence; translations are contributed under it)",
}


@dataclass(frozen=True)
class SampleDataConfig:
    seed: int = 42
    max_rows_per_task: int | None = 1000   # keeps the whole output a few MB
    max_neg: int = 7                        # enough for train_group_size 8 without repeats
    holdout_fraction: float = 0.1
    languages: tuple[str, ...] = DEFAULT_LANGUAGES


# --- building rows ----------------------------------------------------------------------------

def split_holdout(items: Sequence[Item], fraction: float, seed: int, task: str) -> tuple[list[Item], list[Item]]:
    """(train, held out): a seeded choice of round(fraction * n) items, each list in source order."""
    order = sorted(range(len(items)), key=lambda i: items[i].item_id)
    random.Random(f"{seed}:{task}:{HOLDOUT_TAG}").shuffle(order)
    held = set(order[:round(fraction * len(items))])
    return ([it for i, it in enumerate(items) if i not in held],
            [it for i, it in enumerate(items) if i in held])


def mine_rows(items: Sequence[Item], max_neg: int) -> list[dict]:
    """One row per item: its passage as positive, hard negatives, BM25 teacher scores.

    Negatives: the other passages of the item's group in BM25 order against the query, then (if
    the group has fewer than `max_neg` others) the best BM25 passages of the whole pool."""
    index = BM25([it.passage for it in items])
    by_group: dict[str, list[int]] = defaultdict(list)
    for i, it in enumerate(items):
        by_group[it.group].append(i)
    everyone = np.arange(len(items))
    rows = []
    for i, it in enumerate(items):
        scores = index.scores(it.query)
        siblings = sorted((j for j in by_group[it.group] if j != i), key=lambda j: (-scores[j], j))
        negatives = siblings[:max_neg]
        if len(negatives) < max_neg:
            taken = set(negatives) | {i}
            for j in np.lexsort((everyone, -scores)):
                if len(negatives) == max_neg:
                    break
                if int(j) not in taken:
                    negatives.append(int(j))
        raw = scores[[i] + negatives]
        scale = TEACHER_SCALE / raw.max() if raw.max() > 0 else 0.0
        teacher = [round(float(s * scale), 4) for s in raw]
        rows.append({"query": it.query, "pos": [it.passage], "neg": [items[j].passage for j in negatives],
                     "pos_scores": teacher[:1], "neg_scores": teacher[1:]})
    return rows


def parallel_rows(translations: Sequence[Translation], max_neg: int) -> list[dict]:
    """English message -> translation; negatives: the nearest entries of the same catalogue (then
    of the language's neighbouring catalogues), whose translations differ from the positive."""
    by_lang: dict[str, list[Translation]] = defaultdict(list)
    for t in translations:
        by_lang[t.lang].append(t)
    rows = []
    for lang in sorted(by_lang):  # any fixed order; rows are sampled and bucketed later
        entries = by_lang[lang]
        for k, entry in enumerate(entries):
            window = range(max(0, k - 4 * max_neg), min(len(entries), k + 4 * max_neg + 1))
            nearest = sorted((j for j in window if j != k),
                             key=lambda j: (entries[j].catalogue != entry.catalogue, abs(j - k), j))
            negatives: list[str] = []
            for j in nearest:
                target = entries[j].target
                if target != entry.target and target not in negatives:
                    negatives.append(target)
                if len(negatives) == max_neg:
                    break
            rows.append({"query": entry.source, "pos": [entry.target], "neg": negatives, "_lang": lang})
    return rows


def subsample(rows: list[dict], limit: int | None, seed: int, task: str) -> list[dict]:
    """At most `limit` rows, a seeded choice kept in original order."""
    if limit is None or len(rows) <= limit:
        return rows
    keep = sorted(random.Random(f"{seed}:{task}:{SUBSAMPLE_TAG}").sample(range(len(rows)), limit))
    return [rows[i] for i in keep]


# --- token lengths ----------------------------------------------------------------------------

class TokenCounter:
    """Token counts with the real tokenizer (special tokens in, no truncation), cached per text."""

    def __init__(self, tokenizer_dir: str | os.PathLike):
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
        # We only count; raising the limit on this instance silences the "longer than the
        # maximum" warning that is about model inputs, not about counting.
        self.tokenizer.model_max_length = 1 << 40
        self._cache: dict[str, int] = {}

    def count(self, texts: Sequence[str]) -> list[int]:
        missing = sorted({t for t in texts if t not in self._cache})
        for start in range(0, len(missing), 512):
            batch = missing[start:start + 512]
            ids = self.tokenizer(batch, add_special_tokens=True, truncation=False)["input_ids"]
            self._cache.update(zip(batch, map(len, ids)))
        return [self._cache[t] for t in texts]

    def row_length(self, row: dict) -> int:
        return max(self.count([row["query"], *row["pos"], *row["neg"]]))


def bucket_rows(rows: Sequence[dict], counter: TokenCounter) -> dict[str, list[dict]]:
    """bucket name -> its rows (in input order), buckets ordered by lower edge."""
    counter.count([t for r in rows for t in (r["query"], *r["pos"], *r["neg"])])  # one batched pass
    buckets: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        bucket = bucket_for_length(counter.row_length(row), DEFAULT_EDGES)
        buckets[(bucket.lo, bucket.name)].append(row)
    return {name: buckets[(lo, name)] for lo, name in sorted(buckets)}


# --- eval split -------------------------------------------------------------------------------

def build_eval(held: dict[str, list[Item]], pools: dict[str, list[Item]]):
    """(corpus rows, query rows, qrels) in BEIR form from the held-out items of each task.

    The corpus of a task is every passage of the groups its held-out items come from; pydoc
    topics are small, so its whole pool of sections is used."""
    corpus: dict[str, dict] = {}
    queries, qrels = [], []
    for task in sorted(held):
        groups = {it.group for it in held[task]}
        for it in pools[task]:
            if task == TASK_PYDOC or it.group in groups:
                corpus[it.item_id] = {"_id": it.item_id, "title": it.title, "text": it.passage}
        for it in held[task]:
            queries.append({"_id": f"q:{it.item_id}", "text": it.query})
            qrels.append((f"q:{it.item_id}", it.item_id, 1))
    return ([corpus[k] for k in sorted(corpus)], sorted(queries, key=lambda q: q["_id"]), sorted(qrels))


# --- writing ----------------------------------------------------------------------------------

def _write_jsonl(path: Path, records: Sequence[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")


def _readme(info: dict) -> str:
    lines = ["# m3composer sample data", "",
             "Real text, generated by `m3c sample-data` (seed {seed}, Python {python}, Django {django}).".format(
                 seed=info["seed"], python=info["python"], django=info["django"]), "",
             "| task | source | licence | file | rows |", "|---|---|---|---|---|"]
    for task, t in info["tasks"].items():
        for path, n in t["files"].items():
            lines.append(f"| {task} | {t['source']} | {t['licence']} | `{path}` | {n} |")
    ev = info["eval"]
    lines += ["", f"Teacher scores (`pos_scores`/`neg_scores`): {info['teacher_scores']}", "",
              f"Held-out eval split (`eval/`, BEIR layout): {ev['queries']} queries, {ev['corpus']} documents, "
              f"{ev['qrels']} qrels. Held-out items appear in no training file.", "",
              "BM25 baseline on the eval split: recall@10 {r:.3f}, nDCG@10 {n:.3f} "
              "(random ranking: {rr:.4f}, {rn:.4f}).".format(
                  r=ev["bm25"]["recall"], n=ev["bm25"]["ndcg"],
                  rr=ev["bm25"]["random_recall"], rn=ev["bm25"]["random_ndcg"]), ""]
    return "\n".join(lines)


def generate(out_dir: str | os.PathLike, tokenizer_dir: str | os.PathLike,
             config: SampleDataConfig = SampleDataConfig(), overwrite: bool = False,
             log: Callable[[str], None] = print) -> dict:
    """Write the sample data to `out_dir` atomically and return what info.json holds."""
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not empty (pass overwrite=True / --overwrite)")
    if not 0 < config.holdout_fraction < 1:
        raise ValueError(f"holdout_fraction must be in (0, 1), got {config.holdout_fraction}")

    log("[sample-data] reading pydoc topics, stdlib docstrings and Django catalogues")
    pools = {TASK_PYDOC: pydoc_sections(), TASK_DOCSTRINGS: stdlib_docstrings()}
    translations = django_translations(list(config.languages))

    train_rows: dict[str, list[dict]] = {}
    held: dict[str, list[Item]] = {}
    for task, items in pools.items():
        train, held[task] = split_holdout(items, config.holdout_fraction, config.seed, task)
        train_rows[task] = subsample(mine_rows(train, config.max_neg), config.max_rows_per_task, config.seed, task)
        log(f"[sample-data] {task}: {len(items)} items -> {len(train)} train / {len(held[task])} held out, "
            f"{len(train_rows[task])} rows")
    train_rows[TASK_PARALLEL] = subsample(parallel_rows(translations, config.max_neg),
                                          config.max_rows_per_task, config.seed, TASK_PARALLEL)
    languages = defaultdict(int)
    for row in train_rows[TASK_PARALLEL]:
        languages[row.pop("_lang")] += 1
    log(f"[sample-data] {TASK_PARALLEL}: {len(translations)} translations -> "
        f"{len(train_rows[TASK_PARALLEL])} rows {dict(sorted(languages.items()))}")

    log(f"[sample-data] measuring token lengths with {tokenizer_dir}")
    counter = TokenCounter(tokenizer_dir)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tasks_info = {}
        sources = {TASK_PYDOC: ("CPython pydoc_data.topics", "cpython"),
                   TASK_DOCSTRINGS: ("CPython standard-library docstrings (ast)", "cpython"),
                   TASK_PARALLEL: ("Django translation catalogues (.mo), English -> "
                                   + ", ".join(config.languages), "django")}
        for task, rows in train_rows.items():
            files = {}
            for bucket, bucket_rows_ in bucket_rows(rows, counter).items():
                rel = f"train/{task}/{task}_{bucket}.jsonl"
                _write_jsonl(tmp / rel, bucket_rows_)
                files[rel] = len(bucket_rows_)
            source, licence = sources[task]
            tasks_info[task] = {"source": source, "licence": LICENCES[licence], "rows": len(rows), "files": files,
                                "teacher_scores": task != TASK_PARALLEL}
            if task == TASK_PARALLEL:
                tasks_info[task]["languages"] = dict(sorted(languages.items()))

        corpus, queries, qrels = build_eval(held, pools)
        _write_jsonl(tmp / "eval" / "corpus.jsonl", corpus)
        _write_jsonl(tmp / "eval" / "queries.jsonl", queries)
        (tmp / "eval" / "qrels").mkdir(parents=True, exist_ok=True)
        with (tmp / "eval" / "qrels" / "test.tsv").open("w", encoding="utf-8", newline="\n") as f:
            f.write("query-id\tcorpus-id\tscore\n")
            f.writelines(f"{q}\t{d}\t{s}\n" for q, d, s in qrels)
        bm25 = evaluate_bm25_on_beir(tmp / "eval", k=10)
        log(f"[sample-data] eval: {len(queries)} queries, {len(corpus)} documents; BM25 recall@10 "
            f"{bm25['recall']:.3f} nDCG@10 {bm25['ndcg']:.3f} (random {bm25['random_recall']:.4f} / "
            f"{bm25['random_ndcg']:.4f})")

        info = {
            "generator": "m3c sample-data", "seed": config.seed,
            "python": platform.python_version(), "django": importlib.metadata.version("django"),
            "tokenizer": {"folder": Path(tokenizer_dir).name, "vocab_size": len(counter.tokenizer)},
            "length_buckets": "max tokens over query, pos and neg; special tokens included; no truncation; "
                              f"edges {list(DEFAULT_EDGES)}",
            "teacher_scores": "BM25 (k1=1.2, b=0.75, lower-cased \\w+ tokens, index = the task's training "
                              f"passages) of the query against each passage, times {TEACHER_SCALE:g} / the "
                              "row's largest BM25 score; present on " + ", ".join(
                                  t for t, v in tasks_info.items() if v["teacher_scores"]),
            "config": {"max_rows_per_task": config.max_rows_per_task, "max_neg": config.max_neg,
                       "holdout_fraction": config.holdout_fraction, "languages": list(config.languages)},
            "tasks": tasks_info,
            "eval": {"queries": len(queries), "corpus": len(corpus), "qrels": len(qrels),
                     "held_out": {t: len(v) for t, v in sorted(held.items())},
                     "bm25": {k: round(v, 6) if isinstance(v, float) else v for k, v in bm25.items()}},
        }
        (tmp / "info.json").write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        (tmp / "README.md").write_text(_readme(info), encoding="utf-8")

        publish_dir(tmp, out_dir)   # as late as possible: the old folder stays readable until here
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return info


# --- CLI --------------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out_dir", help="output folder (created; must be absent or empty unless --overwrite)")
    parser.add_argument("--seed", type=int, default=42, help="hold-out split and row sampling seed")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer folder for length buckets (default: the e5-small asset, built if missing)")
    parser.add_argument("--cache-dir", default=None, help="asset cache for the default tokenizer")
    parser.add_argument("--max-rows-per-task", type=int, default=SampleDataConfig.max_rows_per_task,
                        help="cap on training rows per task, seeded choice (0 = no cap)")
    parser.add_argument("--max-neg", type=int, default=SampleDataConfig.max_neg, help="hard negatives per row")
    parser.add_argument("--holdout-fraction", type=float, default=SampleDataConfig.holdout_fraction,
                        help="share of pydoc sections and docstrings held out for eval/")
    parser.add_argument("--languages", default=",".join(DEFAULT_LANGUAGES),
                        help="Django locale names for the parallel task, comma-separated")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    tokenizer = args.tokenizer
    if tokenizer is None:
        from m3composer.assets.build import ensure_assets
        from m3composer.assets.paths import E5_SMALL

        tokenizer = ensure_assets(args.cache_dir)[E5_SMALL]
    config = SampleDataConfig(seed=args.seed, max_rows_per_task=args.max_rows_per_task or None,
                              max_neg=args.max_neg, holdout_fraction=args.holdout_fraction,
                              languages=tuple(x for x in args.languages.split(",") if x))
    try:
        info = generate(args.out_dir, tokenizer, config, overwrite=args.overwrite)
    except (FileExistsError, ValueError, RuntimeError) as err:
        print(f"m3c sample-data: error: {err}", file=sys.stderr)
        return 2
    print(f"[sample-data] wrote {args.out_dir} in {time.perf_counter() - started:.1f} s")
    for task, t in info["tasks"].items():
        for path, n in t["files"].items():
            print(f"  {path:60s} {n:6d} rows")
    ev = info["eval"]
    print(f"  eval: {ev['queries']} queries, {ev['corpus']} documents, {ev['qrels']} qrels")
    return 0

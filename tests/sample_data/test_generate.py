"""`m3c sample-data`: real multi-task JSONL + held-out BEIR split, checked on the real output.

The data set is generated twice per session (once through the CLI with the default tokenizer,
once through `generate` with the e5-small folder), with the real e5 tokenizer in both cases.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from m3composer.sample_data.generate import SampleDataConfig, generate
from m3composer.cli import main as m3c
from m3composer.data.buckets import parse_bucket
from m3composer.retrieval.bm25 import evaluate_bm25_on_beir

FILE_RE = re.compile(r"^(?P<task>[\w]+)_len-\d+-(\d+|inf)\.jsonl$")
CYRILLIC = re.compile(r"[\u0400-\u04ff]")
CJK = re.compile(r"[\u4e00-\u9fff]")
WORD = re.compile(r"\w+")


@pytest.fixture(scope="module")
def sample_dir(tmp_path_factory, e5_dir) -> Path:
    out = tmp_path_factory.mktemp("sample") / "data"
    assert m3c(["sample-data", str(out)]) == 0   # default tokenizer: the e5-small asset
    return out


@pytest.fixture(scope="module")
def sample_dir_again(tmp_path_factory, e5_dir) -> Path:
    out = tmp_path_factory.mktemp("sample_again") / "data"
    generate(out, e5_dir, SampleDataConfig(seed=42), log=lambda _: None)
    return out


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def train_files(root: Path) -> dict[str, list[Path]]:
    tasks: dict[str, list[Path]] = {}
    for path in sorted((root / "train").glob("*/*")):
        tasks.setdefault(path.parent.name, []).append(path)
    return tasks


def all_train_rows(root: Path) -> list[dict]:
    return [row for paths in train_files(root).values() for p in paths for row in read_jsonl(p)]


def test_train_files_are_named_task_len_lo_hi_inside_their_task_dir(sample_dir):
    tasks = train_files(sample_dir)
    assert {"pydoc_topics", "stdlib_docstrings"} <= set(tasks)
    assert any("parallel_" in t for t in tasks)
    for task, paths in tasks.items():
        for path in paths:
            match = FILE_RE.match(path.name)
            assert match and match["task"] == task, path


def test_every_line_is_a_valid_flagembedding_row(sample_dir):
    for paths in train_files(sample_dir).values():
        for path in paths:
            rows = read_jsonl(path)
            assert rows, f"{path} is empty"
            for n, row in enumerate(rows, 1):
                where = f"{path.name}:{n}"
                assert set(row) in ({"query", "pos", "neg"}, {"query", "pos", "neg", "pos_scores", "neg_scores"}), where
                assert isinstance(row["query"], str) and row["query"].strip(), where
                for key in ("pos", "neg"):
                    assert isinstance(row[key], list) and row[key], where
                    assert all(isinstance(t, str) and t.strip() for t in row[key]), where
                assert row["pos"][0] not in row["neg"], where


def test_bucket_in_each_file_name_contains_the_measured_token_lengths(sample_dir, tokenizer):
    spread = set()
    for paths in train_files(sample_dir).values():
        for path in paths:
            bucket = parse_bucket(path.name)
            for row in read_jsonl(path):
                texts = [row["query"], *row["pos"], *row["neg"]]
                # measured independently: special tokens in, no truncation
                ids = tokenizer(texts, add_special_tokens=True, truncation=False, verbose=False)["input_ids"]
                length = max(map(len, ids))
                assert bucket.contains(length), (path.name, length)
            spread.add(bucket.name)
    assert len(spread) >= 3   # pydoc sections reach the long buckets


def test_parallel_task_pairs_english_with_other_languages(sample_dir):
    (task,) = [t for t in train_files(sample_dir) if "parallel_" in t]
    rows = [r for p in train_files(sample_dir)[task] for r in read_jsonl(p)]
    assert len(rows) >= 300
    for row in rows:
        assert not CYRILLIC.search(row["query"]) and not CJK.search(row["query"])
        assert row["pos"][0].lower() != row["query"].lower()
    # translations into scripts English never uses: Russian and Chinese are among the targets
    assert sum(bool(CYRILLIC.search(r["pos"][0])) for r in rows) >= 50
    assert sum(bool(CJK.search(r["pos"][0])) for r in rows) >= 50
    # hard negatives are in the positive's language: a Russian positive gets Russian negatives
    for row in rows:
        if CYRILLIC.search(row["pos"][0]):
            assert all(CYRILLIC.search(n) for n in row["neg"])
    info = json.loads((sample_dir / "info.json").read_text())
    assert "Django" in info["tasks"][task]["source"] and "BSD" in info["tasks"][task]["licence"]


def test_teacher_scores_align_with_passages_and_span_the_documented_range(sample_dir):
    tasks = train_files(sample_dir)
    for task in ("pydoc_topics", "stdlib_docstrings"):
        for path in tasks[task]:
            for row in read_jsonl(path):
                assert len(row["pos_scores"]) == len(row["pos"]) and len(row["neg_scores"]) == len(row["neg"])
                scores = row["pos_scores"] + row["neg_scores"]
                assert all(isinstance(s, float) and 0.0 <= s <= 10.0 for s in scores)
                # scaled so the row's best lexical match scores 10 (unless nothing overlaps)
                assert max(scores) == 10.0 or max(scores) == 0.0


def _jaccard(a: str, b: str) -> float:
    wa, wb = set(WORD.findall(a.lower())), set(WORD.findall(b.lower()))
    return len(wa & wb) / max(1, len(wa | wb))


def test_hard_negatives_overlap_the_query_more_than_other_rows_passages(sample_dir):
    rows = read_jsonl(train_files(sample_dir)["stdlib_docstrings"][0])
    assert len(rows) >= 200
    hard = [sum(_jaccard(r["query"], n) for n in r["neg"]) / len(r["neg"]) for r in rows]
    # baseline: the positives of unrelated rows (the row 97 places further on)
    other = [_jaccard(r["query"], rows[(i + 97) % len(rows)]["pos"][0]) for i, r in enumerate(rows)]
    assert sum(hard) / len(hard) > 1.5 * sum(other) / len(other)


def test_eval_split_is_beir_shaped_and_consistent(sample_dir):
    eval_dir = sample_dir / "eval"
    corpus = read_jsonl(eval_dir / "corpus.jsonl")
    queries = read_jsonl(eval_dir / "queries.jsonl")
    assert all(set(d) == {"_id", "title", "text"} for d in corpus)
    assert all(set(q) == {"_id", "text"} for q in queries)
    doc_ids, query_ids = [d["_id"] for d in corpus], [q["_id"] for q in queries]
    assert len(set(doc_ids)) == len(doc_ids) and len(set(query_ids)) == len(query_ids)
    lines = (eval_dir / "qrels" / "test.tsv").read_text().splitlines()
    assert lines[0] == "query-id\tcorpus-id\tscore"
    qrels = [line.split("\t") for line in lines[1:]]
    assert {q for q, _, _ in qrels} == set(query_ids)
    assert {d for _, d, _ in qrels} <= set(doc_ids)
    assert 100 <= len(queries) and 300 <= len(corpus) <= 3000
    info = json.loads((sample_dir / "info.json").read_text())
    assert info["eval"]["queries"] == len(queries) and info["eval"]["corpus"] == len(corpus)


def test_held_out_items_appear_in_no_training_file(sample_dir):
    eval_dir = sample_dir / "eval"
    corpus = {d["_id"]: d["text"] for d in read_jsonl(eval_dir / "corpus.jsonl")}
    held_queries = {q["text"] for q in read_jsonl(eval_dir / "queries.jsonl")}
    held_passages = {corpus[line.split("\t")[1]]
                     for line in (eval_dir / "qrels" / "test.tsv").read_text().splitlines()[1:]}
    rows = all_train_rows(sample_dir)
    train_queries = {r["query"] for r in rows}
    train_texts = train_queries | {t for r in rows for t in r["pos"] + r["neg"]}
    assert not held_queries & train_queries
    assert not held_passages & train_texts
    assert not held_queries & train_texts
    # the distractors are real training passages of the same modules/topics
    assert len(set(corpus.values()) & train_texts) >= 100


def test_bm25_beats_chance_clearly_on_the_held_out_split(sample_dir):
    result = evaluate_bm25_on_beir(sample_dir / "eval", k=10)
    print(f"BM25 on {result['queries']} queries / {result['corpus']} docs: recall@10 {result['recall']:.3f} "
          f"(random {result['random_recall']:.4f}), nDCG@10 {result['ndcg']:.3f} (random {result['random_ndcg']:.4f})")
    assert result["recall"] > 0.3 and result["recall"] > 20 * result["random_recall"]
    assert result["ndcg"] > 0.2 and result["ndcg"] > 20 * result["random_ndcg"]


def test_same_seed_gives_the_same_bytes(sample_dir, sample_dir_again):
    first = sorted(p.relative_to(sample_dir) for p in sample_dir.rglob("*") if p.is_file())
    second = sorted(p.relative_to(sample_dir_again) for p in sample_dir_again.rglob("*") if p.is_file())
    assert first == second
    for rel in first:
        assert (sample_dir / rel).read_bytes() == (sample_dir_again / rel).read_bytes(), rel


def test_another_seed_holds_out_other_items(tmp_path, e5_dir, sample_dir):
    out = tmp_path / "seed7"
    generate(out, e5_dir, SampleDataConfig(seed=7, max_rows_per_task=50), log=lambda _: None)
    ids = lambda root: {q["_id"] for q in read_jsonl(root / "eval" / "queries.jsonl")}  # noqa: E731
    assert ids(out) != ids(sample_dir)
    assert all(sum(1 for _ in open(p)) <= 50 for paths in train_files(out).values() for p in paths)
    assert sum(info["rows"] for info in json.loads((out / "info.json").read_text())["tasks"].values()) == 150


def test_existing_output_is_kept_unless_overwrite(tmp_path, e5_dir, capsys):
    out = tmp_path / "data"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    args = ["sample-data", str(out), "--tokenizer", str(e5_dir), "--max-rows-per-task", "20"]
    assert m3c(args) == 2
    assert "not empty" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert m3c(args + ["--overwrite"]) == 0
    assert not (out / "keep.txt").exists() and (out / "info.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]   # no temporary folders left behind

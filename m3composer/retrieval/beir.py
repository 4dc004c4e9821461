"""Evaluation sets: a BEIR folder or a FlagEmbedding JSONL, read into one `EvalSet`.

BEIR layout (what retrieval people already have):

    FOLDER/corpus.jsonl      {"_id", "title", "text"} per line
    FOLDER/queries.jsonl     {"_id", "text"} per line
    FOLDER/qrels/<split>.tsv header `query-id<TAB>corpus-id<TAB>score`, then one judgement per line

FlagEmbedding JSONL (`{"query", "pos", "neg"?}` per line): the corpus is the union of every row's
passages (positives and negatives, identical texts merged, first appearance order); each row is a
query whose relevant documents are its positives (grade 1). Query ids are `<file name>:<line>`.

Only queries with at least one relevant judgement (grade > 0) are evaluated, as BEIR does; the
corpus order (file order) is the tie-break order of rankings.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional


@dataclass
class EvalSet:
    """Queries, corpus and graded qrels; `docs[i]` is the text of `doc_ids[i]` (title + " " + text)."""
    query_ids: list[str]
    queries: list[str]
    doc_ids: list[str]
    docs: list[str]
    qrels: dict[str, dict[str, float]]
    source: str = ""
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if len(self.query_ids) != len(self.queries) or len(self.doc_ids) != len(self.docs):
            raise ValueError(f"{self.source}: ids and texts differ in length")
        if not self.query_ids:
            raise ValueError(f"{self.source}: no query with a relevant document")
        if not self.doc_ids:
            raise ValueError(f"{self.source}: empty corpus")

    @property
    def num_queries(self) -> int:
        return len(self.query_ids)

    @property
    def num_docs(self) -> int:
        return len(self.doc_ids)

    def first_queries(self, max_queries: Optional[int]) -> "EvalSet":
        """The same corpus with only the first `max_queries` queries (all when None)."""
        if max_queries is None or max_queries >= self.num_queries:
            return self
        keep = self.query_ids[:max_queries]
        return EvalSet(keep, self.queries[:max_queries], self.doc_ids, self.docs,
                       {q: self.qrels[q] for q in keep}, self.source, list(self.notes))


def _read_jsonl(path: Path) -> Iterable[tuple[int, dict]]:
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{line_no}: not JSON ({err.msg} at column {err.colno})") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{path}:{line_no}: expected a JSON object, got {type(obj).__name__}")
            yield line_no, obj


def _field(obj: dict, key: str, path: Path, line_no: int) -> str:
    if key not in obj:
        raise ValueError(f"{path}:{line_no}: no {key!r} field")
    value = obj[key]
    if not isinstance(value, (str, int)) or isinstance(value, bool):
        raise ValueError(f"{path}:{line_no}: {key!r} is {type(value).__name__}, not a string")
    return str(value)


def load_beir(folder: str | os.PathLike, split: str = "test"):
    """(corpus {id: (title, text)}, queries {id: text}, qrels {qid: {doc id: grade}}) of a BEIR folder.

    Dicts keep file order. Errors name the file and line.
    """
    folder = Path(folder)
    qrels_path = folder / "qrels" / f"{split}.tsv"
    if not qrels_path.is_file():
        raise FileNotFoundError(f"{qrels_path}: no qrels for split {split!r}")
    corpus: dict[str, tuple[str, str]] = {}
    corpus_path = folder / "corpus.jsonl"
    for line_no, d in _read_jsonl(corpus_path):
        doc_id = _field(d, "_id", corpus_path, line_no)
        if doc_id in corpus:
            raise ValueError(f"{corpus_path}:{line_no}: duplicate _id {doc_id!r}")
        title = d.get("title") or ""
        corpus[doc_id] = (str(title), _field(d, "text", corpus_path, line_no))
    queries_path = folder / "queries.jsonl"
    queries = {_field(q, "_id", queries_path, n): _field(q, "text", queries_path, n)
               for n, q in _read_jsonl(queries_path)}
    qrels: dict[str, dict[str, float]] = {}
    with qrels_path.open(encoding="utf-8") as f:
        header = f.readline().rstrip("\r\n").split("\t")
        if header != ["query-id", "corpus-id", "score"]:
            raise ValueError(f"{qrels_path}:1: expected header query-id/corpus-id/score, got {header}")
        for line_no, line in enumerate(f, 2):
            if not line.strip():
                continue
            parts = line.rstrip("\r\n").split("\t")
            if len(parts) != 3:
                raise ValueError(f"{qrels_path}:{line_no}: expected 3 tab-separated fields, got {len(parts)}")
            try:
                grade = float(parts[2])
            except ValueError:
                raise ValueError(f"{qrels_path}:{line_no}: score {parts[2]!r} is not a number") from None
            qrels.setdefault(parts[0], {})[parts[1]] = grade
    return corpus, queries, qrels


def doc_text(title: str, text: str) -> str:
    """A corpus document as the models see it: `title + " " + text` (the text alone without a title)."""
    return f"{title} {text}".strip() if title else text


def load_corpus_texts(path: str | os.PathLike) -> list[str]:
    """The documents of a corpus, in file order: a BEIR folder's `corpus.jsonl`, or any JSONL with
    a `text` (and optional `title`) field per line. Errors name the file and line."""
    path = Path(path)
    if path.is_dir():
        path = path / "corpus.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no corpus (a BEIR folder or a JSONL of {{'text'}} lines)")
    return [doc_text(str(d.get("title") or ""), _field(d, "text", path, line_no)) for line_no, d in _read_jsonl(path)]


def _beir_eval_set(folder: Path, split: str) -> EvalSet:
    corpus, queries, qrels = load_beir(folder, split)
    qrels_path = folder / "qrels" / f"{split}.tsv"
    notes = []
    missing_queries = sorted(q for q in qrels if q not in queries)
    if missing_queries:
        raise ValueError(f"{qrels_path}: {len(missing_queries)} query id(s) not in queries.jsonl, "
                         f"e.g. {missing_queries[:3]}")
    unknown_docs = {d for rel in qrels.values() for d in rel if d not in corpus}
    if unknown_docs:
        # pytrec_eval keeps them (they lower recall); so do we, and say so.
        notes.append(f"{len(unknown_docs)} judged document id(s) are not in corpus.jsonl (they count as missed)")
    judged = [q for q in queries if any(g > 0 for g in qrels.get(q, {}).values())]
    without = len(qrels) - len(judged)
    if without:
        notes.append(f"{without} query id(s) in qrels have no relevant document and are not evaluated")
    doc_ids = list(corpus)
    docs = [doc_text(title, text) for title, text in corpus.values()]
    return EvalSet(judged, [queries[q] for q in judged], doc_ids, docs, {q: qrels[q] for q in judged},
                   source=str(folder), notes=notes)


def _jsonl_eval_set(path: Path) -> EvalSet:
    # Validation (file:line + reason) is the training reader's, so both formats fail the same way.
    from m3composer.data.rows import RowError, iter_lines, parse_line

    doc_index: dict[str, int] = {}
    docs: list[str] = []
    query_ids, queries, qrels = [], [], {}

    def doc_id_of(text: str) -> str:
        if text not in doc_index:
            doc_index[text] = len(docs)
            docs.append(text)
        return f"d{doc_index[text]}"

    for line_no, raw, _ in iter_lines(path):
        if not raw.strip():
            continue
        row = parse_line(raw, path=str(path), line_no=line_no)
        if isinstance(row, RowError):
            raise ValueError(str(row))
        query_id = f"{path.name}:{line_no}"
        relevant = {doc_id_of(text): 1.0 for text in row.pos}
        for text in row.neg:
            doc_id_of(text)
        query_ids.append(query_id)
        queries.append(row.query)
        qrels[query_id] = relevant
    return EvalSet(query_ids, queries, [f"d{i}" for i in range(len(docs))], docs, qrels, source=str(path))


def load_eval_set(path: str | os.PathLike, split: str = "test") -> EvalSet:
    """A BEIR folder (with `qrels/<split>.tsv`) or a FlagEmbedding JSONL file (`split` unused)."""
    path = Path(path)
    if path.is_dir():
        return _beir_eval_set(path, split)
    if path.is_file():
        return _jsonl_eval_set(path)
    raise FileNotFoundError(f"{path}: no such evaluation set (a BEIR folder or a JSONL file)")

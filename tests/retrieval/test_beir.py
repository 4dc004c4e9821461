"""Evaluation sets: BEIR folders and FlagEmbedding JSONL read into an EvalSet, errors with file:line."""
import json

import pytest

from m3composer.retrieval.beir import load_beir, load_eval_set


def write_beir(folder, corpus, queries, qrels_lines, split="test"):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in corpus))
    (folder / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    (folder / "qrels").mkdir(exist_ok=True)
    (folder / "qrels" / f"{split}.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(qrels_lines))
    return folder


def test_beir_folder_keeps_file_order_joins_titles_and_drops_unjudged_queries(tmp_path):
    folder = write_beir(
        tmp_path / "beir",
        corpus=[{"_id": "d2", "title": "Two", "text": "second"}, {"_id": "d1", "text": "first"}],
        queries=[{"_id": "q2", "text": "query two"}, {"_id": "q1", "text": "query one"},
                 {"_id": "q3", "text": "only zero grades"}, {"_id": "q4", "text": "not in qrels"}],
        qrels_lines=["q1\td1\t1\n", "q2\td2\t2\n", "q2\td1\t0\n", "q3\td1\t0\n"])
    es = load_eval_set(folder)
    assert es.doc_ids == ["d2", "d1"] and es.docs == ["Two second", "first"]
    assert es.query_ids == ["q2", "q1"] and es.queries == ["query two", "query one"]
    assert es.qrels == {"q2": {"d2": 2.0, "d1": 0.0}, "q1": {"d1": 1.0}}
    assert any("no relevant document" in n for n in es.notes)
    assert es.first_queries(1).query_ids == ["q2"] and es.first_queries(1).num_docs == 2


def test_beir_errors_name_the_file_and_line(tmp_path):
    folder = write_beir(tmp_path / "b", [{"_id": "d1", "text": "x"}], [{"_id": "q1", "text": "y"}],
                        ["q1\td1\t1\n", "q1\td1\n"])
    with pytest.raises(ValueError, match=r"test\.tsv:3: expected 3 tab-separated fields"):
        load_beir(folder)
    (folder / "corpus.jsonl").write_text('{"_id": "d1", "text": "x"}\n{"_id": "d2"}\n')
    with pytest.raises(ValueError, match=r"corpus\.jsonl:2: no 'text' field"):
        load_beir(folder)
    with pytest.raises(FileNotFoundError, match="dev"):
        load_beir(folder, split="dev")
    qrels_unknown_query = write_beir(tmp_path / "c", [{"_id": "d1", "text": "x"}], [{"_id": "q1", "text": "y"}],
                                     ["q9\td1\t1\n"])
    with pytest.raises(ValueError, match="not in queries.jsonl"):
        load_eval_set(qrels_unknown_query)


def test_flagembedding_jsonl_corpus_is_the_union_of_passages(tmp_path):
    path = tmp_path / "eval.jsonl"
    rows = [{"query": "q one", "pos": ["p1"], "neg": ["n1", "shared"]},
            {"query": "q two", "pos": ["shared", "p2"]}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    es = load_eval_set(path)
    assert es.docs == ["p1", "n1", "shared", "p2"]          # first appearance, duplicates merged
    assert es.query_ids == ["eval.jsonl:1", "eval.jsonl:2"]
    assert es.qrels == {"eval.jsonl:1": {"d0": 1.0}, "eval.jsonl:2": {"d2": 1.0, "d3": 1.0}}
    path.write_text(json.dumps(rows[0]) + "\n" + '{"query": "x"}\n')
    with pytest.raises(ValueError, match=r"eval\.jsonl:2: missing_pos"):
        load_eval_set(path)
    with pytest.raises(FileNotFoundError):
        load_eval_set(tmp_path / "nope")

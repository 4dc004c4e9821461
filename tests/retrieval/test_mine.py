"""m3c mine: mined negatives checked against the tiny model's own scores, computed independently
(`M3Model.encode_texts`), on a pool small enough to check by hand."""
import json

import numpy as np
import pytest

from m3composer.cli import main
from m3composer.model.inference import load_model_for_inference
from m3composer.model.m3 import M3Model
from m3composer.retrieval.mine import mine
from m3composer.retrieval.first_stage import faiss_top_k
from m3composer.retrieval.mining import pair_score
from m3composer.retrieval.search import search_top_k
from tests.ranking import assert_ranked_by

ROWS = [
    {"query": "how do I sort a list in Python", "id": 1, "prompt": "kept",
     "pos": ["Use sorted(items) for a new list."], "neg": ["The Nile is a river in Africa."]},
    {"query": "what is the capital of France", "pos_scores": [1.0], "neg_scores": [0.5, 0.2],   # old scores
     "pos": ["Paris is the capital of France."],
     "neg": ["Berlin is the capital of Germany.", "Madrid hosts the Spanish government."]},
    {"query": "how do I sort a list in Python",             # a second positive of the same query
     "pos": ["list.sort() orders a list in place."]},
    {"query": "when did the Roman empire fall",
     "pos": ["The Western Roman Empire fell in 476."],
     "neg": ["Photosynthesis turns light into sugar.", "Mount Everest is the highest mountain.",
             "how do I sort a list in Python"]},             # a passage equal to a query text
]
POOL = list(dict.fromkeys(t for r in ROWS for t in r["pos"] + r.get("neg", [])))


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return load_model_for_inference(tiny_dir)


@pytest.fixture(scope="module")
def dense_scores(tiny):
    """{line index: {pool text: score}} from encode_texts, the independent reference."""
    q = tiny.encode_texts([r["query"] for r in ROWS], return_sparse=False, return_colbert_vecs=False)["dense_vecs"]
    p = tiny.encode_texts(POOL, return_sparse=False, return_colbert_vecs=False)["dense_vecs"]
    return {i: dict(zip(POOL, (p @ q[i]).tolist())) for i in range(len(ROWS))}


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def excluded(i: int, of_query: bool = False) -> set[str]:
    same = [r for r in ROWS if r["query"] == ROWS[i]["query"]] if of_query else [ROWS[i]]
    return {t for r in same for t in r["pos"]} | {ROWS[i]["query"]}


def test_every_candidate_is_written_in_rank_order_without_positives_or_the_query(tiny, dense_scores, tmp_path):
    src = write(tmp_path / "in.jsonl", ROWS)
    summary = mine(src, tmp_path / "out.jsonl", tiny, rank_range=(1, 100), negatives=100, progress=False)
    out = read(tmp_path / "out.jsonl")
    assert summary["pool"] == len(POOL) == 10 and summary["rows"] == 4 and summary["index"] == "flat"
    old = ("neg", "pos_scores", "neg_scores")
    for i, (before, after) in enumerate(zip(ROWS, out)):
        assert {k: v for k, v in after.items() if k != "neg"} == {k: v for k, v in before.items() if k not in old}
        assert set(after["neg"]) == set(POOL) - excluded(i)          # another line's positive of the same query stays
        assert_ranked_by(after["neg"], {t: dense_scores[i][t] for t in after["neg"]})
    assert ROWS[2]["pos"][0] in out[0]["neg"]
    assert summary["rows_with_fewer_negatives"] == 4 and summary["rows_without_negatives"] == 0
    assert summary["rows_with_scores_dropped"] == 1


def test_range_picks_ranks_after_the_exclusions_and_a_rerun_gives_the_same_file(tiny, dense_scores, tmp_path):
    src = write(tmp_path / "in.jsonl", ROWS)
    mine(src, tmp_path / "a.jsonl", tiny, rank_range=(2, 3), negatives=1, seed=5, progress=False)
    mine(src, tmp_path / "b.jsonl", tiny, rank_range=(2, 3), negatives=1, seed=5, progress=False)
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    for i, row in enumerate(read(tmp_path / "a.jsonl")):
        ranked = sorted(set(POOL) - excluded(i), key=lambda t: -dense_scores[i][t])
        gaps = np.diff(sorted(dense_scores[i][t] for t in ranked[:4]))
        assert gaps.min() > 1e-4                                   # ranks 1-4 are well separated
        assert len(row["neg"]) == 1 and row["neg"][0] in ranked[1:3]


def test_exclude_positives_of_query_drops_the_same_querys_other_positives(tiny, tmp_path):
    src = write(tmp_path / "in.jsonl", ROWS)
    mine(src, tmp_path / "out.jsonl", tiny, rank_range=(1, 100), negatives=100, exclude_positives_of_query=True,
         progress=False)
    out = read(tmp_path / "out.jsonl")
    for i in range(len(ROWS)):
        assert set(out[i]["neg"]) == set(POOL) - excluded(i, of_query=True)
    assert ROWS[2]["pos"][0] not in out[0]["neg"] and ROWS[0]["pos"][0] not in out[2]["neg"]


def test_score_filters_and_rows_left_without_negatives(tiny, dense_scores, tmp_path):
    src = write(tmp_path / "in.jsonl", ROWS)
    # a ratio between two candidates' score ratios of line 1 (the only positive is line 1's)
    s_pos = dense_scores[1][ROWS[1]["pos"][0]]
    ratios = sorted(dense_scores[1][t] / s_pos for t in set(POOL) - excluded(1))
    ratio = (ratios[3] + ratios[4]) / 2
    summary = mine(src, tmp_path / "out.jsonl", tiny, rank_range=(1, 100), negatives=100, max_score_ratio=ratio,
                   with_scores=True, progress=False)
    row = read(tmp_path / "out.jsonl")[1]
    assert set(row["neg"]) == {t for t in set(POOL) - excluded(1) if dense_scores[1][t] <= ratio * s_pos}
    assert len(row["neg"]) == 4 and summary["dropped_by_score"] >= 4
    assert row["pos_scores"] == pytest.approx([s_pos], abs=1e-5)
    assert row["neg_scores"] == pytest.approx([dense_scores[1][t] for t in row["neg"]], abs=1e-5)
    # cosines are in [-1, 1]: a margin of 10 leaves nothing, and every row is still written
    summary = mine(src, tmp_path / "none.jsonl", tiny, rank_range=(1, 100), negatives=3, margin=10.0, progress=False)
    out = read(tmp_path / "none.jsonl")
    assert len(out) == 4 and all(r["neg"] == [] for r in out) and summary["rows_without_negatives"] == 4


def test_corpus_pool_and_the_command_line(tiny_dir, dense_scores, tmp_path, capsys):
    src = write(tmp_path / "in.jsonl", ROWS)
    beir = tmp_path / "beir"
    beir.mkdir()
    corpus = ["Tokyo is the capital of Japan.", "Rome was founded, legend says, in 753 BC.", "Heaps sort in place.",
              ROWS[1]["pos"][0], ROWS[1]["pos"][0]]          # a positive, twice: never a negative
    write(beir / "corpus.jsonl", [{"_id": f"d{i}", "title": "", "text": t} for i, t in enumerate(corpus)])
    rc = main(["mine", str(src), str(tmp_path / "out.jsonl"), "--model", str(tiny_dir), "--corpus", str(beir),
               "--range", "1-2", "--negatives", "5", "--max-score-ratio", "100", "--scores", "--no-progress"])
    assert rc == 0 and "[mine]" in capsys.readouterr().out
    out = read(tmp_path / "out.jsonl")
    assert all(len(r["neg"]) == 2 and set(r["neg"]) <= set(corpus) for r in out)
    assert ROWS[1]["pos"][0] not in out[1]["neg"]
    # the positives are not in the corpus: encoded on their own, same scores
    assert [r["pos_scores"] for r in out] == [pytest.approx([dense_scores[i][t] for t in r["pos"]], abs=1e-5)
                                              for i, r in enumerate(ROWS)]


def test_a_bad_line_stops_with_file_line_and_writes_nothing(tiny_dir, tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps(ROWS[0]) + "\n" + json.dumps({"query": "x", "pos": []}) + "\n")
    rc = main(["mine", str(src), str(tmp_path / "out.jsonl"), "--model", str(tiny_dir), "--no-progress"])
    assert rc == 2 and f"{src}:2:" in capsys.readouterr().err
    assert not (tmp_path / "out.jsonl").exists() and list(tmp_path.iterdir()) == [src]
    assert main(["mine", str(src), str(tmp_path / "o.jsonl"), "--model", str(tiny_dir), "--head", "colbert"]) == 2


@pytest.mark.parametrize("head", ["colbert", "ensemble"])
def test_other_heads_rank_by_their_own_pair_scores(tiny_dir, tmp_path, head):
    folder = tmp_path / "with-heads"
    M3Model.from_pretrained(tiny_dir).save_pretrained(folder)         # random heads, saved as files
    model = load_model_for_inference(folder)
    src = write(tmp_path / "in.jsonl", ROWS)
    mine(src, tmp_path / "out.jsonl", model, head=head, rank_range=(1, 100), negatives=100, with_scores=True,
         progress=False)
    encoded = model.encode_texts([r["query"] for r in ROWS] + POOL)
    items = [{k: v[i] for k, v in encoded.items()} for i in range(len(ROWS) + len(POOL))]
    for i, row in enumerate(read(tmp_path / "out.jsonl")):
        reference = {t: pair_score(items[i], items[len(ROWS) + j], head) for j, t in enumerate(POOL)}
        assert set(row["neg"]) == set(POOL) - excluded(i)
        assert row["neg_scores"] == pytest.approx([reference[t] for t in row["neg"]], abs=1e-4)
        assert_ranked_by(row["neg"], {t: reference[t] for t in row["neg"]}, tol=1e-4)


def test_faiss_flat_hnsw_and_the_exact_engine_agree_on_dense(tiny):
    rng = np.random.default_rng(0)
    pool = rng.standard_normal((300, 16)).astype(np.float32)
    queries = rng.standard_normal((20, 16)).astype(np.float32)
    flat_scores, flat = faiss_top_k(queries, pool, 10, "flat")
    reference = queries @ pool.T
    assert np.allclose(flat_scores, np.sort(reference, axis=1)[:, ::-1][:, :10], atol=1e-4)
    _, hnsw = faiss_top_k(queries, pool, 10, "hnsw")
    assert (hnsw == flat).mean() > 0.95                       # approximate, but near exact on 300 vectors
    texts = [r["query"] for r in ROWS]
    values, _ = search_top_k(tiny, texts, POOL, heads=("dense",), top_k=3, progress=False)["dense"]
    q = tiny.encode_texts(texts, return_sparse=False, return_colbert_vecs=False)["dense_vecs"]
    p = tiny.encode_texts(POOL, return_sparse=False, return_colbert_vecs=False)["dense_vecs"]
    assert np.allclose(values.numpy(), faiss_top_k(q, p, 3, "flat")[0], atol=1e-5)

"""m3c score-teacher: teacher pos_scores/neg_scores added to FlagEmbedding JSONL, ready for convert."""
import json

import numpy as np
import pytest
import torch

from m3composer.cli import main
from m3composer.data.convert import convert
from m3composer.data.index import read_index
from m3composer.model.inference import load_model_for_inference
from m3composer.retrieval.mining import colbert_match, lexical_match
from m3composer.retrieval.teacher import score_teacher

ROWS = [
    {"query": "What is the capital of France?", "id": 7, "type": "qa",
     "pos": ["Paris is the capital and largest city of France."],
     "neg": ["Photosynthesis converts light into chemical energy in green plants.",
             "The stock market fell sharply on Monday after the earnings reports."]},
    {"query": "How do I sort a list in Python?",
     "pos": ["Use sorted(my_list) for a new list, or my_list.sort() to sort in place.",
             "list.sort() orders the items of a Python list in place."],
     "neg": ["Mount Everest is the highest mountain above sea level."],
     "pos_scores": [0.0, 0.0], "neg_scores": [9.0]},       # old scores are replaced
]


@pytest.fixture(scope="module")
def e5_model(e5_dir):
    return load_model_for_inference(e5_dir)


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def read_rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_dense_teacher_scores_keep_order_and_fields_and_rank_the_obvious_positive_first(e5_model, tmp_path):
    src = write_rows(tmp_path / "in.jsonl", ROWS)
    summary = score_teacher(src, tmp_path / "out.jsonl", e5_model, progress=False)
    assert summary["rows"] == 2 and summary["passages"] == 6
    assert summary["query_instruction"] == "query: " and summary["passage_instruction"] == "passage: "
    out = read_rows(tmp_path / "out.jsonl")
    for before, after in zip(ROWS, out):
        assert {k: v for k, v in after.items() if not k.endswith("_scores")} == \
               {k: v for k, v in before.items() if not k.endswith("_scores")}
        assert len(after["pos_scores"]) == len(before["pos"]) and len(after["neg_scores"]) == len(before["neg"])
        assert min(after["pos_scores"]) > max(after["neg_scores"])
        assert all(-1.0 <= s <= 1.0 for s in after["pos_scores"] + after["neg_scores"])   # cosine scale
    # the score is the inner product of the e5 vectors with e5's prefixes, in pos-then-neg order
    q = e5_model.encode_texts(ROWS[0]["query"], instruction="query: ")["dense_vecs"]
    p = e5_model.encode_texts(ROWS[0]["pos"] + ROWS[0]["neg"], instruction="passage: ")["dense_vecs"]
    assert out[0]["pos_scores"] + out[0]["neg_scores"] == pytest.approx((p @ q).tolist(), abs=1e-5)


def test_scale_multiplies_and_the_output_converts_to_a_stream_with_scores(e5_model, e5_dir, tmp_path):
    src = write_rows(tmp_path / "in.jsonl", ROWS)
    score_teacher(src, tmp_path / "raw.jsonl", e5_model, progress=False, rows_per_chunk=1)
    score_teacher(src, tmp_path / "x50.jsonl", e5_model, progress=False, scale=50.0)
    raw, scaled = read_rows(tmp_path / "raw.jsonl"), read_rows(tmp_path / "x50.jsonl")
    for a, b in zip(raw, scaled):
        assert b["pos_scores"] == pytest.approx([50 * s for s in a["pos_scores"]], rel=1e-4)
    task = tmp_path / "train" / "qa"
    task.mkdir(parents=True)
    (tmp_path / "x50.jsonl").rename(task / "qa.jsonl")
    convert([tmp_path / "train"], tmp_path / "mds", e5_dir, progress=False)
    streams = read_index(tmp_path / "mds")["streams"]
    assert len(streams) == 1 and streams[0]["has_teacher_scores"] is True and streams[0]["rows"] == 2


def test_ensemble_scores_combine_the_three_heads(tiny_dir, tmp_path):
    torch.manual_seed(0)
    model = load_model_for_inference(tiny_dir)          # fresh heads are fine for checking the arithmetic
    src = write_rows(tmp_path / "in.jsonl", ROWS)
    score_teacher(src, tmp_path / "dense.jsonl", model, score="dense", progress=False)
    score_teacher(src, tmp_path / "ens.jsonl", model, score="ensemble", progress=False)
    score_teacher(src, tmp_path / "ens_dense_only.jsonl", model, score="ensemble", weights=(1, 0, 0), progress=False)
    dense, ens, ens_dense = (read_rows(tmp_path / f) for f in ("dense.jsonl", "ens.jsonl", "ens_dense_only.jsonl"))
    # by hand for the first row: 0.4·dense + 0.2·lexical + 0.4·colbert
    q = model.encode_texts(ROWS[0]["query"], max_length=64)
    p = model.encode_texts(ROWS[0]["pos"][0])
    lexical = sum(w * p["lexical_weights"][t] for t, w in q["lexical_weights"].items() if t in p["lexical_weights"])
    colbert = (q["colbert_vecs"] @ p["colbert_vecs"].T).max(axis=1).mean()
    expected = 0.4 * float(q["dense_vecs"] @ p["dense_vecs"]) + 0.2 * lexical + 0.4 * colbert
    assert ens[0]["pos_scores"][0] == pytest.approx(expected, rel=1e-5)
    for d, e in zip(dense, ens_dense):
        assert d["pos_scores"] + d["neg_scores"] == pytest.approx(e["pos_scores"] + e["neg_scores"], abs=1e-6)


def test_lexical_and_colbert_match_by_hand():
    assert lexical_match({"5": 0.5, "7": 2.0}, {"7": 0.25, "9": 1.0}) == 0.5       # only token 7 is shared
    q = np.array([[1.0, 0.0], [0.0, 1.0]])
    p = np.array([[0.6, 0.8], [-1.0, 0.0]])
    assert colbert_match(q, p) == pytest.approx((0.6 + 0.8) / 2)


def test_bad_lines_stop_with_file_and_line_and_leave_no_output(e5_model, tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps(ROWS[0]) + "\n" + '{"query": "q", "pos": []}\n')
    with pytest.raises(ValueError, match=r"in\.jsonl:2: bad_pos"):
        score_teacher(src, tmp_path / "out.jsonl", e5_model, progress=False)
    assert list(tmp_path.iterdir()) == [src]                 # no output, no temp file left


def test_cli_scores_with_dense_and_refuses_ensemble_without_heads(e5_dir, tmp_path, capsys):
    src = write_rows(tmp_path / "in.jsonl", ROWS[:1])
    assert main(["score-teacher", str(src), str(tmp_path / "out.jsonl"), "--model", str(e5_dir),
                 "--no-progress", "--no-instructions"]) == 0
    assert "1 rows, 3 passages scored" in capsys.readouterr().out
    assert len(read_rows(tmp_path / "out.jsonl")[0]["neg_scores"]) == 2
    assert main(["score-teacher", str(src), str(tmp_path / "o2.jsonl"), "--model", str(e5_dir),
                 "--score", "ensemble"]) == 2
    assert "use --score dense" in capsys.readouterr().err

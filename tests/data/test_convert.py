"""m3composer/data/convert/: JSONL -> one MDS stream per task x bucket, bad input, atomic output.

The word-level test tokenizer (conftest) gives every word one token, so a text of n words is
n + 2 ids (`<s>` ... `</s>`) and word `w` has id 4 + WORDS.index(w): expected ids and lengths
below are computed from the input text, not from the converter.
"""
from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest

from tests.data.conftest import CONVERTED_LAYOUT, WORDS, make_row, words, write_jsonl
from m3composer.data.convert import COLUMNS, REJECTS_FILE, ConvertError, convert, discover_inputs
from m3composer.data.index import INDEX_FILE, read_index

WORD_ID = {w: 4 + i for i, w in enumerate(WORDS)}


def expected_ids(text: str) -> list[int]:
    return [0] + [WORD_ID[w] for w in text.split()] + [2]


def read_stream(folder: Path) -> list[dict]:
    """All rows of one stream, read the way training reads them (StreamingDataset, own cache)."""
    import tempfile

    from streaming import StreamingDataset

    from m3composer.data.streaming_internals import open_releasing_shared_memory

    cache = tempfile.mkdtemp(prefix="cache-", dir=folder.parent.parent.parent)
    ds = open_releasing_shared_memory(lambda: StreamingDataset(remote=str(folder), local=cache, shuffle=False,
                                                               batch_size=1))
    return [ds[i] for i in range(len(ds))]


def read_all(out: Path) -> dict[str, list[dict]]:
    index = read_index(out)
    return {s["name"]: read_stream(out / s["path"]) for s in index["streams"]}


def split_passages(row: dict) -> tuple[list[list[int]], list[list[int]]]:
    offsets = row["passage_offsets"].tolist()
    passages = [row["passages"][a:b].tolist() for a, b in zip(offsets, offsets[1:])]
    return passages[: row["num_pos"]], passages[row["num_pos"]:]


def source_line(root: Path, source: str) -> dict:
    rel, line = source.rsplit(":", 1)
    return json.loads((root.parent / rel).read_text().splitlines()[int(line) - 1])


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(out.name + "."))


# ------------------------------------------------------------------------------ streams and index

def test_one_stream_per_task_and_bucket_with_index_facts(converted_dir):
    index = read_index(converted_dir)
    streams = {s["name"]: s for s in index["streams"]}
    assert set(streams) == {"qa/len-0-500", "qa/len-500-1000", "kd/len-0-500", "verses/len-0-500"}
    assert index["rows"] == sum(spec["rows"] for spec in CONVERTED_LAYOUT.values()) == 92
    assert index["tokenizer_vocab_size"] == len(WORDS) + 5
    for rel, spec in CONVERTED_LAYOUT.items():
        task = "verses" if "verses" in rel else rel.split("/")[0]
        bucket = "len-0-500" if "len-0-500" in rel else "len-500-1000"
        s = streams[f"{task}/{bucket}"]
        assert (converted_dir / s["path"] / "index.json").is_file()
        assert s["rows"] == spec["rows"]
        assert s["is_parallel"] == ("parallel_" in rel)
        assert s["has_teacher_scores"] == spec["scores"]
        assert s["min_neg"] == s["max_neg"] == spec["n_neg"]
        assert s["max_group_size_without_repeats"] == spec["n_neg"] + 1
        passages = spec["rows"] * (1 + spec["n_neg"])
        assert s["tokens"]["passages"] == passages
        assert s["tokens"]["passage_tokens"] == passages * (spec["passage_words"] + 2)
        assert s["tokens"]["query_len_max"] == 6 + 2  # make_row's 6-word queries
        assert s["tokens"]["row_len_max"] == spec["passage_words"] + 2
        assert s["sources"] == [f"train/{rel}"]


def test_rows_round_trip_ids_scores_row_id_and_source(converted_dir, converted_source):
    files = sorted(str(p.resolve()) for p in converted_source.rglob("*.jsonl"))
    for name, rows in read_all(converted_dir).items():
        assert {c: type(rows[0][c]) for c in COLUMNS}  # every column is present
        for row in rows:
            original = source_line(converted_source, row["source"])
            rel, line = row["source"].rsplit(":", 1)
            assert row["query"].dtype == np.int32 and row["passages"].dtype == np.int32
            assert row["query"].tolist() == expected_ids(original["query"])
            pos, neg = split_passages(row)
            assert pos == [expected_ids(t) for t in original["pos"]]
            assert neg == [expected_ids(t) for t in original["neg"]]
            if "pos_scores" in original:
                want = original["pos_scores"] + original["neg_scores"]
                assert row["scores"].tolist() == pytest.approx(want, abs=1e-6)
            else:
                assert len(row["scores"]) == len(pos) + len(neg) and np.isnan(row["scores"]).all()
            file_index = files.index(str((converted_source.parent / rel).resolve()))
            assert row["row_id"] == (file_index << 32) | int(line)


def test_a_file_without_len_tag_is_bucketed_by_measured_length(tmp_path, word_tokenizer_dir):
    rng = random.Random(0)
    # longest text in words -> tokens: 497 -> 499 [0,500); 498 -> 500 [500,1000); 1200 -> 1202 [1000,2000)
    longest = [10, 497, 498, 1200, 30]
    rows = [{"query": words(rng, 3), "pos": [words(rng, n)], "neg": [words(rng, 5)]} for n in longest]
    rows.append({"query": words(rng, 7990), "pos": ["alpha"]})  # the query decides: 7992 -> len-7000-inf
    write_jsonl(tmp_path / "in" / "mixed.jsonl", rows)
    summary = convert(tmp_path / "in", tmp_path / "out", word_tokenizer_dir, progress=False)
    streams = {s["name"]: s for s in summary.streams}
    assert {n: s["rows"] for n, s in streams.items()} == {
        "mixed/len-0-500": 3, "mixed/len-500-1000": 1, "mixed/len-1000-2000": 1, "mixed/len-7000-inf": 1}
    assert streams["mixed/len-7000-inf"]["bucket_hi"] is None
    assert all(s["bucket_from"] == "measured" for s in summary.streams)
    assert streams["mixed/len-0-500"]["tokens"]["row_len_max"] == 499
    lines = sorted(int(r["source"].rsplit(":", 1)[1]) for r in read_stream(tmp_path / "out/mixed/len-0-500"))
    assert lines == [1, 2, 5]

    # configurable edges
    summary = convert(tmp_path / "in", tmp_path / "out2", word_tokenizer_dir, bucket_edges=(0, 100), progress=False)
    assert {s["name"]: s["rows"] for s in summary.streams} == {"mixed/len-0-100": 2, "mixed/len-100-inf": 4}
    with pytest.raises(ValueError, match="bucket_edges"):
        convert(tmp_path / "in", tmp_path / "out3", word_tokenizer_dir, bucket_edges=(10, 100))


def test_named_bucket_is_trusted_and_rows_outside_it_are_counted(tmp_path, word_tokenizer_dir):
    rng = random.Random(1)
    write_jsonl(tmp_path / "in/t_len-0-500.jsonl", [make_row(rng, passage_words=600), make_row(rng)])
    summary = convert(tmp_path / "in", tmp_path / "out", word_tokenizer_dir, progress=False)
    (stream,) = summary.streams
    assert (stream["name"], stream["rows"], stream["rows_outside_bucket"]) == ("t/len-0-500", 2, 1)
    assert any("t/len-0-500" in w for w in summary.warnings)


def test_task_names_buckets_and_parallel_flag(tmp_path):
    for rel in ["a/train_len-0-500.jsonl", "b/train_len-0-500.jsonl", "c/len-0-500.jsonl",
                "c/len-7000-inf.jsonl.gz", "parallel_x/verses.jsonl", "d/my parallel_pairs.json",
                "e/notes.txt", "e/qa-len-500-1000.jsonl"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("")
    got = {f.source_name: (f.task, f.bucket.name if f.bucket else None, f.is_parallel)
           for f in discover_inputs([tmp_path])}
    root = tmp_path.name
    assert got == {
        f"{root}/a/train_len-0-500.jsonl": ("a__train", "len-0-500", False),
        f"{root}/b/train_len-0-500.jsonl": ("b__train", "len-0-500", False),
        f"{root}/c/len-0-500.jsonl": ("c", "len-0-500", False),
        f"{root}/c/len-7000-inf.jsonl.gz": ("c", "len-7000-inf", False),
        f"{root}/parallel_x/verses.jsonl": ("verses", None, True),
        f"{root}/d/my parallel_pairs.json": ("my_parallel_pairs", None, True),
        f"{root}/e/qa-len-500-1000.jsonl": ("qa", "len-500-1000", False),
    }
    # file_index follows sorted path order; a file given twice is read once
    inputs = discover_inputs([tmp_path / "c/len-0-500.jsonl", tmp_path / "a", tmp_path / "c/len-0-500.jsonl"])
    assert [(f.source_name, f.file_index) for f in inputs] == [("a/train_len-0-500.jsonl", 0), ("len-0-500.jsonl", 1)]
    with pytest.raises(FileNotFoundError, match="nope"):
        discover_inputs([tmp_path / "nope"])


def test_tokenizer_batching_and_dedup_do_not_change_rows(tmp_path, word_tokenizer_dir):
    rng = random.Random(2)
    shared_neg = words(rng, 9)
    rows = [make_row(rng, n_neg=2) for _ in range(7)]
    for row in rows:
        row["neg"].append(shared_neg)
        row["pos"].append(row["query"])  # a text repeated inside one row
    write_jsonl(tmp_path / "in/t.jsonl", rows)
    outs = []
    for batch_rows in (1, 3, 1000):
        out = tmp_path / f"out{batch_rows}"
        convert(tmp_path / "in", out, word_tokenizer_dir, batch_rows=batch_rows, progress=False)
        outs.append([{k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in r.items()
                      if k != "scores"} for r in read_stream(out / "t/len-0-500")])
    assert outs[0] == outs[1] == outs[2]
    assert len(outs[0]) == 7 and all(split_passages({**r, "passages": np.array(r["passages"]),
                                                     "passage_offsets": np.array(r["passage_offsets"])})[1][-1]
                                     == expected_ids(shared_neg) for r in outs[0])


def test_real_xlmr_tokenizer_ids_match_the_tokenizer(tmp_path, e5_dir, tokenizer):
    rows = [{"query": "Wie installiere ich Pakete?", "pos": ["Mit apt-get install paket."],
             "neg": ["東京は日本の首都です。", "Le chat dort sur le canapé."]},
            {"query": "what is a list comprehension", "pos": ["A concise way to build lists."]}]
    write_jsonl(tmp_path / "in/multi_len-0-500.jsonl", rows)
    convert(tmp_path / "in", tmp_path / "out", e5_dir, progress=False)
    got = read_stream(tmp_path / "out/multi/len-0-500")
    for row, original in zip(got, rows):
        assert row["query"].tolist() == tokenizer(original["query"])["input_ids"]
        pos, neg = split_passages(row)
        assert pos + neg == [tokenizer(t)["input_ids"] for t in original["pos"] + original.get("neg", [])]
    assert read_index(tmp_path / "out")["tokenizer_vocab_size"] == 250002


# ------------------------------------------------------------------------------------ bad input

def bad_input_corpus(root: Path) -> tuple[dict[str, list[tuple[int, str]]], dict[str, list[int]], int]:
    """Files with valid lines and defects. Returns (file -> [(line, reason)], file -> valid lines, total lines)."""
    rng = random.Random(3)
    good = lambda **kw: make_row(rng, **kw)  # noqa: E731
    a = [
        good(),                                                     # 1
        b'{"query": "q", "pos": ["p"]',                             # 2 invalid_json
        good(extra_field={"nested": [1, 2]}, prompt="x"),           # 3 (extra fields are fine)
        b"[1, 2, 3]",                                               # 4 not_object
        {"pos": ["p"], "neg": ["n"]},                               # 5 missing_query
        {"query": "", "pos": ["p"]},                                # 6 empty_query
        {"query": "q", "pos": "not a list"},                        # 7 bad_pos
        {"query": "q", "pos": ["p"], "neg": {"n": 1}},              # 8 bad_neg
        b'{"query": "caf\xe9", "pos": ["p"]}',                      # 9 non_utf8
        b"   \t ",                                                  # 10 blank_line
        b'{"query": "q", "pos": ["' + b"x" * 3000 + b'"]}',         # 11 line_too_long
        {"query": 12, "pos": ["p"]},                                # 12 bad_query
        {"query": "q", "neg": ["n"]},                               # 13 missing_pos
        good(),                                                     # 14
        b"",                                                        # 15 blank_line (empty)
        good(n_neg=0),                                              # 16 (no negatives is valid)
    ]
    a_bad = [(2, "invalid_json"), (4, "not_object"), (5, "missing_query"), (6, "empty_query"), (7, "bad_pos"),
             (8, "bad_neg"), (9, "non_utf8"), (10, "blank_line"), (11, "line_too_long"), (12, "bad_query"),
             (13, "missing_pos"), (15, "blank_line")]
    kd = [
        good(scores=True),                                                                  # 1 decides: scores
        {"query": "q", "pos": ["p"], "neg": ["n"], "pos_scores": [0.5]},                   # 2 scores_without_partner
        {"query": "q", "pos": ["p"], "neg": ["n"], "pos_scores": ["hi"], "neg_scores": [1]},  # 3 bad_scores_type
        {"query": "q", "pos": ["p"], "neg": ["n", "m"], "pos_scores": [1], "neg_scores": [1]},  # 4 bad_scores_length
        b'{"query": "q", "pos": ["p"], "neg": ["n"], "pos_scores": [NaN], "neg_scores": [0]}',  # 5 nonfinite_score
        good(),                                                                             # 6 no scores: valid
        good(scores=True),                                                                  # 7
        good(n_neg=1),                                                                      # 8 no scores: valid
    ]
    kd_bad = [(2, "scores_without_partner"), (3, "bad_scores_type"), (4, "bad_scores_length"),
              (5, "nonfinite_score")]
    write_jsonl(root / "a_len-0-500.jsonl", a)
    write_jsonl(root / "kd_len-0-500.jsonl.gz", kd, gz=True)
    (root / "empty_len-0-500.jsonl").write_bytes(b"")
    bad = {"a_len-0-500.jsonl": a_bad, "kd_len-0-500.jsonl.gz": kd_bad}
    valid = {"a_len-0-500.jsonl": [1, 3, 14, 16], "kd_len-0-500.jsonl.gz": [1, 6, 7, 8]}
    return bad, valid, len(a) + len(kd)


def test_bad_input_corpus_skip_reports_every_defect_and_keeps_every_valid_line(tmp_path, word_tokenizer_dir):
    bad, valid, total = bad_input_corpus(tmp_path / "corpus")
    kinds = {reason for defects in bad.values() for _, reason in defects}
    assert len(kinds) >= 12
    out = tmp_path / "out"
    summary = convert(tmp_path / "corpus", out, word_tokenizer_dir, on_error="skip", max_line_bytes=2048,
                      progress=False)

    rejects = [json.loads(line) for line in (out / REJECTS_FILE).read_text().splitlines()]
    got = sorted((r["file"], r["line"], r["reason"]) for r in rejects)
    want = sorted((f"corpus/{name}", line, reason) for name, defects in bad.items() for line, reason in defects)
    assert got == want
    assert all(len(r["text"]) <= 200 and r["detail"] for r in rejects)

    kept = sorted(r["source"] for rows in read_all(out).values() for r in rows)
    assert kept == sorted(f"corpus/{name}:{line}" for name, lines in valid.items() for line in lines)

    streams = {s["name"]: s for s in summary.streams}
    # the empty file makes no stream; kd's scored and unscored rows become two streams
    assert set(streams) == {"a/len-0-500", "kd/len-0-500", "kd/len-0-500.scored"}
    assert (streams["a/len-0-500"]["min_neg"], streams["a/len-0-500"]["max_neg"]) == (0, 3)  # line 16 has none
    assert streams["a/len-0-500"]["max_group_size_without_repeats"] == 1
    assert streams["kd/len-0-500.scored"]["has_teacher_scores"] and not streams["kd/len-0-500"]["has_teacher_scores"]
    assert not streams["a/len-0-500"]["has_teacher_scores"]
    assert (streams["kd/len-0-500.scored"]["rows"], streams["kd/len-0-500"]["rows"]) == (2, 2)
    assert (streams["kd/len-0-500"]["min_neg"], streams["kd/len-0-500"]["max_neg"]) == (1, 3)

    n_bad = sum(len(d) for d in bad.values())
    assert (summary.lines, summary.rows_kept, summary.rows_rejected) == (total, total - n_bad, n_bad)
    assert summary.rows_kept + summary.rows_rejected == summary.lines
    assert summary.rejected_by_reason == {k: sum(r == k for d in bad.values() for _, r in d) for k in kinds}
    assert summary.empty_files == ["corpus/empty_len-0-500.jsonl"]
    assert summary.rejects_path == str(out / REJECTS_FILE)
    assert "corpus/empty_len-0-500.jsonl: empty file" in summary.warnings
    table = summary.table()
    assert "rows rejected  16" in table and "invalid_json" in table and "a_len-0-500" not in table
    assert summary.notes == ["kd/len-0-500: 2 row(s) with teacher scores and 2 without, kept as two streams, "
                             "kd/len-0-500.scored and kd/len-0-500 (a batch never mixes them)"]
    assert "note: kd/len-0-500: 2 row(s) with teacher scores" in table


def test_bad_input_fail_mode_writes_nothing_and_names_file_and_line(tmp_path, word_tokenizer_dir):
    bad, _, total = bad_input_corpus(tmp_path / "corpus")
    out = tmp_path / "out"
    with pytest.raises(ConvertError) as info:
        convert(tmp_path / "corpus", out, word_tokenizer_dir, max_line_bytes=2048, progress=False)
    n_bad = sum(len(d) for d in bad.values())
    assert len(info.value.errors) == n_bad
    message = str(info.value)
    assert message.startswith(f"{n_bad} bad line(s) of {total} ")
    assert "corpus/a_len-0-500.jsonl:2: invalid_json" in message
    assert "corpus/kd_len-0-500.jsonl.gz:5: nonfinite_score" in message
    assert not out.exists() and leftovers(out) == []


def test_many_defects_are_listed_up_to_a_limit_with_the_total(tmp_path, word_tokenizer_dir):
    write_jsonl(tmp_path / "in/t.jsonl", ["not json"] * 30)
    with pytest.raises(ConvertError, match=r"(?s)30 bad line\(s\) of 30 .*:20: invalid_json.*and 10 more$") as info:
        convert(tmp_path / "in", tmp_path / "out", word_tokenizer_dir, progress=False)
    assert str(info.value).count("invalid_json") == 21  # the counts line + 20 listed


# ------------------------------------------------------------------------------- atomic output

def test_interrupted_conversion_leaves_no_output(tmp_path, word_tokenizer_dir, monkeypatch, converted_source):
    from m3composer.data.convert import writer as convert_module

    calls = {"n": 0}
    real_write = convert_module.Converter._write

    def flaky_write(self, inp, rows, ids):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("simulated interruption")
        return real_write(self, inp, rows, ids)

    monkeypatch.setattr(convert_module.Converter, "_write", flaky_write)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        convert(converted_source, out, word_tokenizer_dir, batch_rows=5, progress=False)
    assert calls["n"] == 3 and not out.exists() and leftovers(out) == []


def test_refuses_to_overwrite_unless_asked(tmp_path, word_tokenizer_dir):
    rng = random.Random(4)
    write_jsonl(tmp_path / "in/t.jsonl", [make_row(rng) for _ in range(3)])
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        convert(tmp_path / "in", out, word_tokenizer_dir, progress=False)
    assert (out / "keep.txt").read_text() == "mine"
    convert(tmp_path / "in", out, word_tokenizer_dir, overwrite=True, progress=False)
    assert sorted(p.name for p in out.iterdir()) == [INDEX_FILE, "t"]
    assert leftovers(out) == []


def test_cli_convert(tmp_path, word_tokenizer_dir, capsys):
    from m3composer.cli import main

    rng = random.Random(5)
    write_jsonl(tmp_path / "in/t_len-0-500.jsonl", [make_row(rng) for _ in range(4)] + ["{broken"])
    args = ["convert", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--tokenizer", str(word_tokenizer_dir),
            "--no-progress"]
    assert main(args) == 1
    assert "in/t_len-0-500.jsonl:5: invalid_json" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert main(args + ["--on-error", "skip", "--bucket-edges", "0,100"]) == 0
    printed = capsys.readouterr().out
    assert "rows kept      4" in printed and "invalid_json" in printed and "t/len-0-500" in printed
    assert read_index(tmp_path / "out")["streams"][0]["rows"] == 4
    assert math.isnan(read_stream(tmp_path / "out/t/len-0-500")[0]["scores"][0])

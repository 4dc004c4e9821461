"""m3composer/data/rows.py: one JSONL line -> Row or RowError(reason), and how lines are counted."""
from __future__ import annotations

import gzip
import json

import pytest

from m3composer.data.rows import REASONS, Row, RowError, iter_lines, parse_line


def parse(obj_or_bytes, max_line_bytes=1 << 20):
    raw = obj_or_bytes if isinstance(obj_or_bytes, bytes) else json.dumps(obj_or_bytes).encode()
    return parse_line(raw, path="f.jsonl", line_no=7, max_line_bytes=max_line_bytes)


GOOD = {"query": "q", "pos": ["p1", "p2"], "neg": ["n1"]}


def test_valid_row_keeps_fields_and_ignores_extra_ones():
    row = parse({**GOOD, "prompt": "x", "type": "normal", "id": 3, "batch_size": 8})
    assert isinstance(row, Row)
    assert (row.query, row.pos, row.neg, row.pos_scores, row.neg_scores) == ("q", ["p1", "p2"], ["n1"], None, None)
    assert (row.path, row.line_no, row.has_teacher_scores) == ("f.jsonl", 7, False)


def test_missing_or_empty_neg_is_a_valid_row_without_negatives():
    assert parse({"query": "q", "pos": ["p"]}).neg == []
    assert parse({"query": "q", "pos": ["p"], "neg": []}).neg == []


def test_scores_are_floats_and_ints_are_accepted():
    row = parse({**GOOD, "pos_scores": [1, 0.5], "neg_scores": [0]})
    assert row.has_teacher_scores and row.pos_scores == [1.0, 0.5] and row.neg_scores == [0.0]
    assert all(isinstance(s, float) for s in row.pos_scores + row.neg_scores)


def test_pos_scores_alone_are_fine_when_there_are_no_negatives():
    row = parse({"query": "q", "pos": ["p"], "pos_scores": [0.9]})
    assert row.has_teacher_scores and row.neg_scores == []


@pytest.mark.parametrize("line, reason", [
    (b"x" * 101, "line_too_long"),
    (b'{"query": "caf\xe9", "pos": ["p"]}', "non_utf8"),
    (b"", "blank_line"),
    (b" \t  ", "blank_line"),
    (b'{"query": "q", "pos": ["p"]', "invalid_json"),
    (b"[1, 2]", "not_object"),
    (b'"just a string"', "not_object"),
    ({"pos": ["p"], "neg": []}, "missing_query"),
    ({"query": 5, "pos": ["p"]}, "bad_query"),
    ({"query": "   ", "pos": ["p"]}, "empty_query"),
    ({"query": "q", "neg": ["n"]}, "missing_pos"),
    ({"query": "q", "pos": "p"}, "bad_pos"),
    ({"query": "q", "pos": []}, "bad_pos"),
    ({"query": "q", "pos": ["p", 3]}, "bad_pos"),
    ({"query": "q", "pos": [""]}, "bad_pos"),
    ({"query": "q", "pos": ["p"], "neg": "n"}, "bad_neg"),
    ({"query": "q", "pos": ["p"], "neg": [None]}, "bad_neg"),
    ({"query": "q", "pos": ["p"], "neg": ["n"], "pos_scores": [1.0]}, "scores_without_partner"),
    ({"query": "q", "pos": ["p"], "neg": ["n"], "neg_scores": [1.0]}, "scores_without_partner"),
    ({"query": "q", "pos": ["p"], "neg": ["n"], "pos_scores": 1.0, "neg_scores": [1.0]}, "bad_scores_type"),
    ({"query": "q", "pos": ["p"], "neg": ["n"], "pos_scores": ["0.5"], "neg_scores": [1.0]}, "bad_scores_type"),
    ({"query": "q", "pos": ["p"], "neg": ["n"], "pos_scores": [True], "neg_scores": [1.0]}, "bad_scores_type"),
    ({"query": "q", "pos": ["p"], "neg": ["n"], "pos_scores": [None], "neg_scores": [1.0]}, "bad_scores_type"),
    ({"query": "q", "pos": ["p"], "neg": ["n", "m"], "pos_scores": [1.0], "neg_scores": [1.0]},
     "bad_scores_length"),
    ({"query": "q", "pos": ["p"], "neg": ["n"], "pos_scores": [1.0, 2.0], "neg_scores": [1.0]},
     "bad_scores_length"),
    (b'{"query": "q", "pos": ["p"], "neg": ["n"], "pos_scores": [NaN], "neg_scores": [1]}', "nonfinite_score"),
    (b'{"query": "q", "pos": ["p"], "neg": ["n"], "pos_scores": [1], "neg_scores": [-Infinity]}',
     "nonfinite_score"),
    (b'{"query": "q", "pos": ["p"], "neg": ["n"], "pos_scores": [1e999], "neg_scores": [1]}', "nonfinite_score"),
])
def test_each_defect_gets_its_reason(line, reason):
    result = parse(line, max_line_bytes=100)
    assert isinstance(result, RowError), result
    assert result.reason == reason, str(result)
    assert reason in REASONS
    assert (result.path, result.line_no) == ("f.jsonl", 7)
    assert str(result).startswith(f"f.jsonl:7: {reason}: ")


def test_size_limit_is_inclusive_and_excerpt_is_capped():
    body = json.dumps({"query": "q" * 300, "pos": ["p"]}).encode()
    assert isinstance(parse(body, max_line_bytes=len(body)), Row)
    err = parse(body, max_line_bytes=len(body) - 1)
    assert err.reason == "line_too_long"
    assert len(err.excerpt) == 200 and err.excerpt == body[:200].decode()
    assert err.to_json() == {"file": "f.jsonl", "line": 7, "reason": "line_too_long",
                             "detail": err.detail, "text": err.excerpt}


def test_row_ranges_read_the_same_lines_with_the_files_line_numbers(tmp_path):
    body = b"one\n\ntwo\r\n" + b"x" * 50 + b"\nlast"
    path = tmp_path / "f.jsonl"
    path.write_bytes(body)
    whole = _lines(path, max_line_bytes=10)
    cut = body.index(b"two")                      # a line start: lines 1-2 before it, 3-5 from it
    first = _lines(path, max_line_bytes=10, end=cut)
    rest = _lines(path, max_line_bytes=10, start=cut, first_line=3)
    assert first + rest == whole and [n for n, _ in rest] == [3, 4, 5]
    with pytest.raises(ValueError, match="byte range"):
        list(iter_lines(tmp_path / "f.jsonl.gz", start=5))


def _lines(path, **kw):
    return [(n, raw) for n, raw, _ in iter_lines(path, **kw)]


def test_line_counting_trailing_newline_crlf_and_blank_lines(tmp_path):
    f = tmp_path / "a.jsonl"
    f.write_bytes(b'{"a": 1}\r\n\n  \n{"b": 2}\n')
    assert _lines(f) == [(1, b'{"a": 1}'), (2, b""), (3, b"  "), (4, b'{"b": 2}')]
    f.write_bytes(b'{"a": 1}\n{"b": 2}')  # no final newline: still two lines
    assert _lines(f) == [(1, b'{"a": 1}'), (2, b'{"b": 2}')]
    f.write_bytes(b"")
    assert _lines(f) == []
    f.write_bytes(b"\n")  # one empty line
    assert _lines(f) == [(1, b"")]


def test_gzip_input_and_offsets_reach_the_compressed_size(tmp_path):
    f = tmp_path / "a.jsonl.gz"
    f.write_bytes(gzip.compress(b"".join(b'{"i": %d}\n' % i for i in range(500))))
    got = list(iter_lines(f))
    assert [n for n, _, _ in got] == list(range(1, 501))
    assert got[42][1] == b'{"i": 42}'
    assert got[-1][2] == f.stat().st_size


def test_overlong_line_is_cut_but_following_lines_stay_aligned(tmp_path):
    f = tmp_path / "a.jsonl"
    f.write_bytes(b"A" * 5000 + b"\n" + b"short\n" + b"B" * 11 + b"\n")
    got = _lines(f, max_line_bytes=10)
    assert got == [(1, b"A" * 11), (2, b"short"), (3, b"B" * 11)]
    assert [parse_line(raw, path="a", line_no=n, max_line_bytes=10).reason for n, raw in got] == [
        "line_too_long", "invalid_json", "line_too_long"]

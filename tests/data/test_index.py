"""m3_index.json (data/index.py): one StreamEntry written by the converter and read by the dataset,
the same on both sides; an index of format version 1 still reads."""
import json

import pytest

from m3composer.data.index import INDEX_FILE, INDEX_VERSION, StreamEntry, TokenStats, read_streams


def test_an_entry_reads_back_what_was_written():
    entry = StreamEntry(name="qa/len-0-500", path="qa/len-0-500", task="qa", bucket="len-0-500", rows=7,
                        is_parallel=False, has_teacher_scores=True, bucket_hi=500, min_neg=2, max_neg=5,
                        tokens=TokenStats(query_len_max=12, passage_len_max=300), sources=["a.jsonl"])
    written = entry.to_json()
    assert written["max_group_size_without_repeats"] == 3
    assert StreamEntry.from_json(json.loads(json.dumps(written))) == entry


def test_the_converters_index_is_what_the_dataset_reads(converted_dir):
    index, streams = read_streams(converted_dir)
    assert index["version"] == INDEX_VERSION and [s.to_json() for s in streams] == index["streams"]
    assert all(s.rows > 0 and s.query_len_max for s in streams)


def test_a_version_1_index_reads_with_its_old_field_names(tmp_path):
    old = {"name": "parallel_x/len-0-500", "path": "parallel_x/len-0-500", "task": "parallel_x",
           "bucket": "len-0-500", "rows": 3, "parallel": True, "has_scores": False, "min_neg": 0}
    (tmp_path / INDEX_FILE).write_text(json.dumps({"version": 1, "streams": [old]}))
    _, (stream,) = read_streams(tmp_path)
    assert stream.is_parallel and not stream.has_teacher_scores and stream.rows == 3


def test_a_missing_field_or_an_unknown_version_names_the_file(tmp_path):
    (tmp_path / INDEX_FILE).write_text(json.dumps({"version": 2, "streams": [{"name": "a/b", "path": "a/b"}]}))
    with pytest.raises(ValueError, match=r"m3_index.json: stream entry 'a/b' lacks"):
        read_streams(tmp_path)
    (tmp_path / INDEX_FILE).write_text(json.dumps({"version": 9, "streams": []}))
    with pytest.raises(ValueError, match="m3_index.json: expected version"):
        read_streams(tmp_path)

"""Object-store output of m3composer/data/convert/ (publish.py, partitions.py), against a moto S3 server on 127.0.0.1.

Convert straight to s3://, read the index back, stream every row back with Streaming (explicit
local cache per stream), and check that the index is uploaded last and that a failed or
interrupted conversion uploads nothing.
"""
from __future__ import annotations

import numpy as np
import pytest

from m3composer.data.convert import ConvertError, convert
from m3composer.data.index import INDEX_FILE, read_index


def keys(s3, prefix: str) -> list[str]:
    pages = s3["client"].get_paginator("list_objects_v2").paginate(Bucket=s3["bucket"], Prefix=prefix)
    return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))


def rows_by_source(remote_or_local: str, stream: dict, cache) -> dict[str, dict]:
    from streaming import Stream, StreamingDataset

    from m3composer.data.streaming_internals import open_releasing_shared_memory

    ds = open_releasing_shared_memory(lambda: StreamingDataset(
        streams=[Stream(remote=f"{remote_or_local}/{stream['path']}", local=str(cache))], shuffle=False, batch_size=1))
    rows = [ds[i] for i in range(len(ds))]
    return {r["source"]: r for r in rows}


def test_s3_round_trip(s3_server, converted_source, converted_dir, word_tokenizer_dir, tmp_path, monkeypatch):
    from streaming.base.storage.upload import S3Uploader

    monkeypatch.chdir(tmp_path)
    uploaded = []
    real_upload = S3Uploader.upload_file

    def recording_upload(self, filename):
        uploaded.append(filename)
        return real_upload(self, filename)

    monkeypatch.setattr(S3Uploader, "upload_file", recording_upload)
    staging = tmp_path / "staging"
    staging.mkdir()
    remote = f"s3://{s3_server['bucket']}/round-trip/mds"
    summary = convert([converted_source], remote, word_tokenizer_dir, local_cache=staging, progress=False)

    local_index = read_index(converted_dir)
    index = read_index(remote, local_cache=tmp_path)
    assert index == local_index  # same input, same tokenizer -> the same index, wherever it lives
    assert summary.rows_kept == index["rows"] == 92
    assert uploaded[-1] == INDEX_FILE and uploaded.count(INDEX_FILE) == 1
    stored = keys(s3_server, "round-trip/mds/")
    assert stored == sorted(f"round-trip/mds/{f}" for f in uploaded)
    for stream in index["streams"]:
        assert f"round-trip/mds/{stream['path']}/index.json" in stored
    assert list(staging.iterdir()) == []  # staging removed after the upload

    for stream in index["streams"]:
        from_s3 = rows_by_source(remote, stream, tmp_path / "cache" / stream["path"].replace("/", "__"))
        from_disk = rows_by_source(str(converted_dir), stream, tmp_path / "cache-local" / stream["path"].replace("/", "__"))
        assert len(from_s3) == stream["rows"] and from_s3.keys() == from_disk.keys()
        for source, row in from_s3.items():
            for column, value in row.items():
                if isinstance(value, np.ndarray):
                    np.testing.assert_array_equal(value, from_disk[source][column])
                else:
                    assert value == from_disk[source][column]


def test_s3_refuses_a_used_prefix_and_overwrites_on_request(s3_server, word_tokenizer_dir, tmp_path, monkeypatch):
    from tests.data.conftest import make_row, write_jsonl
    import random

    monkeypatch.chdir(tmp_path)
    rng = random.Random(0)
    write_jsonl(tmp_path / "in/t_len-0-500.jsonl", [make_row(rng) for _ in range(3)])
    write_jsonl(tmp_path / "in2/u_len-0-500.jsonl", [make_row(rng) for _ in range(5)])
    remote = f"s3://{s3_server['bucket']}/reuse"
    convert(tmp_path / "in", remote, word_tokenizer_dir, local_cache=tmp_path, progress=False)
    with pytest.raises(FileExistsError, match="not empty"):
        convert(tmp_path / "in2", remote, word_tokenizer_dir, local_cache=tmp_path, progress=False)
    assert [s["name"] for s in read_index(remote, tmp_path)["streams"]] == ["t/len-0-500"]
    # a replacement that fails leaves the old dataset readable
    write_jsonl(tmp_path / "bad/v_len-0-500.jsonl", ["{oops"])
    with pytest.raises(ConvertError):
        convert(tmp_path / "bad", remote, word_tokenizer_dir, local_cache=tmp_path, overwrite=True, progress=False)
    assert [s["name"] for s in read_index(remote, tmp_path)["streams"]] == ["t/len-0-500"]
    convert(tmp_path / "in2", remote, word_tokenizer_dir, local_cache=tmp_path, overwrite=True, progress=False)
    assert [(s["name"], s["rows"]) for s in read_index(remote, tmp_path)["streams"]] == [("u/len-0-500", 5)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad", "in", "in2"]  # no staging or index copies left


def test_s3_failed_or_interrupted_conversion_uploads_nothing(s3_server, converted_source, word_tokenizer_dir,
                                                             tmp_path, monkeypatch):
    from tests.data.conftest import write_jsonl
    from m3composer.data.convert import writer as convert_module

    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "bad/t.jsonl", ['{"query": "q", "pos": ["alpha"]}', "{oops"])
    with pytest.raises(ConvertError, match="bad/t.jsonl:2: invalid_json"):
        convert(tmp_path / "bad", f"s3://{s3_server['bucket']}/failed", word_tokenizer_dir,
                local_cache=tmp_path, progress=False)
    assert keys(s3_server, "failed/") == []

    def broken_write(self, inp, rows, ids):
        raise KeyboardInterrupt("simulated interruption")

    monkeypatch.setattr(convert_module.Converter, "_write", broken_write)
    with pytest.raises(KeyboardInterrupt):
        convert(converted_source, f"s3://{s3_server['bucket']}/interrupted", word_tokenizer_dir,
                local_cache=tmp_path, progress=False)
    assert keys(s3_server, "interrupted/") == []
    with pytest.raises(FileNotFoundError, match="m3_index.json"):
        read_index(f"s3://{s3_server['bucket']}/interrupted", tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad"]  # no staging left behind

"""m3composer/data/convert/ beyond one process: files mixing scored and unscored rows (no valid row
lost), `--workers N` (the same dataset as one worker), and partitions written apart by any engine
(`write_partition`) merged into one dataset (`merge_partitions`, `m3c convert --merge`).

Datasets are compared the way training reads them: every stream's rows in order, every column.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from tests.data.conftest import make_row, write_jsonl
from m3composer.data.convert import (PARTS_DIR, REJECTS_FILE, ConvertError, convert, discover_inputs, merge_partitions,
                                     plan_units, write_partition)
from m3composer.data.convert.inputs import _line_ranges
from m3composer.data.dataset import M3TrainDataset
from m3composer.data.index import read_index
from m3composer.data.rows import iter_lines
from m3composer.testing.settings import dataset_settings


def read_rows(out: Path) -> dict[str, list[dict]]:
    """Every stream's rows in order, as plain lists (StreamingDataset, the reader training uses)."""
    import tempfile

    from streaming import StreamingDataset

    from m3composer.data.streaming_internals import open_releasing_shared_memory

    got = {}
    for s in read_index(out)["streams"]:
        ds = open_releasing_shared_memory(lambda: StreamingDataset(
            remote=str(out / s["path"]), local=tempfile.mkdtemp(prefix="m3c-test-read-"), shuffle=False, batch_size=1))
        got[s["name"]] = [{k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in ds[i].items()}
                          for i in range(len(ds))]
    return got


def same_nan(rows: dict[str, list[dict]]) -> dict:
    """NaN != NaN: compare scores as strings."""
    return {name: [{**r, "scores": [repr(x) for x in r["scores"]]} for r in rs] for name, rs in rows.items()}


def mixed_file(path: Path, rng: random.Random, n: int = 30, bad_every: int = 7) -> tuple[set[int], set[int], list[int]]:
    """Valid rows with and without teacher scores, interleaved, and bad lines.
    Returns (scored lines, unscored lines, bad lines), 1-based."""
    rows, scored, plain, bad = [], set(), set(), []
    for line in range(1, n + 1):
        if line % bad_every == 0:
            rows.append(b'{"query": "q", "pos": ["p"], "neg": ["n"], "pos_scores": [1]}' if line % 2 else b"{not json")
            bad.append(line)
        elif rng.random() < 0.5:
            rows.append(make_row(rng, scores=True, n_neg=2))
            scored.add(line)
        else:
            rows.append(make_row(rng, n_neg=rng.choice([1, 2])))
            plain.add(line)
    write_jsonl(path, rows)
    return scored, plain, bad


def test_a_file_mixing_scored_and_unscored_rows_keeps_every_valid_row_and_trains_on_them(tmp_path, word_tokenizer_dir):
    scored, plain, bad = mixed_file(tmp_path / "in/kd_len-0-500.jsonl", random.Random(7))
    assert scored and plain and bad
    with pytest.raises(ConvertError) as info:          # default fail: only the bad lines are errors
        convert(tmp_path / "in", tmp_path / "refused", word_tokenizer_dir, progress=False)
    assert [(e.line_no, e.reason) for e in info.value.errors] == [
        (n, "scores_without_partner" if n % 2 else "invalid_json") for n in bad]

    out = tmp_path / "out"
    summary = convert(tmp_path / "in", out, word_tokenizer_dir, on_error="skip", progress=False)
    rejects = [json.loads(x) for x in (out / REJECTS_FILE).read_text().splitlines()]
    assert [(r["file"], r["line"]) for r in rejects] == [("in/kd_len-0-500.jsonl", n) for n in bad]
    streams = {s["name"]: s for s in summary.streams}
    assert {n: (s["rows"], s["has_teacher_scores"], s["path"]) for n, s in streams.items()} == {
        "kd/len-0-500": (len(plain), False, "kd/len-0-500"),
        "kd/len-0-500.scored": (len(scored), True, "kd/len-0-500.scored")}
    assert summary.rows_kept == len(scored) + len(plain) and summary.rows_rejected == len(bad)
    assert "kept as two streams" in summary.table()
    rows = read_rows(out)
    for name, lines in (("kd/len-0-500.scored", scored), ("kd/len-0-500", plain)):
        assert [int(r["source"].rsplit(":", 1)[1]) for r in rows[name]] == sorted(lines)
        assert all(np.isfinite(r["scores"]).all() == (name.endswith("scored")) for r in rows[name])
    kd_rows = {r["row_id"] for r in rows["kd/len-0-500.scored"]}

    # training: each stream is its own group, so a batch is all-KD or all-plain; every row is served
    ds = M3TrainDataset(str(out), **dataset_settings(train_group_size=2, default_batch_size=3, query_max_len=16,
                                                     passage_max_len=32))
    assert sorted(g.name for g in ds.groups) == sorted(streams)
    seen = []
    for batch in ds:
        ids = set(batch["row_ids"].tolist())
        assert bool(batch["has_teacher_scores"]) == (ids <= kd_rows) and (ids <= kd_rows or not ids & kd_rows)
        if bool(batch["has_teacher_scores"]):
            assert torch_finite(batch["teacher_scores"])
        seen += batch["row_ids"].tolist()
    assert len(seen) == len(set(seen)) == len(scored) + len(plain) - sum(ds.left_out(0).values())


def torch_finite(t) -> bool:
    import torch

    return bool(torch.isfinite(t).all())


def test_row_ranges_start_at_line_starts_with_the_files_line_numbers(tmp_path):
    path = tmp_path / "f.jsonl"
    rng = random.Random(3)
    path.write_bytes(b"".join(b"x" * rng.choice([0, 1, 5, 40, 300]) + b"\n" for _ in range(200)) + b"no newline")
    for split in (1, 64, 500, 10_000):
        ranges = _line_ranges(path, split, chunk=97)      # a chunk smaller than lines: boundaries across reads
        assert ranges[0][:1] == (0,) and ranges[-1][1] == path.stat().st_size
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        got = [line for a, b, first in ranges for line in iter_lines(path, start=a, end=b, first_line=first)]
        assert [(n, raw) for n, raw, _ in got] == [(n, raw) for n, raw, _ in iter_lines(path)]
    inputs = discover_inputs([path])
    assert len(plan_units(inputs, 64)) > 10 and len(plan_units(inputs, None)) == 1


def parallel_corpus(root: Path) -> None:
    rng = random.Random(11)
    mixed_file(root / "big.jsonl", rng, n=120, bad_every=13)                  # no len tag: measured buckets
    with (root / "big.jsonl").open("ab") as fh:                              # some long rows: a second bucket
        for _ in range(5):
            fh.write((json.dumps(make_row(rng, passage_words=600)) + "\n").encode())
    write_jsonl(root / "kd_len-0-500.jsonl.gz", [make_row(rng, scores=True) for _ in range(9)], gz=True)
    write_jsonl(root / "parallel_en-de/pairs.jsonl", [make_row(rng, n_neg=1) for _ in range(15)] + ["[]"])
    (root / "empty.jsonl").write_bytes(b"")


def test_workers_write_the_same_dataset_as_one_worker(tmp_path, word_tokenizer_dir):
    parallel_corpus(tmp_path / "in")
    one = convert(tmp_path / "in", tmp_path / "one", word_tokenizer_dir, on_error="skip", progress=False)
    two = convert(tmp_path / "in", tmp_path / "two", word_tokenizer_dir, on_error="skip", progress=False,
                  workers=2, split_bytes=4096)
    assert two.partitions > 6                         # big.jsonl was cut into row ranges
    assert list((tmp_path / "two/big/len-0-500").glob("part-*/index.json"))
    assert read_index(tmp_path / "two") == read_index(tmp_path / "one")
    assert same_nan(read_rows(tmp_path / "two")) == same_nan(read_rows(tmp_path / "one"))
    assert (tmp_path / "two" / REJECTS_FILE).read_bytes() == (tmp_path / "one" / REJECTS_FILE).read_bytes()
    for field in ("files", "lines", "rows_kept", "rows_rejected", "rejected_by_reason", "tokens", "empty_files",
                  "warnings", "notes"):
        assert getattr(two, field) == getattr(one, field), field
    assert one.notes and one.empty_files == ["in/empty.jsonl"] and "in/parallel_en-de/pairs.jsonl:16" in (
        tmp_path / "one" / REJECTS_FILE).read_text().replace('"file": "', "").replace('", "line": ', ":")

    # fail mode: the same errors, with their file:line, and nothing written
    with pytest.raises(ConvertError) as single:
        convert(tmp_path / "in", tmp_path / "f1", word_tokenizer_dir, progress=False)
    with pytest.raises(ConvertError) as parallel:
        convert(tmp_path / "in", tmp_path / "f2", word_tokenizer_dir, progress=False, workers=2, split_bytes=4096)
    assert parallel.value.errors == single.value.errors and str(parallel.value) == str(single.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "one", "two"]


def test_partitions_written_apart_merge_into_the_dataset_of_one_conversion(tmp_path, word_tokenizer_dir, capsys):
    from m3composer.cli import main

    scored, plain, bad = mixed_file(tmp_path / "in/t.jsonl", random.Random(5), n=40, bad_every=11)
    single = tmp_path / "single"
    convert(tmp_path / "in/t.jsonl", single, word_tokenizer_dir, on_error="skip", progress=False)

    # three partitions as an engine would hand them over: text lines, bytes, DataFrame-like dicts
    lines = (tmp_path / "in/t.jsonl").read_text().splitlines()
    chunks = [(1, lines[:13]), (14, [x.encode() for x in lines[13:27]]), (28, lines[27:])]
    out = tmp_path / "merged"
    columns = ("query", "pos", "neg", "pos_scores", "neg_scores")
    for pid, (first, chunk) in enumerate(chunks):
        if pid == 2:   # a DataFrame has every column in every row: None where the JSON had none
            chunk = [{c: json.loads(x).get(c) for c in columns} if x.startswith("{\"query") else x for x in chunk]
        kw = dict(task="t", source="t.jsonl", file_index=0, first_line=first)
        record = write_partition(chunk, out, pid, word_tokenizer_dir, **kw)
        assert record["lines"] == len(chunk)
    write_partition(chunks[1][1], out, 1, word_tokenizer_dir, task="t", source="t.jsonl", file_index=0,
                    first_line=14)   # a retried partition replaces its first attempt
    assert not (out / "m3_index.json").exists()     # not a dataset before the merge

    with pytest.raises(ConvertError, match=r"t\.jsonl:11: "):
        merge_partitions(out)
    assert main(["convert", "--merge", "--out", str(out), "--on-error", "skip", "--tokenizer",
                 str(word_tokenizer_dir)]) == 0
    assert "3 partition(s) merged" in capsys.readouterr().out
    want, got = read_index(single), read_index(out)
    assert got["rows"] == want["rows"] == len(scored) + len(plain)
    assert got == want                                   # ids, sources, statistics, tokenizer facts
    assert same_nan(read_rows(out)) == same_nan(read_rows(single))
    assert [json.loads(x)["line"] for x in (out / REJECTS_FILE).read_text().splitlines()] == bad
    assert sorted(p.name for p in (out / PARTS_DIR).iterdir()) == ["part-00000.json", "part-00001.json",
                                                                   "part-00002.json"]

    ds = M3TrainDataset(str(out), **dataset_settings(train_group_size=2, default_batch_size=4, query_max_len=16,
                                                     passage_max_len=32))
    served = [r for b in ds for r in b["row_ids"].tolist()]
    assert len(served) == len(set(served)) == got["rows"] - sum(ds.left_out(0).values())


def test_workers_and_partitions_on_s3(tmp_path, word_tokenizer_dir, s3_server):
    scored, plain, _ = mixed_file(tmp_path / "in/t.jsonl", random.Random(9), n=24, bad_every=100)
    bucket = s3_server["bucket"]
    local = tmp_path / "local"
    convert(tmp_path / "in", local, word_tokenizer_dir, progress=False)
    # --workers to s3: staged, merged, uploaded with the index last, as one worker does
    convert(tmp_path / "in", f"s3://{bucket}/workers", word_tokenizer_dir, progress=False, workers=2,
            split_bytes=1500, local_cache=tmp_path)
    assert read_index(f"s3://{bucket}/workers", local_cache=tmp_path) == read_index(local)

    # partitions uploaded by the writers, merged on the store
    lines = (tmp_path / "in/t.jsonl").read_text().splitlines()
    remote = f"s3://{bucket}/parts"
    for pid, (first, chunk) in enumerate([(1, lines[:10]), (11, lines[10:])]):
        write_partition(chunk, remote, pid, word_tokenizer_dir, task="t", source="t.jsonl", file_index=0,
                        first_line=first, local_cache=tmp_path)
    merge_partitions(remote, local_cache=tmp_path)
    got = read_index(remote, local_cache=tmp_path)
    assert [(s["name"], s["rows"], s["tokens"]) for s in got["streams"]] == [
        (s["name"], s["rows"], s["tokens"]) for s in read_index(local)["streams"]]
    ds = M3TrainDataset(remote, local_cache=str(tmp_path / "cache"), **dataset_settings(
        train_group_size=2, default_batch_size=4, query_max_len=16, passage_max_len=32))
    served = [r for b in ds for r in b["row_ids"].tolist()]
    assert len(served) == len(set(served)) == len(scored) + len(plain) - sum(ds.left_out(0).values())

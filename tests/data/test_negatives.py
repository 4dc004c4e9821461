"""m3composer/data/negatives.py: the training data's own pool, stored versions, and the dataset
serving mined negatives from their epoch on (teacher scores dropped), recorded in its state."""
from __future__ import annotations

import json

import numpy as np
import pytest

from m3composer.data.collate import row_passages
from m3composer.data.dataset import M3TrainDataset
from m3composer.data.negatives import (MinedNegatives, build_pool, read_version, version_dir, with_negatives,
                                       write_pool, write_version)
from tests.data.m3_tiny_data import StreamSpec, write_converted
from m3composer.testing.settings import dataset_settings

SPECS = [
    StreamSpec("t1", "len-0-500", 8, first_row_id=0, num_neg=3, has_teacher_scores=True),
    StreamSpec("t2", "len-0-500", 6, first_row_id=1000, num_neg=[2, 0, 2, 0, 2, 2]),
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_converted(tmp_path_factory.mktemp("negatives") / "mds", SPECS)


def make(data, negatives_dir=None, **kw):
    return M3TrainDataset(str(data), negatives_dir=negatives_dir, **dataset_settings(
        train_group_size=3, default_batch_size=2, seed=3, query_max_len=16, passage_max_len=16, **kw))


def pool_of(dataset):
    return build_pool(dataset.stream_rows(s) for s in range(len(dataset.streams)))


def test_the_pool_is_each_streams_passages_once_and_excludes_a_rows_own_positives(tiny):
    ds = make(tiny)
    pool = pool_of(ds)
    # t1: 8 rows x (2 pos + 3 neg), all distinct; t2: 6 x 2 pos + 8 neg
    assert pool.stream_offsets.tolist() == [0, 40, 40 + 12 + 8]
    assert len({p.tobytes() for p in pool.passages}) == len(pool.passages)
    assert pool.row_ids.tolist() == list(range(8)) + list(range(1000, 1006))
    for r, row in enumerate(ds.stream_rows(0)):
        positives, _ = row_passages(row)
        assert [pool.passages[i].tolist() for i in pool.positives[r]] == [p.tolist() for p in positives]
        assert pool.excluded[r] == set(pool.positives[r].tolist())


def _chosen(pool, negatives=2):
    """A deterministic choice of other rows' positives of the same stream (what a refresh might pick)."""
    chosen = np.full((len(pool.row_ids), negatives), -1, dtype=np.int64)
    for r in range(len(pool.row_ids)):
        lo, hi = pool.stream_range(int(pool.row_streams[r]))
        others = [i for i in range(lo, hi) if i not in pool.excluded[r]]
        chosen[r, :min(negatives, len(others))] = others[:negatives]
    chosen[3] = -1                    # a row left without candidates keeps its own negatives
    return chosen


def test_a_written_version_reads_back_and_damage_is_refused(tiny, tmp_path):
    pool = pool_of(make(tiny))
    chosen = _chosen(pool)
    sha = write_pool(tmp_path, pool)
    meta = write_version(tmp_path, 1, pool.row_ids, chosen, sha, {"from_epoch": 1})
    got = read_version(tmp_path, 1)
    assert got.sha256 == meta["sha256"] and got.meta["rows"] == len(pool.row_ids)
    for r, row_id in enumerate(pool.row_ids):
        want = [pool.passages[i].tolist() for i in chosen[r] if i >= 0]
        assert [n.tolist() for n in got.negatives_of(int(row_id))] == want
    index = json.loads((tmp_path / "index.json").read_text())
    assert [v["version"] for v in index["versions"]] == [1]
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary folder left behind"
    # the same version written again replaces its index entry; a damaged array is refused
    write_version(tmp_path, 1, pool.row_ids, chosen, sha, {"from_epoch": 1})
    assert [v["version"] for v in json.loads((tmp_path / "index.json").read_text())["versions"]] == [1]
    np.save(version_dir(tmp_path, 1) / "pool_ids.npy", np.zeros_like(got.pool_ids))
    with pytest.raises(ValueError, match=r"v1: arrays do not match the sha256"):
        read_version(tmp_path, 1)
    with pytest.raises(ValueError, match=r"v2: cannot read mined negatives v2"):
        read_version(tmp_path, 2)


def test_the_dataset_serves_them_from_their_epoch_without_teacher_scores_and_records_the_version(tiny, tmp_path):
    ds = make(tiny, negatives_dir=tmp_path)
    pool = pool_of(ds)
    chosen = _chosen(pool)
    write_version(tmp_path, 1, pool.row_ids, chosen, write_pool(tmp_path, pool), {})
    before = {e: [ds.batch(e, s) for s in range(len(ds))] for e in (0, 1)}
    ds.mined_negatives.use(1, from_epoch=1)
    mined_of = {int(r): {pool.passages[i].tobytes() for i in chosen[k] if i >= 0} for k, r in enumerate(pool.row_ids)}
    for epoch in (0, 1):
        for step in range(len(ds)):
            batch = ds.batch(epoch, step)
            if epoch == 0:                          # before from_epoch: unchanged, scores still served
                assert all(np.array_equal(batch[k], before[0][step][k]) for k in batch)
                continue
            assert not bool(batch["has_teacher_scores"])
            for b, row_id in enumerate(batch["row_ids"].tolist()):
                rows = slice(b * 3 + 1, (b + 1) * 3)
                drawn = [ids[mask.bool()].numpy().astype(np.int32).tobytes()
                         for ids, mask in zip(batch["passage_input_ids"][rows], batch["passage_attention_mask"][rows])]
                if row_id == 3:                     # no mined candidate: its own negatives (ids 0, 12, ...)
                    assert all(np.frombuffer(d, np.int32)[1] == 12 for d in drawn)
                else:
                    assert set(drawn) <= mined_of[row_id], row_id
    assert any(bool(b["has_teacher_scores"]) for b in before[1])      # the t1 stream had them before
    state = ds.state_dict(0)
    assert state["negatives"] == {"version": 1, "from_epoch": 1, "sha256": ds.mined_negatives.current.sha256}

    resumed = make(tiny, negatives_dir=tmp_path)
    resumed.load_state_dict(state)
    assert resumed.mined_negatives.state_dict() == state["negatives"]
    for step in range(len(ds)):
        a, b = resumed.batch(1, step), ds.batch(1, step)
        assert all(np.array_equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match=r"v1 requested, but this dataset has no negatives folder"):
        make(tiny).load_state_dict(state)
    with pytest.raises(ValueError, match=r"differs from the .* recorded in the checkpoint"):
        make(tiny, negatives_dir=tmp_path).load_state_dict(dict(state, negatives=dict(state["negatives"], sha256="0")))


def test_with_negatives_keeps_the_positives_and_clears_the_scores(tiny):
    row = next(make(tiny).stream_rows(0))
    positives, _ = row_passages(row)
    new = [np.array([0, 99, 2], dtype=np.int32)]
    out = with_negatives(row, new)
    pos, neg = row_passages(out)
    assert [p.tolist() for p in pos] == [p.tolist() for p in positives] and [n.tolist() for n in neg] == [[0, 99, 2]]
    assert out["row_id"] == row["row_id"] and np.isnan(out["scores"]).all() and len(out["scores"]) == 3
    assert MinedNegatives(None).apply(row, 5) is row

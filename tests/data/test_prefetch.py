"""m3composer/data/prefetch.py and M3TrainDataset's prefetch / cache_limit: the same batches with
prefetch on or off (local data with a cache, a moto S3 store, DataLoader workers), downloads ahead
of the step, clean shutdown, a cache that stays under its limit with evicted shards downloaded
again correctly, and clear errors for a limit that cannot work."""
from __future__ import annotations

import gc
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from m3composer.data.dataset import M3TrainDataset
from m3composer.data.prefetch import ShardPrefetcher, shard_is_local
from m3composer.testing.disk import bytes_under
from tests.data.m3_tiny_data import StreamSpec, write_converted
from m3composer.testing.settings import dataset_settings

# 2 rows per shard (1 KiB shards): 90 shards, a step of 6 rows reads up to 6 of them
SPECS = [StreamSpec("t1", "len-0-500", 120, first_row_id=0),
         StreamSpec("t2", "len-0-500", 60, first_row_id=5000, num_neg=[0, 2] * 30)]


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> Path:
    return write_converted(tmp_path_factory.mktemp("sharded") / "mds", SPECS, size_limit=1 << 10)


def make(data, cache, **kw):
    args = dict(train_group_size=4, default_batch_size=6, seed=3, query_max_len=16, passage_max_len=16,
                world_size=1, rank=0, local_cache=str(cache))
    args.update(kw)
    return M3TrainDataset(str(data), **dataset_settings(**args))


def batches(ds_or_loader, epochs=(0,), ds=None):
    out = []
    for epoch in epochs:
        (ds or ds_or_loader).set_epoch(epoch)
        out += [{k: v.clone() for k, v in b.items()} for b in ds_or_loader]
    return out


def assert_same(a, b):
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            torch.testing.assert_close(x[k], y[k], rtol=0, atol=0)


def prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("m3c-prefetch")]


def test_prefetch_serves_the_same_batches_local_remote_and_workers(sharded, tmp_path, s3_server):
    off = batches(make(sharded, tmp_path / "off", prefetch_steps=0), epochs=(0, 1))
    on = make(sharded, tmp_path / "on", prefetch_steps=3, prefetch_workers=2)
    assert_same(batches(on, epochs=(0, 1)), off)
    workers = make(sharded, tmp_path / "workers", prefetch_steps=2, prefetch_workers=2)
    epoch1 = off[len(on):]
    assert_same(batches(DataLoader(workers, batch_size=None, num_workers=2), epochs=(1,), ds=workers), epoch1)

    client, bucket = s3_server["client"], s3_server["bucket"]
    for path in sharded.rglob("*"):
        if path.is_file() and not path.name.endswith(".mds"):
            client.upload_file(str(path), bucket, f"prefetch/{path.relative_to(sharded)}")
    remote = make(f"s3://{bucket}/prefetch", tmp_path / "remote", prefetch_steps=3, prefetch_workers=3)
    assert_same(batches(remote, epochs=(1,)), epoch1)
    assert not prefetch_threads()


def test_prefetcher_downloads_the_window_ahead_and_shuts_down(sharded, tmp_path):
    ds = make(sharded, tmp_path / "cache", prefetch_steps=0)
    plan = ds.plan(0)
    shards = [ds._shards_of_rows(s.group, s.rank_rows(0)) for s in plan.steps]
    window = set(np.concatenate(shards[:3]).tolist())
    later = set(np.concatenate(shards[3:]).tolist()) - window
    with ShardPrefetcher(ds._sd, shards, lookahead=2, workers=2) as prefetcher:
        prefetcher.before_step(0)          # returns once step 0's shards are in; steps 1, 2 keep going
        assert all(shard_is_local(ds._sd, s) for s in shards[0])
        deadline = time.monotonic() + 30
        while not all(shard_is_local(ds._sd, s) for s in window) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert all(shard_is_local(ds._sd, s) for s in window)       # steps 0, 1, 2: downloaded
        assert later and not any(shard_is_local(ds._sd, s) for s in later)
    assert prefetcher.downloads == len(window)

    # a reader that stops mid-epoch (the loader drops its iterator) leaves no thread behind
    on = make(sharded, tmp_path / "stopped", prefetch_steps=4)
    it = iter(on)
    next(it)
    assert prefetch_threads()
    del it
    gc.collect()
    assert not prefetch_threads()


def test_cache_stays_under_its_limit_and_evicted_shards_come_back(sharded, tmp_path):
    unbounded = make(sharded, tmp_path / "unbounded", prefetch_steps=0)
    expected = batches(unbounded, epochs=(0, 1))
    index_bytes = sum(s.get_index_size() for s in unbounded._sd.streams)
    shard_bytes = int(unbounded._shard_bytes.sum())
    limit = index_bytes + shard_bytes // 3
    cache = tmp_path / "bounded"
    ds = make(sharded, cache, prefetch_steps=3, prefetch_workers=3, cache_limit=limit)
    sd, peak, seen = ds._sd, 0, []
    for epoch in (0, 1):
        ds.set_epoch(epoch)
        for b in ds:
            seen.append({k: v.clone() for k, v in b.items()})
            peak = max(peak, bytes_under(cache), sd.cache_usage)   # tolerates files renamed or evicted meanwhile
    assert_same(seen, expected)         # every shard evicted in epoch 0 and read again in epoch 1 came back right
    assert 0 < peak <= limit
    local = [s for s in range(sd.num_shards) if shard_is_local(sd, s)]
    assert len(local) < sd.num_shards   # shards were evicted along the way

    # an evicted shard needed by the next step is downloaded again, with the same rows
    first = ds._shards_of_rows(ds.plan(0).steps[0].group, ds.plan(0).steps[0].rank_rows(0))
    for shard in first:
        sd.evict_shard(int(shard))
    assert not any(shard_is_local(sd, s) for s in first)
    ds.set_epoch(0)
    assert_same([next(iter(ds))], expected[:1])


def test_a_limit_that_cannot_work_is_a_clear_error(sharded, tmp_path):
    probe = make(sharded, tmp_path / "probe", prefetch_steps=0)
    index_bytes = sum(s.get_index_size() for s in probe._sd.streams)
    biggest = int(probe._shard_bytes.max())
    with pytest.raises(ValueError, match=r"data.cache_limit=.* cannot hold one step: epoch 0 step \d+ .* reads"):
        make(sharded, tmp_path / "step", cache_limit=index_bytes + 4 * biggest + 1)       # Streaming's minimum
    with pytest.raises(ValueError, match="data.cache_limit=.* is too low"):
        make(sharded, tmp_path / "low", cache_limit=index_bytes)   # not even the indexes fit
    with pytest.raises(ValueError, match="cache_limit needs a local_cache"):
        make(sharded, None, local_cache=None, cache_limit="10mb")

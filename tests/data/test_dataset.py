"""m3composer/data/dataset.py: per-rank batches from one group per step, batch sizes, re-drawn
negatives, workers, state dict, loud failures on a broken store, and the real converter's output."""
from __future__ import annotations

import collections
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from tests.data.m3_tiny_data import StreamSpec, write_converted
from m3composer.data.dataset import M3TrainDataset
from m3composer.testing.settings import dataset_settings

SPECS = [
    StreamSpec("t1", "len-0-500", 23, first_row_id=0, num_neg=6),
    StreamSpec("t1", "len-500-1000", 10, first_row_id=1000, bucket_hi=1000),
    StreamSpec("parallel_t2", "len-0-500", 14, first_row_id=2000, has_teacher_scores=True),
]
TABLE = {"len-0-500": {4: 3}, "len-500-1000": {4: 2}}
STREAM_OF = {0: "t1/len-0-500", 1: "t1/len-500-1000", 2: "parallel_t2/len-0-500"}   # row_id // 1000


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_converted(tmp_path_factory.mktemp("tiny") / "mds", SPECS)


def make(data, **kw):
    args = dict(train_group_size=4, default_batch_size=2, batch_size_table=TABLE, seed=5, query_max_len=16,
                passage_max_len=16)
    args.update(kw)
    return M3TrainDataset(str(data), **dataset_settings(**args))


def streams_of(batch):
    return {STREAM_OF[int(r) // 1000] for r in batch["row_ids"]}


def test_each_step_one_stream_on_both_ranks_with_table_batch_sizes(tiny):
    ranks = [make(tiny, world_size=2, rank=r) for r in (0, 1)]
    assert ranks[0].per_device_batch_sizes == {"t1/len-0-500": 3, "t1/len-500-1000": 2, "parallel_t2/len-0-500": 3}
    # 23 rows / 6 -> 3 full + tail 5 (>= 4: 2 per rank); 10 / 4 -> 2 + tail 2 (< 4: out); 14 / 6 -> 2 + tail 2 (out)
    assert len(ranks[0]) == 4 + 2 + 2
    for epoch in (0, 1):
        for ds in ranks:
            ds.set_epoch(epoch)
        seen = []
        for b0, b1 in zip(*ranks, strict=True):
            (s0,), (s1,) = streams_of(b0), streams_of(b1)
            assert s0 == s1
            full = ranks[0].per_device_batch_sizes[s0]
            assert b0["row_ids"].shape == b1["row_ids"].shape and b0["row_ids"].shape[0] in (full, 2)
            assert b0["passage_input_ids"].shape[0] == 4 * b0["row_ids"].shape[0]
            assert bool(b0["is_parallel"]) == bool(b1["is_parallel"]) == s0.startswith("parallel_")
            assert bool(b0["has_teacher_scores"]) == (s0 == "parallel_t2/len-0-500")
            seen += b0["row_ids"].tolist() + b1["row_ids"].tolist()
        assert len(seen) == len(set(seen)) == 47 - 1 - 2 - 2       # rows minus what the tail rule leaves out
        assert ranks[0].left_out(epoch) == {"t1/len-0-500": 1, "t1/len-500-1000": 2, "parallel_t2/len-0-500": 2}


def test_order_and_membership_differ_between_epochs(tiny):
    ds = make(tiny)
    epochs = []
    for epoch in (0, 1):
        ds.set_epoch(epoch)
        epochs.append([tuple(b["row_ids"].tolist()) for b in ds])
    assert epochs[0] != epochs[1]
    assert len(set(epochs[0]) & set(epochs[1])) <= 1
    ds.set_epoch(0)
    assert [tuple(b["row_ids"].tolist()) for b in ds] == epochs[0]     # deterministic


def test_flagembedding_tables_for_group_size_8_and_1(tmp_path):
    data = write_converted(tmp_path / "mds", [StreamSpec("a", "len-0-500", 100, num_neg=3),
                                              StreamSpec("a", "len-500-1000", 70, first_row_id=1000, bucket_hi=1000),
                                              StreamSpec("a", "len-9-10", 5, first_row_id=2000, bucket_hi=10)])
    # recipe.md §Batch sizes: G=8 -> 48 / 32, G=1 -> 700 / 570, other G or unknown bucket -> default_batch_size
    g8 = M3TrainDataset(str(data), **dataset_settings(train_group_size=8, default_batch_size=4))
    assert g8.per_device_batch_sizes == {"a/len-0-500": 48, "a/len-500-1000": 32, "a/len-9-10": 4}
    sizes = collections.Counter(b["row_ids"].shape[0] for b in g8)
    # W = 1: 100 -> 48, 48, tail 4 (>= 2 kept); 70 -> 32, 32, tail 6; 5 -> 4, tail 1 (< 2 left out)
    assert sizes == {48: 2, 32: 2, 4: 2, 6: 1}
    g1 = M3TrainDataset(str(data), **dataset_settings(train_group_size=1, default_batch_size=4))
    assert g1.per_device_batch_sizes == {"a/len-0-500": 700, "a/len-500-1000": 570, "a/len-9-10": 4}
    g4 = M3TrainDataset(str(data), **dataset_settings(train_group_size=4, default_batch_size=5))
    assert set(g4.per_device_batch_sizes.values()) == {5}
    assert all(b["passage_input_ids"].shape[0] == 8 * b["row_ids"].shape[0] for b in g8)


def test_token_budget_bounds_every_padded_batch(tmp_path):
    data = write_converted(tmp_path / "mds", [StreamSpec("a", "len-0-500", 40, passage_len=6),
                                              StreamSpec("b", "len-0-500", 40, first_row_id=1000, passage_len=20)])
    budget = 200
    ds = M3TrainDataset(str(data), **dataset_settings(train_group_size=4, max_tokens_per_device_batch=budget,
                                                      query_max_len=16, passage_max_len=16))
    # queries are 5 tokens; passages 8 (a) and 22 -> truncated to 16 (b): a query costs 5 + 4*8 = 37
    # or 5 + 4*16 = 69 tokens, so the largest B within 200 is 5 and 2.
    assert ds.per_device_batch_sizes == {"a/len-0-500": 5, "b/len-0-500": 2}
    for batch in ds:
        assert batch["query_input_ids"].numel() + batch["passage_input_ids"].numel() <= budget


def test_negatives_are_redrawn_each_epoch_and_same_for_any_world_size(tiny):
    def draws(ds, epoch):
        ds.set_epoch(epoch)
        out = {}
        for b in ds:
            g = b["passage_input_ids"].reshape(b["row_ids"].shape[0], 4, -1)
            for r, group in zip(b["row_ids"].tolist(), g):
                out[r] = [tuple(p[1:4].tolist()) for p in group]
        return out
    one = make(tiny)
    e0, e1 = draws(one, 0), draws(one, 1)
    common = [r for r in e0 if r in e1 and r < 1000]          # stream t1/len-0-500 has 6 negatives, G-1 = 3
    assert len(common) >= 10
    changed = sum(set(e0[r][1:]) != set(e1[r][1:]) for r in common)
    assert changed >= 0.7 * len(common)                        # P(same 3 of 6) = 1/20 per row
    for r, group in e0.items():
        assert group[0][0] == 11 and group[0][1] == r           # positive of the row itself, first
        assert all(kind == 12 and row == r for kind, row, _ in group[1:])
    # the draw of a row depends on (seed, epoch, row_id) only: 2 ranks give the same groups
    two = {}
    for rank in (0, 1):
        two.update(draws(make(tiny, world_size=2, rank=rank), 0))
    assert all(two[r] == e0[r] for r in two if r in e0) and len(set(two) & set(e0)) >= 20


def test_rows_without_negatives_borrow_from_their_own_stream(tmp_path, caplog):
    negs = [0, 2, 0, 1, 0, 3, 0, 0, 2, 1, 0, 2]
    data = write_converted(tmp_path / "mds", [StreamSpec("a", "len-0-500", 12, num_neg=negs, first_row_id=100),
                                              StreamSpec("k", "len-0-500", 12, num_neg=negs, first_row_id=500,
                                                         has_teacher_scores=True)])
    with caplog.at_level(logging.WARNING):
        ds = M3TrainDataset(str(data), **dataset_settings(train_group_size=3, default_batch_size=4, seed=1))
    assert "without teacher scores" in caplog.text
    for epoch in (0, 1):
        ds.set_epoch(epoch)
        for b in ds:
            assert not bool(b["has_teacher_scores"])
            stream_base = 100 if int(b["row_ids"][0]) < 500 else 500
            ids = b["passage_input_ids"].reshape(-1, 3, b["passage_input_ids"].shape[1])
            for r, group in zip(b["row_ids"].tolist(), ids):
                kind, owner = int(group[0, 1]), int(group[0, 2])
                assert (kind, owner) == (11, r)
                for p in group[1:]:
                    kind, owner = int(p[1]), int(p[2])
                    if negs[r - stream_base] == 0:     # borrowed: a positive of another row of this stream
                        assert kind == 11 and owner != r and stream_base <= owner < stream_base + 12
                    else:
                        assert (kind, owner) == (12, r)


@pytest.mark.parametrize("num_workers", [1, 2])
def test_dataloader_workers_serve_the_plan_in_order(tiny, num_workers):
    ds = make(tiny, world_size=2, rank=1)
    ds.set_epoch(1)
    direct = [b["row_ids"].tolist() for b in ds]
    loader = DataLoader(ds, batch_size=None, num_workers=num_workers)
    assert len(loader) == len(direct)
    assert [b["row_ids"].tolist() for b in loader] == direct


def test_state_dict_counts_global_queries_and_resumes_mid_epoch(tiny):
    ds = make(tiny, world_size=2, rank=0)
    ds.set_epoch(1)
    full = [b["row_ids"].tolist() for b in ds]
    per_step = ds.plan(1).samples_per_step()
    k = 3
    state = ds.state_dict(int(per_step[:k].sum()), True)
    assert (state["epoch"], state["step"]) == (1, k)
    with pytest.raises(ValueError, match="not a step boundary"):
        ds.state_dict(int(per_step[:k].sum()) + 1, True)
    fresh = make(tiny, world_size=2, rank=0)
    fresh.load_state_dict(state)
    assert [b["row_ids"].tolist() for b in fresh] == full[k:]
    end = ds.state_dict(int(per_step.sum()), True)
    assert end["step"] == len(ds)
    # another world size resumes elastically (tests/data/test_elastic_resume.py); another plan does not
    with pytest.raises(ValueError, match="seed"):
        fresh.load_state_dict({**state, "seed": state["seed"] + 1})
    with pytest.raises(ValueError, match="steps_per_epoch"):
        fresh.load_state_dict({**state, "steps_per_epoch": state["steps_per_epoch"] + 1})


def test_missing_shard_fails_loudly_not_a_short_epoch(tiny, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny, broken)
    stream_dir = broken / "t1" / "len-500-1000"
    shard = sorted(p for p in stream_dir.iterdir() if p.name.startswith("shard."))[1]
    for p in stream_dir.glob(shard.name.split(".mds")[0] + ".mds*"):
        p.unlink()
    ds = make(broken)
    with pytest.raises(RuntimeError, match="stream t1/len-500-1000: cannot read row"):
        for _ in DataLoader(ds, batch_size=None, num_workers=1):
            pass


def test_remote_store_reads_like_local_and_a_deleted_object_is_an_error(tiny, tmp_path, s3_server):
    client, bucket = s3_server["client"], s3_server["bucket"]
    prefix = "h5/tiny"
    for path in tiny.rglob("*"):
        if path.is_file() and not path.name.endswith(".mds"):       # what a converter uploads (zstd shards)
            client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(tiny)}")
    remote = f"s3://{bucket}/{prefix}"
    with pytest.raises(ValueError, match="local"):
        make(remote)
    ds = make(remote, local_cache=str(tmp_path / "cache"))
    assert [b["row_ids"].tolist() for b in ds] == [b["row_ids"].tolist() for b in make(tiny)]

    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/t1/len-0-500/")["Contents"]]
    client.delete_object(Bucket=bucket, Key=sorted(k for k in keys if "shard." in k)[2])
    broken = make(remote, local_cache=str(tmp_path / "cache2"), download_retry=1)
    with pytest.raises(RuntimeError, match="stream t1/len-0-500: cannot read row"):
        for _ in broken:
            pass


def test_reads_the_converters_output_with_instructions(converted_dir, word_tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(word_tokenizer_dir))
    ds = M3TrainDataset(str(converted_dir), tokenizer=tok, query_instruction_for_retrieval="query",
                        passage_instruction_for_retrieval="passage",
                        **dataset_settings(train_group_size=3, default_batch_size=4, query_max_len=16,
                                           passage_max_len=64))
    q_id, p_id = tok.convert_tokens_to_ids(["query", "passage"])
    rows = {s.name: s.rows for s in ds.streams}
    served = collections.Counter()
    seen = set()
    for b in ds:
        assert (b["query_input_ids"][:, :2] == torch.tensor([0, q_id])).all()
        assert (b["passage_input_ids"][:, :2] == torch.tensor([0, p_id])).all()
        assert b["passage_input_ids"].shape[1] <= 64
        ends = b["passage_attention_mask"].sum(1) - 1
        assert (b["passage_input_ids"][torch.arange(len(ends)), ends] == 2).all()   # </s> kept when truncated
        seen.update(b["row_ids"].tolist())
        served[(bool(b["has_teacher_scores"]), bool(b["is_parallel"]))] += b["row_ids"].shape[0]
        if bool(b["has_teacher_scores"]):
            t = b["teacher_scores"]
            # conftest scores positives in [0.5, 1] and negatives in [0, 0.5]; negatives sorted descending
            assert (t[:, 0] >= t[:, 1]).all() and (t[:, 1] >= t[:, 2]).all()
    assert sum(served.values()) == len(seen) == sum(rows.values()) - sum(ds.left_out(0).values())
    assert served[(True, False)] > 0 and served[(False, True)] > 0 and served[(False, False)] > 0


def test_left_out_rows_are_logged_per_stream(tiny, caplog):
    with caplog.at_level(logging.INFO, logger="m3composer.data.dataset"):
        make(tiny, world_size=2, rank=0).set_epoch(3)
    line = [r.getMessage() for r in caplog.records if "epoch 3" in r.getMessage()][0]
    assert "'t1/len-0-500': 1" in line and "'t1/len-500-1000': 2" in line and "'parallel_t2/len-0-500': 2" in line


def test_index_and_mds_row_counts_must_agree(tiny, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny, copy)
    index = json.loads((copy / "m3_index.json").read_text())
    index["streams"][1]["rows"] += 1          # e.g. an index written for more shards than were uploaded
    (copy / "m3_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="t1/len-500-1000 lists 11 rows but its MDS index has 10"):
        make(copy)


def test_under_a_launcher_the_process_group_must_exist_first(tiny, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    with pytest.raises(RuntimeError, match="initialize_dist"):
        make(tiny)


SHM_BLOCKS = ("locals", "barrier", "next_epoch", "cache_usage", "shard_states", "shard_access_times")


def shm_descriptors() -> set[tuple[str, str]]:
    """(descriptor, /dev/shm block name) of every shared-memory block this process holds open."""
    import os

    held = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("/dev/shm/"):
            held.add((fd, os.path.basename(target).removesuffix(" (deleted)")))
    return held


def test_a_dropped_dataset_gives_back_its_shared_memory(tiny):
    """Streaming keeps a StreamingDataset's /dev/shm blocks (and a descriptor each) until the process
    exits; ours are closed and unlinked when the dataset is collected (docs/recipe.md §Streaming's
    shared memory), so a process opening dataset after dataset does not run out of descriptors.
    Only the descriptors opened during this test count: a name can be reused, and an earlier
    test's descriptor to a deleted block of the same name is not this dataset's."""
    import gc
    import os

    from streaming.base.shared.prefix import _get_path

    before = shm_descriptors()
    ds = make(tiny)
    batches = iter(ds)
    next(batches)                       # the blocks are in use, the shard prefetcher runs
    batches.close()                     # what the DataLoader does with an iterator it drops
    prefix = ds._sd._shm_prefix_int
    names = {_get_path(prefix, n) for n in SHM_BLOCKS}

    def held() -> tuple[set, set]:
        opened = {name for _, name in shm_descriptors() - before}
        return names & set(os.listdir("/dev/shm")), names & opened

    assert held() == (names, names)
    del ds, batches
    gc.collect()
    assert held() == (set(), set())


def test_opening_a_dataset_beside_another_keeps_no_descriptor_of_the_other(tmp_path):
    """Streaming's prefix search attaches to every existing prefix's six blocks and keeps the
    descriptors until exit (atexit); those attachments are closed once the dataset is open, so a
    dataset opened while others are alive, or while a killed process's blocks remain, costs only its
    own six (docs/recipe.md §Streaming's shared memory)."""
    import gc

    from streaming.base.shared.prefix import _get_path

    first = make(write_converted(tmp_path / "a", [StreamSpec("t1", "len-0-500", 12)]))
    own_of_first = {name for _, name in shm_descriptors()}
    for round_ in range(3):
        before = shm_descriptors()
        other = make(write_converted(tmp_path / f"b{round_}", [StreamSpec("t1", "len-0-500", 12)]))
        opened = {name for _, name in shm_descriptors() - before}
        assert opened == {_get_path(other._sd._shm_prefix_int, block) for block in SHM_BLOCKS}   # its own only
        assert not opened & own_of_first
        del other
        gc.collect()
        assert shm_descriptors() == before
    del first


def test_a_dataset_opens_only_once_another_job_on_the_node_has_released_the_prefix_lock(tmp_path):
    """Another job choosing its shared-memory prefix at the same moment could take the one this job's
    ranks chose ("shared memory registered does not match local leader"): the node's local leader
    holds `node_prefix_lock` while its ranks build a dataset, so one job's prefix search never
    overlaps another's (docs/recipe.md §Streaming's shared memory). Another job holds the lock here
    (a child process); the dataset is built only after it lets go."""
    import subprocess
    import sys
    import threading
    import time

    from m3composer.data.streaming_internals import _prefix_lock_path

    root = write_converted(tmp_path / "a", [StreamSpec("t1", "len-0-500", 12)])
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, sys, time\n"
         f"f = open({_prefix_lock_path()!r}, 'a'); fcntl.flock(f, fcntl.LOCK_EX)\n"
         "print('held', flush=True); sys.stdin.readline()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        opened = {}
        thread = threading.Thread(target=lambda: opened.update(ds=make(root), at=time.monotonic()), daemon=True)
        thread.start()
        thread.join(3.0)
        assert not opened, "the dataset was built while another job held the node's prefix lock"
        released_at = time.monotonic()
        holder.stdin.write("\n")
        holder.stdin.flush()
        holder.wait(timeout=30)
        thread.join(120)
        assert opened["at"] > released_at and len(opened["ds"]) > 0
    finally:
        holder.kill()
        holder.wait()

"""A failing object store and corrupt shards, for m3composer/data/convert/ and data/dataset.py (with data/streams.py
and data/shard_checks.py).

Everything goes through m3composer.testing.s3.FaultProxy in front of the session's moto server:
conversion to s3:// while a quarter of the requests fail comes out byte-identical; a store that goes
down mid-upload leaves no m3_index.json, and the error names the object; the dataset's errors name
the dataset and the stream (and, mid-epoch, the shard, epoch and step), with botocore's error as
the cause. A flipped byte in a remote or a cached shard is caught by its xxh64 hash before any row
of it is served; datasets converted before hashing still read.
"""
from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import pytest

from m3composer.data.convert import UploadError, convert
from m3composer.data.dataset import M3TrainDataset
from m3composer.data.streams import DataReadError
from m3composer.data.index import INDEX_FILE, SHARD_HASH, read_index
from m3composer.testing.s3 import FaultProxy
from m3composer.testing.settings import dataset_settings

DATASET_ARGS = dataset_settings(train_group_size=3, default_batch_size=4, query_max_len=16, passage_max_len=32,
                                seed=3, download_timeout=60)


@pytest.fixture
def proxy(s3_server, monkeypatch):
    """A clean FaultProxy in front of moto; S3 clients created from now on go through it. Tests raise
    botocore's attempts where a flaky store must be survived and lower them where it must fail fast."""
    with FaultProxy(s3_server["endpoint"], seed=11) as fault:
        monkeypatch.setenv("S3_ENDPOINT_URL", fault.url)
        monkeypatch.setenv("AWS_MAX_ATTEMPTS", "10")
        yield fault


def published(folder: Path) -> list[str]:
    """What a conversion publishes (readers of a local dataset add decompressed `*.mds` beside it)."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.suffix != ".mds")


def copy_published(folder: Path, to: Path) -> Path:
    for name in published(folder):
        (to / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(folder / name, to / name)
    return to


def upload(s3_server, folder: Path, prefix: str) -> str:
    for name in published(folder):
        s3_server["client"].upload_file(str(folder / name), s3_server["bucket"], f"{prefix}/{name}")
    return f"s3://{s3_server['bucket']}/{prefix}"


def flip_byte(data: bytes) -> bytes:
    middle = len(data) // 2
    return data[:middle] + bytes([data[middle] ^ 0x01]) + data[middle + 1:]


def row_ids(dataset) -> list[list[int]]:
    return [b["row_ids"].tolist() for b in dataset]


def test_convert_through_a_store_failing_a_quarter_of_requests_is_byte_identical(
        s3_server, proxy, converted_source, converted_dir, word_tokenizer_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    proxy.fail_fraction = 0.25
    convert([converted_source], f"s3://{s3_server['bucket']}/flaky/mds", word_tokenizer_dir, local_cache=tmp_path,
            progress=False)
    assert proxy.failed >= 2
    client, bucket = s3_server["client"], s3_server["bucket"]
    stored = [k.removeprefix("flaky/mds/") for k in s3_server["moto"].keys("flaky/mds/")]
    assert stored == published(converted_dir)
    for name in stored:
        body = client.get_object(Bucket=bucket, Key=f"flaky/mds/{name}")["Body"].read()
        assert body == (converted_dir / name).read_bytes(), name


def test_convert_to_a_store_that_goes_down_names_the_object_and_publishes_no_index(
        s3_server, proxy, converted_source, word_tokenizer_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")   # fail fast: botocore does not retry
    proxy.down_after = 6          # the empty-prefix check (3 requests) and a few uploads get through
    remote = f"s3://{s3_server['bucket']}/down/mds"
    with pytest.raises(UploadError) as err:
        convert([converted_source], remote, word_tokenizer_dir, local_cache=tmp_path, progress=False)
    message = str(err.value)
    assert re.match(rf"{remote}/\S+: upload failed, so {INDEX_FILE} was not written", message), message
    assert "SlowDown" in message and "\n" not in message
    assert err.value.__cause__ is not None                      # botocore's error, in the traceback above
    stored = s3_server["moto"].keys("down/mds/")
    assert stored and f"down/mds/{INDEX_FILE}" not in stored
    with pytest.raises(OSError, match="the object store failed while reading the index") as failing:
        read_index(remote, tmp_path)                            # still down: not mistaken for a missing index
    assert not isinstance(failing.value, FileNotFoundError)
    proxy.down_after = None
    with pytest.raises(FileNotFoundError, match=f"{INDEX_FILE}: no index"):
        read_index(remote, tmp_path)                            # back up: readers see no dataset


@pytest.fixture(scope="module")
def remote_dataset(s3_server, converted_dir):
    return upload(s3_server, converted_dir, "faults/clean")


def test_a_store_failing_at_start_up_names_the_dataset_and_the_stream(remote_dataset, converted_dir, proxy,
                                                                      tmp_path, monkeypatch):
    from botocore.exceptions import ClientError

    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")   # fail fast: botocore does not retry
    proxy.fail_match, proxy.fail_fraction = r"/len-\d+-\d+/", 1.0     # m3_index.json reads, the streams fail
    first = read_index(converted_dir)["streams"][0]["path"]
    with pytest.raises(DataReadError) as err:
        M3TrainDataset(remote_dataset, local_cache=str(tmp_path / "cache"), **dict(DATASET_ARGS, download_retry=1))
    message = str(err.value)
    assert message.startswith(f"{remote_dataset}: cannot open stream {first} ({remote_dataset}/{first}/index.json) "
                              "(download_retry=1, download_timeout=60s): ClientError: "), message
    assert "(500)" in message and "\n" not in message and isinstance(err.value.__cause__, ClientError)


def test_a_store_going_down_mid_epoch_names_shard_epoch_and_step_never_a_short_epoch(
        remote_dataset, converted_dir, proxy, tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")   # fail fast: botocore does not retry
    clean = row_ids(M3TrainDataset(str(converted_dir), **DATASET_ARGS))
    ds = M3TrainDataset(remote_dataset, local_cache=str(tmp_path / "cache"), **dict(DATASET_ARGS, download_retry=1))
    served = []
    with pytest.raises(DataReadError) as err:
        for batch in ds:
            served.append(batch["row_ids"].tolist())
            if len(served) == 2:
                proxy.down_after = proxy.requests               # the store goes down after step 1
    found = re.match(rf"{re.escape(remote_dataset)}: stream (\S+): cannot read row \d+ of group \S+ "
                     r"\(sample \d+, shard (shard\.\d+\.mds\.zstd)\) for epoch 0 step (\d+): ClientError: ",
                     str(err.value))
    assert found, str(err.value)
    assert int(found.group(3)) == len(served) and 2 <= len(served) < len(ds)
    assert served == clean[:len(served)]                       # what was served before is right


def test_a_flipped_byte_in_a_remote_shard_is_caught_before_its_rows_are_served(
        s3_server, converted_dir, tmp_path):
    prefix = "faults/corrupt-remote"
    remote = upload(s3_server, converted_dir, prefix)
    stream = read_index(converted_dir)["streams"][1]
    client, bucket, key = s3_server["client"], s3_server["bucket"], f"{prefix}/{stream['path']}/shard.00000.mds.zstd"
    client.put_object(Bucket=bucket, Key=key, Body=flip_byte(client.get_object(Bucket=bucket, Key=key)["Body"].read()))
    ds = M3TrainDataset(remote, local_cache=str(tmp_path / "cache"), **dict(DATASET_ARGS, download_retry=1))
    group = next(i for i, g in enumerate(ds.groups) if g.name == stream["name"])
    first_step = next(i for i, s in enumerate(ds.plan(0).steps) if s.group == group)
    with pytest.raises(DataReadError, match=rf"stream {stream['name']}: .*shard shard\.00000\.mds\.zstd\) for "
                                            rf"epoch 0 step {first_step}: ValueError: Checksum failure: "):
        list(ds)


def test_a_flipped_byte_in_a_cached_shard_is_caught_on_the_next_run(converted_dir, tmp_path):
    # The cache of a remote dataset, filled from a local "remote" (the same cache code, without S3
    # clients): a shard decompressed there by an earlier run is hashed again by the next one.
    remote, cache = copy_published(converted_dir, tmp_path / "remote"), tmp_path / "cache"
    clean = row_ids(M3TrainDataset(str(remote), local_cache=str(cache), **DATASET_ARGS))
    stream = read_index(converted_dir)["streams"][2]
    cached = cache / stream["path"] / "shard.00000.mds"
    cached.write_bytes(flip_byte(cached.read_bytes()))
    with pytest.raises(DataReadError, match=rf"stream {stream['name']}: .*ValueError: {re.escape(str(cached))}: "
                                            rf"corrupt shard \({SHARD_HASH} "):
        list(M3TrainDataset(str(remote), local_cache=str(cache), **DATASET_ARGS))
    cached.unlink()                                  # as the message says: delete it and it is fetched again
    assert row_ids(M3TrainDataset(str(remote), local_cache=str(cache), **DATASET_ARGS)) == clean


def test_shards_carry_hashes_and_a_dataset_converted_without_them_still_reads(converted_dir, tmp_path, caplog):
    old = copy_published(converted_dir, tmp_path / "old")
    for mds_index in old.glob("*/*/index.json"):
        meta = json.loads(mds_index.read_text())
        for shard in meta["shards"]:
            for part in ("raw_data", "zip_data"):
                assert set(shard[part]["hashes"]) == {SHARD_HASH}
                shard[part]["hashes"] = {}                   # what Streaming wrote before hashing was on
            shard["hashes"] = []
        mds_index.write_text(json.dumps(meta))
    with caplog.at_level(logging.INFO, logger="m3composer.data.shard_checks"):
        old_rows = row_ids(M3TrainDataset(str(old), **DATASET_ARGS))
    assert "converted without shard hashes and are read unverified" in caplog.text
    assert old_rows == row_ids(M3TrainDataset(str(converted_dir), **DATASET_ARGS))


def test_a_shard_with_a_pickled_column_is_refused_before_any_row_is_read(converted_dir, tmp_path):
    """Streaming would unpickle a `pkl` column when it reads a sample; it refuses to open a stream that
    declares one unless `allow_unsafe_types=True`, which m3composer never passes: a crafted MDS index
    is refused when the dataset opens, naming the dataset and the column."""
    crafted = copy_published(converted_dir, tmp_path / "crafted")
    mds_index = sorted(crafted.glob("*/*/index.json"))[0]
    meta = json.loads(mds_index.read_text())
    for shard in meta["shards"]:
        shard["column_encodings"][shard["column_names"].index("source")] = "pkl"
    mds_index.write_text(json.dumps(meta))
    with pytest.raises(DataReadError, match=rf"{re.escape(str(crafted))}: cannot open its streams: ValueError: "
                                            "Column source contains an unsafe type: pkl"):
        M3TrainDataset(str(crafted), **DATASET_ARGS)

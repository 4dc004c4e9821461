"""Publishing a conversion: a local OUT is built under `OUT.tmp-<pid>` and swapped into place at the end;
an object-store OUT (`s3://...`, or any scheme Streaming can upload to) is staged locally and uploaded
with Streaming's uploader, `m3_index.json` last, so a reader that finds the index finds a complete
dataset. A failed or interrupted conversion leaves nothing behind.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

from m3composer.data.index import INDEX_FILE


class UploadError(RuntimeError):
    """An object of an `s3://…` conversion could not be uploaded; the message names it."""


@contextmanager
def quiet_streaming():
    """Streaming's merge_index and uploaders log a warning per call (their temp folder, a folder
    that is not empty: ours, on purpose); keep them out of the summary."""
    class _Drop(logging.Filter):
        def filter(self, record):
            return False

    root, streaming_log = logging.getLogger(), logging.getLogger("streaming")
    drop, level = _Drop(), streaming_log.level
    root.addFilter(drop)              # merge_index logs through the root logger itself
    streaming_log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.removeFilter(drop)
        streaming_log.setLevel(level)


def prepare_local_out(out: Path, overwrite: bool) -> Path:
    """A fresh staging folder `OUT.tmp-<pid>` beside a local OUT; OUT must be absent or empty unless `overwrite`."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            raise FileExistsError(f"{out}: output exists and is not empty (pass overwrite=True / --overwrite)")
    work = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    return work


def remote_is_used(remote: str, overwrite: bool) -> bool:
    """Refuse a non-empty prefix unless `overwrite`; True when there is an old dataset to replace."""
    probe_dir = tempfile.mkdtemp(prefix="m3c-probe-")
    try:
        existing = cloud_uploader(probe_dir, remote).list_objects()
    finally:
        shutil.rmtree(probe_dir, ignore_errors=True)
    if existing and not overwrite:
        raise FileExistsError(f"{remote}: output prefix is not empty ({len(existing)} objects; "
                              f"pass overwrite=True / --overwrite)")
    return bool(existing)


def upload(staged: Path, remote: str, replace: bool, threads: int = 4) -> None:
    """Upload every staged file with Streaming's uploader; the index goes last.

    When replacing an old dataset, its m3_index.json is deleted first so that no reader pairs
    it with half-uploaded new streams (s3:// only). Old objects the new dataset does not
    overwrite stay behind, unreferenced by the new index.
    """
    uploader = cloud_uploader(staged, remote)
    if replace:
        if not hasattr(uploader, "s3"):
            raise ValueError(f"{remote}: replacing a dataset is only supported on s3://; choose an empty prefix")
        url = urllib.parse.urlparse(f"{remote}/{INDEX_FILE}")
        uploader.s3.delete_object(Bucket=url.netloc, Key=url.path.lstrip("/"))
    files = sorted(str(p.relative_to(staged)) for p in staged.rglob("*") if p.is_file())
    body = [f for f in files if f != INDEX_FILE]

    def upload_one(name: str) -> None:
        try:
            uploader.upload_file(name)
        except Exception as err:  # botocore (AWS_MAX_ATTEMPTS) and Streaming have given up
            raise UploadError(f"{remote}/{name}: upload failed, so {INDEX_FILE} was not written and readers see "
                              f"no dataset: {type(err).__name__}: {' '.join(str(err).split())}") from err

    with ThreadPoolExecutor(max_workers=threads) as pool:
        futures = [pool.submit(upload_one, name) for name in body]
        try:
            for future in futures:
                future.result()       # re-raise the first failure
        except BaseException:
            for future in futures:    # a store that is down: do not wait out every file's retries
                future.cancel()
            raise
    upload_one(INDEX_FILE)


def cloud_uploader(local: str | os.PathLike, remote: str):
    """Streaming's uploader from the local folder `local` to the object-store prefix `remote` (files kept)."""
    from streaming.base.storage.upload import CloudUploader

    return CloudUploader.get((str(local), remote), keep_local=True, exist_ok=True)

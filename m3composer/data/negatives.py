"""Negatives re-mined during training (`NegativeRefresh`): the pool, the stored versions, and what
the dataset serves.

The pool is the training data's own: every positive and negative of a stream (task × bucket),
identical token-id sequences once, in first-appearance order. A row's candidates come from its
own stream only, as `m3c mine` uses one pool per training file: the negatives stay of the same task,
and no longer than the bucket the batch size was planned for. Negatives are stored as **token ids**
(the shards' own, untruncated, without instruction), so the dataset serves them exactly as it
serves the converted negatives, with no tokenizer at training time.

On disk, under `folder` (`run_dir/negatives`), npy arrays and JSON only (no pickle), each folder
written beside its target and swapped in (`fsutil.building_dir`), so a kill leaves the old version
or the new one:

    pool/   tokens.npy (int32, all passages concatenated), offsets.npy (int64, P+1),
            stream_offsets.npy (int64, S+1: stream s owns pool ids [o[s], o[s+1])), meta.json
    v{N}/   row_ids.npy (int64, ascending), offsets.npy (int64, rows+1), pool_ids.npy (int64):
            row_ids[i]'s negatives are pool_ids[offsets[i]:offsets[i+1]], in rank order; meta.json
    index.json   every version's meta (written after the version folder)

`MinedNegatives` is the dataset's switch: version N is served from epoch `from_epoch` on; its
`state_dict` (version, from_epoch, sha256) goes into the dataset's checkpoint state, so a resumed
run serves the same negatives. While a version is served, teacher scores are not (they scored the
converted negatives, not these; docs/recipe.md §Negative refresh).
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional

import numpy as np

from m3composer.data.collate import row_passages
from m3composer.fsutil import building_dir, write_json_atomic

POOL_DIR = "pool"
VERSIONS_INDEX_FILE = "index.json"


def parse_rank_range(text: str) -> tuple[int, int]:
    """`"10-100"` -> (10, 100): 1-based inclusive ranks (`m3c mine --range`, `callbacks.negative_refresh.range`)."""
    try:
        first, last = (int(x) for x in str(text).split("-"))
    except ValueError:
        raise ValueError(f"range is FIRST-LAST ranks like 10-100, got {text!r}") from None
    if not 1 <= first <= last:
        raise ValueError(f"range needs 1 <= FIRST <= LAST, got {text!r}")
    return first, last


def version_dir(folder: str | os.PathLike, version: int) -> Path:
    return Path(folder) / f"v{int(version)}"


def sha256_of(*arrays: np.ndarray) -> str:
    digest = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        digest.update(f"{a.dtype.str}{a.shape}".encode())
        digest.update(a.tobytes())
    return digest.hexdigest()


# ---- the pool ----------------------------------------------------------------------------------------
@dataclass
class TrainingPool:
    """The pool and the rows that mine from it, rows in the dataset's global sample order."""
    passages: list[np.ndarray]              # pool id -> token ids
    stream_offsets: np.ndarray              # (S+1,): stream s owns pool ids [o[s], o[s+1])
    row_ids: np.ndarray                     # (R,) int64
    row_streams: np.ndarray                 # (R,) stream index of each row
    queries: list[np.ndarray]               # token ids of each row's query
    positives: list[np.ndarray]             # pool ids of each row's positives
    excluded: list[frozenset] = field(default_factory=list)   # never a negative of the row: its positives, its query

    @property
    def sha256(self) -> str:
        tokens, offsets = concatenate(self.passages)
        return sha256_of(tokens, offsets, self.stream_offsets)

    def stream_range(self, stream: int) -> tuple[int, int]:
        return int(self.stream_offsets[stream]), int(self.stream_offsets[stream + 1])


def concatenate(sequences: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(all ids as int32, offsets int64 of len n+1)."""
    offsets = np.zeros(len(sequences) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(s) for s in sequences])
    tokens = np.concatenate(sequences).astype(np.int32) if sequences else np.zeros(0, dtype=np.int32)
    return tokens, offsets


def build_pool(streams: Iterable[Iterable[dict]]) -> TrainingPool:
    """The pool of every stream (an iterable of its MDS rows, `M3TrainDataset.stream_rows`)."""
    passages: list[np.ndarray] = []
    stream_offsets = [0]
    row_ids, row_streams, queries, positives, excluded = [], [], [], [], []
    for s, rows in enumerate(streams):
        ids_of: dict[bytes, int] = {}

        def pool_id(ids: np.ndarray) -> int:
            key = np.asarray(ids, dtype="<i4").tobytes()
            if key not in ids_of:
                ids_of[key] = len(passages)
                passages.append(np.asarray(ids, dtype=np.int32))
            return ids_of[key]

        stream_rows = list(rows)
        for row in stream_rows:                       # every passage first, so a query's text is found
            pos, neg = row_passages(row)
            for p in pos + neg:
                pool_id(p)
        for row in stream_rows:
            pos, _ = row_passages(row)
            own = np.array([pool_id(p) for p in pos], dtype=np.int64)
            query_id = ids_of.get(np.asarray(row["query"], dtype="<i4").tobytes())
            row_ids.append(int(row["row_id"]))
            row_streams.append(s)
            queries.append(np.asarray(row["query"], dtype=np.int32))
            positives.append(own)
            excluded.append(frozenset(own.tolist()) | ({query_id} if query_id is not None else set()))
        stream_offsets.append(len(passages))
    return TrainingPool(passages, np.asarray(stream_offsets, dtype=np.int64), np.asarray(row_ids, dtype=np.int64),
                        np.asarray(row_streams, dtype=np.int64), queries, positives, excluded)


def write_pool(folder: str | os.PathLike, pool: TrainingPool) -> str:
    """`folder/pool/` (skipped when the one there has the same sha256); returns the sha256."""
    sha = pool.sha256
    target = Path(folder) / POOL_DIR
    meta_path = target / "meta.json"
    if meta_path.is_file() and json.loads(meta_path.read_text()).get("sha256") == sha:
        return sha
    tokens, offsets = concatenate(pool.passages)
    with building_dir(target) as tmp:
        np.save(tmp / "tokens.npy", tokens)
        np.save(tmp / "offsets.npy", offsets)
        np.save(tmp / "stream_offsets.npy", pool.stream_offsets)
        write_json_atomic(tmp / "meta.json", {"passages": len(pool.passages), "streams": len(pool.stream_offsets) - 1,
                                              "sha256": sha})
    return sha


# ---- one version ------------------------------------------------------------------------------------
@dataclass
class NegativesVersion:
    """A version as arrays (see the module doc); `negatives_of(row_id)` gives token ids."""
    version: int
    row_ids: np.ndarray
    offsets: np.ndarray
    pool_ids: np.ndarray
    pool_tokens: np.ndarray
    pool_offsets: np.ndarray
    meta: dict

    @property
    def sha256(self) -> str:
        return self.meta["sha256"]

    def negatives_of(self, row_id: int) -> list[np.ndarray]:
        i = int(np.searchsorted(self.row_ids, row_id))
        if i >= len(self.row_ids) or self.row_ids[i] != row_id:
            raise KeyError(f"negatives v{self.version}: no row {row_id} (mined for another training set?)")
        ids = self.pool_ids[self.offsets[i]:self.offsets[i + 1]]
        return [np.asarray(self.pool_tokens[self.pool_offsets[p]:self.pool_offsets[p + 1]]) for p in ids]


def version_sha256(row_ids: np.ndarray, offsets: np.ndarray, pool_ids: np.ndarray, pool_sha256: str) -> str:
    return sha256_of(row_ids, offsets, pool_ids, np.frombuffer(pool_sha256.encode(), dtype=np.uint8))


def version_arrays(row_ids: np.ndarray, chosen: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`(row_ids ascending, offsets, pool_ids)` from `chosen (R, N)` pool ids padded with -1."""
    order = np.argsort(row_ids, kind="stable")
    chosen = chosen[order]
    counts = (chosen >= 0).sum(axis=1)
    offsets = np.zeros(len(order) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum(counts)
    return row_ids[order].astype(np.int64), offsets, chosen[chosen >= 0].astype(np.int64)


def write_version(folder: str | os.PathLike, version: int, row_ids: np.ndarray, chosen: np.ndarray, pool_sha256: str,
                  meta: dict, before_publish: Optional[Callable[[Path], None]] = None) -> dict:
    """`folder/v{version}/` and its entry in `folder/index.json`; returns the version's meta.
    `before_publish(tmp)` runs when the arrays are written but not yet swapped in (a test hook)."""
    row_ids, offsets, pool_ids = version_arrays(row_ids, chosen)
    meta = dict(meta, version=int(version), rows=len(row_ids), negatives=len(pool_ids), pool_sha256=pool_sha256,
                sha256=version_sha256(row_ids, offsets, pool_ids, pool_sha256))
    with building_dir(version_dir(folder, version)) as tmp:
        np.save(tmp / "row_ids.npy", row_ids)
        np.save(tmp / "offsets.npy", offsets)
        np.save(tmp / "pool_ids.npy", pool_ids)
        write_json_atomic(tmp / "meta.json", meta)
        if before_publish is not None:
            before_publish(tmp)
    index_path = Path(folder) / VERSIONS_INDEX_FILE
    index = json.loads(index_path.read_text()) if index_path.is_file() else {"versions": []}
    index["versions"] = sorted([v for v in index["versions"] if v["version"] != version] + [meta],
                               key=lambda v: v["version"])
    write_json_atomic(index_path, index)
    return meta


def read_version(folder: str | os.PathLike, version: int) -> NegativesVersion:
    """Version `version` with the pool it indexes; checks both sha256s."""
    where = version_dir(folder, version)
    pool_dir = Path(folder) / POOL_DIR
    try:
        meta = json.loads((where / "meta.json").read_text())
        row_ids, offsets, pool_ids = (np.load(where / f"{n}.npy", allow_pickle=False)
                                      for n in ("row_ids", "offsets", "pool_ids"))
        pool_meta = json.loads((pool_dir / "meta.json").read_text())
        tokens, pool_offsets = (np.load(pool_dir / f"{n}.npy", mmap_mode="r", allow_pickle=False)
                                for n in ("tokens", "offsets"))
    except (OSError, ValueError) as err:
        raise ValueError(f"{where}: cannot read mined negatives v{version}: {type(err).__name__}: {err}") from err
    if pool_meta.get("sha256") != meta.get("pool_sha256"):
        raise ValueError(f"{where}: mined for pool {meta.get('pool_sha256')}, but {pool_dir} holds "
                         f"{pool_meta.get('sha256')}")
    if version_sha256(row_ids, offsets, pool_ids, meta["pool_sha256"]) != meta.get("sha256"):
        raise ValueError(f"{where}: arrays do not match the sha256 in its meta.json (damaged)")
    return NegativesVersion(int(version), row_ids, offsets, pool_ids, tokens, pool_offsets, meta)


def with_negatives(record: dict, negatives: list[np.ndarray]) -> dict:
    """An MDS row with its negatives replaced by `negatives` (token ids) and no teacher scores."""
    positives, _ = row_passages(record)
    passages, offsets = concatenate(positives + negatives)
    out = dict(record)
    out["passages"], out["passage_offsets"] = passages, offsets.astype(np.int32)
    out["scores"] = np.full(len(positives) + len(negatives), np.nan, dtype=np.float32)
    return out


# ---- what the dataset serves ------------------------------------------------------------------------
class MinedNegatives:
    """The version the dataset serves and the epoch it starts at; None until the first refresh.

    `apply(record, epoch)` swaps a row's negatives for the mined ones from `from_epoch` on (a row
    the refresh found no candidate for keeps its own, or borrows as before).
    """

    def __init__(self, folder: str | os.PathLike | None):
        self.folder = None if folder is None else str(folder)
        self.current: Optional[NegativesVersion] = None
        self.from_epoch: Optional[int] = None

    def use(self, version: int, from_epoch: int, expected_sha256: Optional[str] = None) -> NegativesVersion:
        """Serve `folder/v{version}` from `from_epoch` on (read from disk, so every rank and every
        resume serves the bytes that were written)."""
        if self.folder is None:
            raise ValueError(f"mined negatives v{version} requested, but this dataset has no negatives folder "
                             "(callbacks.negative_refresh is off in this run)")
        loaded = read_version(self.folder, version)
        if expected_sha256 is not None and loaded.sha256 != expected_sha256:
            raise ValueError(f"{version_dir(self.folder, version)}: sha256 {loaded.sha256} differs from the "
                             f"{expected_sha256} recorded in the checkpoint: these are not the negatives it trained on")
        self.current, self.from_epoch = loaded, int(from_epoch)
        return loaded

    def active(self, epoch: int) -> bool:
        return self.current is not None and epoch >= self.from_epoch

    def apply(self, record: dict, epoch: int) -> dict:
        if not self.active(epoch):
            return record
        negatives = self.current.negatives_of(int(record["row_id"]))
        return with_negatives(record, negatives) if negatives else record

    def state_dict(self) -> Optional[dict]:
        if self.current is None:
            return None
        return {"version": self.current.version, "from_epoch": self.from_epoch, "sha256": self.current.sha256}

    def load_state_dict(self, obj: Optional[dict]) -> None:
        if obj is None:
            self.current = self.from_epoch = None
            return
        self.use(int(obj["version"]), int(obj["from_epoch"]), obj.get("sha256"))

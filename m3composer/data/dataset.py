"""The training dataset: one whole, collated per-rank batch per step, from one group on every rank.

`M3TrainDataset` reads a converted dir (`m3_index.json` + one MDS stream per task × bucket,
local or `s3://…`) and yields, step by step, this rank's slice of the global batch that the epoch
plan (`plan.py`) lays out. Rows are read by index from one `StreamingDataset` over all streams and
collated by `collate.py`. The rules it applies (per-bucket batch sizes, same-group batches, the
tail rule, per-epoch re-draws, borrowed negatives) are in docs/recipe.md §Batch sizes, §Epoch plan,
§Collation; why it reads by index instead of using Streaming's sampler, how it owns the epoch and
how it resumes are in docs/architecture.md §Training data: our own epoch plan over random access.

Epochs: call `set_epoch(e)` at every EPOCH_START (`callbacks.data_refresh.DataRefresh` does);
`load_state_dict` sets epoch and step on a mid-epoch resume, also from a checkpoint taken at
another world size (elastic resume: the epoch goes on with the rows its plan still had,
`plan.plan_epoch(history=…)`; `len()` is then the length of that epoch). Use DataLoader workers
without `persistent_workers`; with N workers, worker w serves steps w, w+N, … in plan order.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Iterator, Mapping

import numpy as np
import torch.distributed
from composer.utils import dist
from streaming import Stream, StreamingDataset
from torch.utils.data import IterableDataset, get_worker_info

from m3composer.data import buckets
from m3composer.data.collate import TokenSpec, collate_examples, draw_example, row_passages, token_spec_from_tokenizer
from m3composer.data.index import INDEX_FILE, SHARD_HASH, StreamEntry, is_remote, read_streams
from m3composer.data.plan import (ROW_STREAM, TAIL_RULES, EpochPlan, Group, group_streams, plan_epoch,
                                  steps_per_epoch)

log = logging.getLogger(__name__)


class DataReadError(RuntimeError):
    """The training data cannot be read: a failing store or a corrupt shard. The message names the
    dataset and the stream (and, mid-epoch, the shard, epoch and step); the library error is its cause."""


class M3TrainDataset(IterableDataset):
    """Per-rank collated batches of the M3 recipe; see the module docstring.

    Args (the names of the `data:` section of the config):
        train_data: converted dir, local path or `s3://…`.
        local_cache: cache dir for shards (required for a remote `train_data`; for a local one the
            shards are read in place when None).
        tokenizer: HF tokenizer or local folder, for special ids and instruction ids; or give
            `token_spec` instead (tests with synthetic ids). Default: XLM-R ids, no instructions.
        train_group_size: G, passages per query (1 positive + G−1 negatives).
        default_batch_size: per-device batch size of buckets the table does not cover.
        batch_size_table: {bucket: {G: per-device batch}}; None = FlagEmbedding's tables (G ∈ {1, 8}).
        max_tokens_per_device_batch: when set, per-device batch sizes come from this token budget.
        query_max_len, passage_max_len: truncation lengths (tokens, `<s>`/`</s>` included).
        small_threshold, drop_threshold: the small-stream merge (0/0 = off).
        tail: one of `plan.TAIL_RULES`.
        seed: plan and draw seed.
        query_instruction_for_retrieval, passage_instruction_for_retrieval: instruction strings
            (need `tokenizer`).
        shuffle_ratio: probability of `shuffle_text` on a positive.
        world_size, rank: default from the launcher's environment.
    """

    def __init__(self, train_data: str, *, local_cache: str | None = None, tokenizer: Any = None,
                 token_spec: TokenSpec | None = None, train_group_size: int = 8, default_batch_size: int = 8,
                 batch_size_table: Mapping[str, Mapping[int, int]] | None = None,
                 max_tokens_per_device_batch: int | None = None, query_max_len: int = 32,
                 passage_max_len: int = 128, small_threshold: int = 0, drop_threshold: int = 0,
                 tail: str = "keep_if_ge_2W", seed: int = 42, query_instruction_for_retrieval: str | None = None,
                 passage_instruction_for_retrieval: str | None = None, shuffle_ratio: float = 0.0,
                 pad_to_multiple_of: int | None = None, world_size: int | None = None, rank: int | None = None,
                 download_retry: int = 2, download_timeout: float = 60):
        _check_arguments(tail=tail, train_group_size=train_group_size, seed=seed, shuffle_ratio=shuffle_ratio)
        self.train_data = train_data
        self.token_spec = _token_spec(tokenizer, token_spec, query_instruction_for_retrieval,
                                      passage_instruction_for_retrieval)
        self.train_group_size = train_group_size
        self.query_max_len = query_max_len
        self.passage_max_len = passage_max_len
        self.tail = tail
        self.seed = seed
        self.shuffle_ratio = shuffle_ratio
        self.pad_to_multiple_of = pad_to_multiple_of
        self.world_size, self.rank = _rank_and_world_size(world_size, rank)

        where = f"{train_data}/{INDEX_FILE}"
        if batch_size_table is not None:     # YAML may give the group-size keys as strings
            batch_size_table = {k: {int(g): int(b) for g, b in v.items()} for k, v in batch_size_table.items()}
        self.streams = _streams_with_rows(train_data, local_cache, where)
        sizes = [self._batch_size(s, default_batch_size, batch_size_table, max_tokens_per_device_batch)
                 for s in self.streams]
        self.groups, self.dropped_groups = group_streams(self.streams, sizes, small_threshold=small_threshold,
                                                         drop_threshold=drop_threshold)
        if not self.groups:
            raise ValueError(f"{where}: every stream was dropped (drop_threshold={drop_threshold})")
        self.group_has_teacher_scores = [self._serve_scores(g) for g in self.groups]
        # group-local row index -> global sample index of the StreamingDataset (streams concatenated)
        self._stream_offset = np.cumsum([0] + [s.rows for s in self.streams])[:-1]
        self._group_row_starts = [np.cumsum([0] + [self.streams[i].rows for i in g.streams]) for g in self.groups]
        self._sd = _open_streaming_dataset(train_data, local_cache, self.streams, where,
                                           download_retry=download_retry, download_timeout=download_timeout)
        self._verified_shards: set[int] = set()   # shards whose files this process has hashed

        self._steps = steps_per_epoch([g.rows for g in self.groups], [g.per_device_batch_size for g in self.groups],
                                      world_size=self.world_size, tail=tail)
        if self._steps == 0:
            raise ValueError(f"{where}: no step fits: every group has fewer rows than the tail rule {tail!r} "
                             f"needs at world size {self.world_size}")
        self._plan: EpochPlan | None = None
        self._plan_history: tuple[tuple[int, int], ...] = ()
        self.epoch = 0
        self._start_step = 0
        # Elastic resume: [(world size, steps done), ...] of the current epoch before it came to this
        # world size (plan.plan_epoch's `history`); empty when the epoch runs at one world size.
        self._history: list[tuple[int, int]] = []
        self.set_epoch(0)

    # ---- sizes and flags -------------------------------------------------------------------------
    def _batch_size(self, stream: StreamEntry, default_batch_size: int, table, max_tokens: int | None) -> int:
        if max_tokens is None:
            return buckets.table_batch_size(stream.bucket, self.train_group_size, default_batch_size, table)
        # The longest a row of this stream can be after prefixing and truncation: the converter's
        # measured maximum, else the bucket's edge (lengths < hi), else the max_len.
        q_longest = stream.query_len_max or (stream.bucket_hi - 1 if stream.bucket_hi else None)
        p_longest = stream.passage_len_max or (stream.bucket_hi - 1 if stream.bucket_hi else None)
        q_len = self.query_max_len if q_longest is None else min(
            self.query_max_len, q_longest + len(self.token_spec.query_prefix))
        p_len = self.passage_max_len if p_longest is None else min(
            self.passage_max_len, p_longest + len(self.token_spec.passage_prefix))
        return buckets.token_budget_batch_size(max_tokens, q_len, p_len, self.train_group_size)

    def _serve_scores(self, group: Group) -> bool:
        if not group.has_teacher_scores:
            return False
        lacking = [self.streams[i].name for i in group.streams
                   if self.train_group_size > 1 and (self.streams[i].min_neg or 0) == 0]
        if lacking:
            log.warning("streams %s have teacher scores but rows without negatives: served without teacher "
                        "scores (borrowed negatives have none)", lacking)
            return False
        return True

    @property
    def per_device_batch_sizes(self) -> dict[str, int]:
        return {g.name: g.per_device_batch_size for g in self.groups}

    @property
    def max_per_device_batch_size(self) -> int:
        """The largest per-rank batch: the trainer's device_train_microbatch_size must be at least this."""
        return max(g.per_device_batch_size for g in self.groups)

    # ---- epochs and plan -------------------------------------------------------------------------
    def plan(self, epoch: int) -> EpochPlan:
        """The plan of `epoch`; for the current epoch after an elastic resume, the resumed plan."""
        history = tuple(self._history) if epoch == self.epoch else ()
        if self._plan is None or self._plan.epoch != epoch or self._plan_history != history:
            self._plan = plan_epoch([g.rows for g in self.groups], [g.per_device_batch_size for g in self.groups],
                                    seed=self.seed, epoch=epoch, world_size=self.world_size, tail=self.tail,
                                    history=history)
            self._plan_history = history
        return self._plan

    def left_out(self, epoch: int) -> dict[str, int]:
        """Rows per group that sit out `epoch` (tail rule)."""
        return {g.name: n for g, n in zip(self.groups, self.plan(epoch).left_out) if n}

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` from its first step (DataRefresh calls this at EPOCH_START)."""
        self.epoch, self._start_step, self._history = int(epoch), 0, []
        self._log_plan()

    def _log_plan(self) -> None:
        left = self.left_out(self.epoch)
        if left and self.rank == 0:
            log.info("epoch %d: %d steps; rows left out by the tail rule %r: %s", self.epoch, len(self), self.tail,
                     left)

    def __len__(self) -> int:
        """Steps of the current epoch (`steps_per_epoch`, except in an elastically resumed epoch)."""
        return len(self.plan(self.epoch))

    @property
    def steps_per_epoch(self) -> int:
        """Steps of an epoch run at this world size from its start."""
        return self._steps

    # ---- reading ---------------------------------------------------------------------------------
    def _sample_index(self, group: int, row: int) -> tuple[int, int]:
        g = self.groups[group]
        member = int(np.searchsorted(self._group_row_starts[group], row, side="right")) - 1
        stream = g.streams[member]
        return stream, int(self._stream_offset[stream] + row - self._group_row_starts[group][member])

    def _read(self, group: int, row: int, epoch: int, step: int) -> dict:
        stream, sample = self._sample_index(group, row)
        shard = int(self._sd.spanner[sample][0])
        try:
            record = self._sd[sample]
            if shard not in self._verified_shards:
                _verify_shard(self._sd, shard)
                self._verified_shards.add(shard)
            return record
        except Exception as err:  # a missing/corrupt shard or a store that keeps failing: fail the epoch loudly
            raise DataReadError(f"{self.train_data}: stream {self.streams[stream].name}: cannot read row {row} of "
                                f"group {self.groups[group].name} (sample {sample}, shard "
                                f"{_shard_name(self._sd, shard)}) for epoch {epoch} step {step}: "
                                f"{type(err).__name__}: {_one_line(err)}") from err

    def _borrow(self, group: int, own_row: int, epoch: int, step: int):
        rows = self.groups[group].rows

        def borrow(needed: int, rng: np.random.Generator) -> list[np.ndarray]:
            if rows < 2:
                return []
            picks = rng.choice(rows - 1, size=needed, replace=needed > rows - 1)
            passages = []
            for p in picks:
                other_row = int(p) + int(int(p) >= own_row)       # skip the row itself
                other = self._read(group, other_row, epoch, step)
                positives, _ = row_passages(other)
                passages.append(positives[int(rng.integers(len(positives)))])
            return passages

        return borrow

    def batch(self, epoch: int, step: int) -> dict:
        """This rank's collated batch of (epoch, step): a pure function of them and the config."""
        planned = self.plan(epoch).steps[step]
        group = self.groups[planned.group]
        has_teacher_scores = self.group_has_teacher_scores[planned.group]
        examples = []
        for row in planned.rank_rows(self.rank):
            record = self._read(planned.group, int(row), epoch, step)
            rng = np.random.default_rng([self.seed, ROW_STREAM, epoch, int(record["row_id"])])
            examples.append(draw_example(record, self.train_group_size, rng, has_teacher_scores=has_teacher_scores,
                                         shuffle_ratio=self.shuffle_ratio,
                                         borrow=self._borrow(planned.group, int(row), epoch, step)))
        if len(examples) != planned.per_rank:
            raise RuntimeError(f"group {group.name}: epoch {epoch} step {step} got {len(examples)} rows, "
                               f"the plan has {planned.per_rank}")
        return collate_examples(examples, self.token_spec, query_max_len=self.query_max_len,
                                passage_max_len=self.passage_max_len, has_teacher_scores=has_teacher_scores,
                                is_parallel=group.is_parallel, pad_to_multiple_of=self.pad_to_multiple_of)

    def __iter__(self) -> Iterator[dict]:
        epoch, start = self.epoch, self._start_step
        worker = get_worker_info()
        worker_id, num_workers = (0, 1) if worker is None else (worker.id, worker.num_workers)
        # Rows are read by index, so a step either yields its planned rows or raises (a missing shard,
        # a store that keeps failing): an epoch cannot end short without an error.
        for step in range(start + worker_id, len(self), num_workers):
            yield self.batch(epoch, step)

    # ---- Composer checkpoint hooks (state.py: dataset.state_dict(sample_in_epoch, True)) -------------
    def state_dict(self, num_samples: int, from_beginning: bool = True) -> dict:
        """Position after `num_samples` global queries of the current epoch (Composer's count).

        A checkpoint taken at EPOCH_CHECKPOINT has num_samples 0 and the finished epoch's number;
        on resume, EPOCH_START fires there (batch_in_epoch is 0) and DataRefresh sets the next epoch.
        `history` is the epoch's elastic-resume history (plan.plan_epoch), empty without one.
        """
        if not from_beginning:
            raise ValueError("M3TrainDataset.state_dict counts samples from the beginning of the epoch")
        done = np.concatenate([[0], np.cumsum(self.plan(self.epoch).samples_per_step())])
        step = int(np.searchsorted(done, num_samples))
        if step >= len(done) or done[step] != num_samples:
            raise ValueError(f"{num_samples} samples is not a step boundary of epoch {self.epoch}: is "
                             "get_num_samples_in_batch counting queries (collate.num_samples_in_batch)?")
        return {"epoch": self.epoch, "step": step, "seed": self.seed, "world_size": self.world_size,
                "steps_per_epoch": self._steps, "history": [list(h) for h in self._history]}

    def load_state_dict(self, obj: dict) -> None:
        """Resume at (epoch, step). At the checkpoint's world size the plan is the one it was taken with;
        at another world size the epoch goes on with the rows its plan still had (elastic)."""
        if obj.get("seed") != self.seed:
            raise ValueError(f"cannot resume: checkpoint has seed={obj.get('seed')}, this run {self.seed} "
                             "(the epoch plan depends on it)")
        saved_world = int(obj["world_size"])
        # The checkpoint's normal epoch length at its own world size: the same data and batch sizes.
        expected = steps_per_epoch([g.rows for g in self.groups], [g.per_device_batch_size for g in self.groups],
                                   world_size=saved_world, tail=self.tail)
        if obj.get("steps_per_epoch") != expected:
            raise ValueError(f"cannot resume: checkpoint has steps_per_epoch={obj.get('steps_per_epoch')} at world "
                             f"size {saved_world}, this run's data and batch sizes give {expected} there "
                             "(different data, batch sizes or tail rule)")
        history = [(int(w), int(k)) for w, k in obj.get("history", [])]
        step = int(obj["step"])
        if saved_world != self.world_size:
            history.append((saved_world, step))
            log.warning("elastic resume: epoch %d was at step %d on %d rank(s); it goes on with its remaining rows "
                        "on %d rank(s)", int(obj["epoch"]), step, saved_world, self.world_size)
        self.epoch, self._start_step, self._history = int(obj["epoch"]), step, history
        self._log_plan()


# ---- construction helpers ------------------------------------------------------------------------
def _check_arguments(*, tail: str, train_group_size: int, seed: int, shuffle_ratio: float) -> None:
    if tail not in TAIL_RULES:
        raise ValueError(f"tail must be one of {TAIL_RULES}, got {tail!r}")
    if train_group_size < 1:
        raise ValueError(f"train_group_size must be >= 1, got {train_group_size}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if not 0.0 <= shuffle_ratio <= 1.0:
        raise ValueError(f"shuffle_ratio must be in [0, 1], got {shuffle_ratio}")


def _token_spec(tokenizer, token_spec: TokenSpec | None, query_instruction: str | None,
                passage_instruction: str | None) -> TokenSpec:
    """Special and instruction ids: from the tokenizer, or the given spec, or XLM-R's without instructions."""
    if token_spec is not None:
        if query_instruction or passage_instruction:
            raise ValueError("give instructions either as strings with a tokenizer or inside token_spec, not both")
        return token_spec
    if tokenizer is not None:
        return token_spec_from_tokenizer(tokenizer, query_instruction, passage_instruction)
    if query_instruction or passage_instruction:
        raise ValueError("instructions need a tokenizer (or a token_spec with prefix ids)")
    return TokenSpec()


def _rank_and_world_size(world_size: int | None, rank: int | None) -> tuple[int, int]:
    world_size = dist.get_world_size() if world_size is None else int(world_size)
    rank = dist.get_global_rank() if rank is None else int(rank)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world size {world_size}")
    if dist.get_world_size() > 1 and not torch.distributed.is_initialized():
        # Streaming would open and close its own process group on MASTER_PORT, racing with the
        # Trainer's (a 2-rank test hung there); one process group for the whole run avoids that.
        raise RuntimeError("M3TrainDataset under a launcher: call composer.utils.dist.initialize_dist(device) "
                           "before building it")
    return world_size, rank


def _streams_with_rows(train_data: str, local_cache: str | None, where: str) -> list[StreamEntry]:
    """The index's streams that have rows (empty ones are logged and skipped)."""
    if is_remote(train_data) and local_cache is None:
        raise ValueError(f"{train_data} is remote: pass `local_cache`, a cache dir for its shards")
    _, entries = read_streams(train_data, local_cache)
    for e in entries:
        if e.rows <= 0:
            log.warning("%s: stream %s has no rows; skipped", where, e.name)
    streams = [e for e in entries if e.rows > 0]
    if not streams:
        raise ValueError(f"{where}: no stream with rows")
    return streams


def _open_streaming_dataset(train_data: str, local_cache: str | None, streams: list[StreamEntry], where: str, *,
                            download_retry: int, download_timeout: float) -> StreamingDataset:
    """One StreamingDataset over all streams, read by global index; its row counts must match the index.

    Shards written with `SHARD_HASH` are verified on first read: Streaming checks a compressed shard
    when it decompresses it (`validate_hash`), `_verify_shard` the decompressed file once per process
    (it may have sat in the cache since an earlier run). Streams written without hashes are read as before.
    """
    root = train_data.rstrip("/")
    remote = is_remote(train_data) or local_cache
    locals_ = [os.path.join(local_cache, s.path) if local_cache else os.path.join(root, s.path) for s in streams]
    try:
        sd = StreamingDataset(
            streams=[Stream(remote=f"{root}/{s.path}" if remote else None, local=local)
                     for s, local in zip(streams, locals_)],
            batch_size=1, shuffle=False, download_retry=download_retry, download_timeout=download_timeout)
    except Exception as err:  # Streaming reads every stream's MDS index.json here, in stream order
        failed = next((s for s, local in zip(streams, locals_)
                       if not os.path.exists(os.path.join(local, "index.json"))), None)
        which = f"stream {failed.name} ({root}/{failed.path}/index.json)" if failed else "its streams"
        raise DataReadError(f"{train_data}: cannot open {which} (download_retry={download_retry}, "
                            f"download_timeout={download_timeout}s): {type(err).__name__}: {_one_line(err)}") from err
    for s, n in zip(streams, sd.samples_per_stream):
        if int(n) != s.rows:
            raise ValueError(f"{where}: stream {s.name} lists {s.rows} rows but its MDS index has {int(n)}")
    unhashed = []
    for stream_id, (entry, stream) in enumerate(zip(streams, sd.streams)):
        pairs = [pair for shard, sid in zip(sd.shards, sd.stream_per_shard) if sid == stream_id
                 for pair in shard.file_pairs]
        if all(SHARD_HASH in info.hashes for pair in pairs for info in pair if info is not None):
            stream.validate_hash = SHARD_HASH
        else:
            unhashed.append(entry.name)
    if unhashed:
        log.info("%s: streams %s were converted without shard hashes and are read unverified; convert again "
                 "to verify them", where, unhashed)
    return sd


def _shard_files(sd: StreamingDataset, shard_id: int) -> list[tuple[str, Any]]:
    """(local path, FileInfo) of the decompressed files of one shard."""
    stream = sd.streams[sd.stream_per_shard[shard_id]]
    return [(os.path.join(stream.local, stream.split or "", raw.basename), raw)
            for raw, _ in sd.shards[shard_id].file_pairs]


def _shard_name(sd: StreamingDataset, shard_id: int) -> str:
    raw, packed = sd.shards[shard_id].file_pairs[0]
    return (packed or raw).basename


def _verify_shard(sd: StreamingDataset, shard_id: int) -> None:
    """Hash the decompressed files of a shard of a verified stream; a mismatch names the file."""
    from streaming.base.hashing import get_hash

    if not sd.streams[sd.stream_per_shard[shard_id]].validate_hash:
        return
    for path, info in _shard_files(sd, shard_id):
        with open(path, "rb") as f:
            digest = get_hash(SHARD_HASH, f.read())
        if digest != info.hashes[SHARD_HASH]:
            raise ValueError(f"{path}: corrupt shard ({SHARD_HASH} {digest}, its MDS index says "
                             f"{info.hashes[SHARD_HASH]}); delete it from the cache to download it again")


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())

"""The training dataset: one whole, collated per-rank batch per step, from one group on every rank.

`M3TrainDataset` reads a converted dir (`m3_index.json` + one MDS stream per task × bucket,
local or `s3://…`) and yields, step by step, this rank's slice of the global batch that the epoch
plan (`plan.py`) lays out. Rows are read by index from one `StreamingDataset` over all streams and
collated by `collate.py`. The rules it applies (per-bucket batch sizes, same-group batches, the
tail rule, per-epoch re-draws, borrowed negatives) are in docs/recipe.md §Batch sizes, §Epoch plan,
§Collation; why it reads by index instead of using Streaming's sampler, how it owns the epoch and
how it resumes are in docs/architecture.md §Training data: our own epoch plan over random access.

Epochs: call `set_epoch(e)` at every EPOCH_START (`callbacks.data_epoch.DataEpoch` does);
`load_state_dict` sets epoch and step on a mid-epoch resume, also from a checkpoint taken at
another world size (elastic resume: the epoch goes on with the rows its plan still had,
`plan.plan_epoch(history=…)`; `len()` is then the length of that epoch). Use DataLoader workers
without `persistent_workers`; with N workers, worker w serves steps w, w+N, … in plan order.

Each reader (the process, or each DataLoader worker) downloads the shards of its next
`prefetch_steps` steps in background threads (`prefetch.py`); `cache_limit` bounds the node's
shard cache (`cache_limit.py`); `plan="shard_blocks"` draws batches within blocks of shards (plan.py).
Opening the streams is `streams.py`, the shard hash checks `shard_checks.py`; every use of
Streaming's private attributes is in `streaming_internals.py`.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Iterator, Mapping

import numpy as np
import torch.distributed
from composer.utils import dist
from streaming.base.util import bytes_to_int
from torch.utils.data import IterableDataset, get_worker_info

from m3composer.data import buckets
from m3composer.data.collate import (TokenSpec, collate_examples, draw_example, row_passages, token_spec_from_tokenizer,
                                     with_prefix)
from m3composer.data.cache_limit import CacheBound
from m3composer.data.index import INDEX_FILE, StreamEntry
from m3composer.data.negatives import MinedNegatives
from m3composer.data.plan import (PLAN_KINDS, TAIL_RULES, EpochPlan, Group, group_streams, plan_epoch,
                                  plan_epoch_shard_blocks, steps_per_epoch)
from m3composer.data.prefetch import ShardPrefetcher
from m3composer.data.shard_checks import ShardVerifier, shard_name
from m3composer.data.streams import DataReadError, one_line, open_streaming_dataset, streams_with_rows
from m3composer.seeds import ROW_STREAM

log = logging.getLogger(__name__)


class M3TrainDataset(IterableDataset):
    """Per-rank collated batches of the M3 recipe; see the module docstring.

    Args (the names of the `data:` section of the config; the settings below `train_data` and
    above `local_cache` have no default here: their defaults are the config schema's, `config.DataConfig`
    and `TrainConfig.seed`, and `train.build_dataset` passes them):
        train_data: converted dir, local path or `s3://…`.
        train_group_size: G, passages per query (1 positive + G−1 negatives).
        default_batch_size: per-device batch size of buckets the table does not cover.
        batch_size_table: {bucket: {G: per-device batch}}; None = FlagEmbedding's tables (G ∈ {1, 8}).
        max_tokens_per_device_batch: when set, per-device batch sizes come from this token budget.
        query_max_len, passage_max_len: truncation lengths (tokens, `<s>`/`</s>` included).
        small_threshold, drop_threshold: the small-stream merge (0/0 = off).
        tail: one of `plan.TAIL_RULES`.
        seed: plan and draw seed.
        shuffle_ratio: probability of `shuffle_text` on a positive.
        download_retry, download_timeout: Streaming's attempts per download and seconds per download.
        prefetch_steps, prefetch_workers: each reader downloads the shards of its next
            `prefetch_steps` steps with `prefetch_workers` threads (0 steps = off).
        cache_limit: Streaming's `cache_limit` (bytes or "10gb"): the node's shard cache stays
            under it, evicting least-recently-used shards; needs a `local_cache`.
        plan, plan_block_shards: `plan.PLAN_KINDS`; "shard_blocks" draws each group's batches
            within blocks of `plan_block_shards` shards.
        local_cache: cache dir for shards (required for a remote `train_data`; for a local one the
            shards are read in place when None; `train.build_dataset` resolves the schema's default).
        tokenizer: HF tokenizer or local folder, for special ids and instruction ids; or give
            `token_spec` instead (tests with synthetic ids). Default: XLM-R ids, no instructions.
        query_instruction_for_retrieval, passage_instruction_for_retrieval: instruction strings
            (need `tokenizer`); None: none (`train.build_dataset` resolves the schema's `auto`).
        pad_to_multiple_of: pad the collated batches' lengths to a multiple of it.
        world_size, rank: default from the launcher's environment.
        negatives_dir: where `NegativeRefresh` writes its versions (`run_dir/negatives`); None = off.
    """

    def __init__(self, train_data: str, *, train_group_size: int, default_batch_size: int,
                 batch_size_table: Mapping[str, Mapping[int, int]] | None, max_tokens_per_device_batch: int | None,
                 query_max_len: int, passage_max_len: int, small_threshold: int, drop_threshold: int, tail: str,
                 seed: int, shuffle_ratio: float, download_retry: int, download_timeout: float, prefetch_steps: int,
                 prefetch_workers: int, cache_limit: int | str | None, plan: str, plan_block_shards: int,
                 local_cache: str | None = None, tokenizer: Any = None, token_spec: TokenSpec | None = None,
                 query_instruction_for_retrieval: str | None = None,
                 passage_instruction_for_retrieval: str | None = None, pad_to_multiple_of: int | None = None,
                 world_size: int | None = None, rank: int | None = None, negatives_dir: str | None = None):
        _check_arguments(tail=tail, train_group_size=train_group_size, seed=seed, shuffle_ratio=shuffle_ratio)
        _check_reading(prefetch_steps=prefetch_steps, prefetch_workers=prefetch_workers, plan=plan,
                       plan_block_shards=plan_block_shards, cache_limit=cache_limit, local_cache=local_cache,
                       train_data=train_data)
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
        # ranks of this node share one shard cache (Streaming's shared memory per node)
        self.local_world_size = dist.get_local_world_size() if world_size is None else 1
        self.prefetch_steps, self.prefetch_workers = prefetch_steps, prefetch_workers
        self.cache_limit = None if cache_limit is None else bytes_to_int(cache_limit)
        self.plan_kind, self.plan_block_shards = plan, plan_block_shards

        where = f"{train_data}/{INDEX_FILE}"
        if batch_size_table is not None:     # YAML may give the group-size keys as strings
            batch_size_table = {k: {int(g): int(b) for g, b in v.items()} for k, v in batch_size_table.items()}
        self.streams = streams_with_rows(train_data, local_cache, where)
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
        try:
            self._sd = open_streaming_dataset(train_data, local_cache, self.streams, where,
                                              download_retry=download_retry, download_timeout=download_timeout,
                                              cache_limit=self.cache_limit)
        except ValueError as err:
            if self.cache_limit and "cache limit" in str(err).lower():
                raise ValueError(f"{where}: data.cache_limit={cache_limit} is too low: {err}") from err
            raise
        self._shard_bytes = np.array([shard.get_max_size() for shard in self._sd.shards], dtype=np.int64)
        self._cache = None if not self.cache_limit else CacheBound(
            self._sd, self.cache_limit, self._shard_bytes, rank=self.rank, local_world_size=self.local_world_size,
            threads_per_rank=1 + (prefetch_workers if prefetch_steps else 0), train_data=train_data, where=where)
        self._shard_verifier = ShardVerifier(self._sd)

        self._steps = steps_per_epoch([g.rows for g in self.groups], [g.per_device_batch_size for g in self.groups],
                                      world_size=self.world_size, tail=tail)
        if self._steps == 0:
            raise ValueError(f"{where}: no step fits: every group has fewer rows than the tail rule {tail!r} "
                             f"needs at world size {self.world_size}")
        self._plan: EpochPlan | None = None
        self._plan_history: tuple[tuple[int, int], ...] = ()
        self.mined_negatives = MinedNegatives(negatives_dir)     # re-mined negatives (data/negatives.py)
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
            rows, sizes = [g.rows for g in self.groups], [g.per_device_batch_size for g in self.groups]
            if self.plan_kind == "shard_blocks":
                plan = plan_epoch_shard_blocks(rows, sizes, self._group_shard_rows(), block_shards=self.plan_block_shards,
                                               seed=self.seed, epoch=epoch, world_size=self.world_size, tail=self.tail)
            else:
                plan = plan_epoch(rows, sizes, seed=self.seed, epoch=epoch, world_size=self.world_size, tail=self.tail,
                                  history=history)
            if self._cache is not None:
                self._cache.check_plan(plan, self._shards_of_rows, [g.name for g in self.groups])
            self._plan = plan
            self._plan_history = history
        return self._plan

    @property
    def _plan_id(self) -> str:
        return "rows" if self.plan_kind == "rows" else f"{self.plan_kind}/{self.plan_block_shards}"

    def left_out(self, epoch: int) -> dict[str, int]:
        """Rows per group that sit out `epoch` (tail rule)."""
        return {g.name: n for g, n in zip(self.groups, self.plan(epoch).left_out) if n}

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` from its first step (DataEpoch calls this at EPOCH_START)."""
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

    # ---- shards: the plan's rows -> Streaming's shards (prefetch, the cache bound, the shard-aware plan)
    def _group_shard_rows(self) -> list[np.ndarray]:
        """Rows of each shard of each group, in the group's row order (its streams concatenated)."""
        sd = self._sd
        return [np.concatenate([sd.samples_per_shard[sd.shard_offset_per_stream[i]:
                                                     sd.shard_offset_per_stream[i] + sd.shards_per_stream[i]]
                                for i in g.streams]) for g in self.groups]

    def _shards_of_rows(self, group: int, rows: np.ndarray) -> np.ndarray:
        """The distinct shard ids behind group-local `rows` (the vector form of `_sample_index`)."""
        starts = self._group_row_starts[group]
        member = np.searchsorted(starts, rows, side="right") - 1
        stream = np.asarray(self.groups[group].streams)[member]
        samples = self._stream_offset[stream] + rows - starts[member]
        return np.unique(np.searchsorted(self._sd.sample_offset_per_shard, samples, side="right") - 1)

    def _prefetcher(self, epoch: int, steps: range, num_workers: int) -> ShardPrefetcher | None:
        if self.prefetch_steps == 0 or not len(steps) or self._sd.streams[0].remote is None:
            return None         # read in place: nothing to download (shards are decompressed where they lie)
        plan = self.plan(epoch)
        mine = [self._shards_of_rows(plan.steps[s].group, plan.steps[s].rank_rows(self.rank)) for s in steps]
        budget, release = None, None
        if self._cache is not None:
            budget, release = self._cache.reader_window(plan, steps, num_workers, self._shards_of_rows)
        return ShardPrefetcher(self._sd, mine, lookahead=self.prefetch_steps, workers=self.prefetch_workers,
                               budget_bytes=budget,
                               release_after={p: np.asarray(v) for p, v in (release or {}).items()})

    def _read(self, group: int, row: int, epoch: int, step: int) -> dict:
        stream, sample = self._sample_index(group, row)
        shard = int(self._sd.spanner[sample][0])
        try:
            record = self._sd[sample]
            self._shard_verifier.check(shard)
            return record
        except Exception as err:  # a missing/corrupt shard or a store that keeps failing: fail the epoch loudly
            raise DataReadError(f"{self.train_data}: stream {self.streams[stream].name}: cannot read row {row} of "
                                f"group {self.groups[group].name} (sample {sample}, shard "
                                f"{shard_name(self._sd, shard)}) for epoch {epoch} step {step}: "
                                f"{type(err).__name__}: {one_line(err)}") from err

    def stream_rows(self, stream: int) -> Iterator[dict]:
        """Every MDS row of `self.streams[stream]` in order (the pool NegativeRefresh mines from)."""
        start = int(self._stream_offset[stream])
        for sample in range(start, start + self.streams[stream].rows):
            yield self._sd[sample]

    def head_fit_sample(self, max_passages: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Model-ready token ids (prefixed and truncated as the collator does) of up to `max_passages`
        distinct passages and their rows' queries, from the first rows of every stream in proportion
        to its rows (every task and bucket is represented, and only the first shards of each stream
        are read: a sample that stays cheap on remote data). For fitting a fresh head
        (`model.new_sparse_head_init: idf`)."""
        total = sum(stream.rows for stream in self.streams)
        spec, want_rows = self.token_spec, max(1, max_passages // 2)
        passages, seen, queries = [], set(), []
        for s, stream in enumerate(self.streams):
            take = max(1, math.ceil(want_rows * stream.rows / total))
            for i, row in enumerate(self.stream_rows(s)):
                if i >= take:
                    break
                queries.append(with_prefix(row["query"], spec.query_prefix, self.query_max_len, spec.eos_id))
                positives, negatives = row_passages(row)
                for p in positives + negatives:
                    seq = with_prefix(p, spec.passage_prefix, self.passage_max_len, spec.eos_id)
                    if seq.tobytes() not in seen:
                        seen.add(seq.tobytes())
                        passages.append(seq)
        return passages[:max_passages], queries

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
        # Teacher scores scored the converted negatives, not re-mined ones (docs/recipe.md §Negative refresh).
        has_teacher_scores = self.group_has_teacher_scores[planned.group] and not self.mined_negatives.active(epoch)
        examples = []
        for row in planned.rank_rows(self.rank):
            record = self.mined_negatives.apply(self._read(planned.group, int(row), epoch, step), epoch)
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
        steps = range(start + worker_id, len(self), num_workers)
        prefetcher = self._prefetcher(epoch, steps, num_workers)
        if prefetcher is None:
            for step in steps:
                yield self.batch(epoch, step)
            return
        with prefetcher:      # closed at the end, on an error, and when the loader drops the iterator
            for position, step in enumerate(steps):
                prefetcher.before_step(position)
                batch = self.batch(epoch, step)
                prefetcher.after_step(position)
                yield batch

    # ---- Composer checkpoint hooks (state.py: dataset.state_dict(sample_in_epoch, True)) -------------
    def state_dict(self, num_samples: int, from_beginning: bool = True) -> dict:
        """Position after `num_samples` global queries of the current epoch (Composer's count).

        A checkpoint taken at EPOCH_CHECKPOINT has num_samples 0 and the finished epoch's number;
        on resume, EPOCH_START fires there (batch_in_epoch is 0) and DataEpoch sets the next epoch.
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
                "steps_per_epoch": self._steps, "history": [list(h) for h in self._history],
                "negatives": self.mined_negatives.state_dict(), "plan": self._plan_id}

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
        if obj.get("plan", "rows") != self._plan_id:     # checkpoints before data.plan: rows
            raise ValueError(f"cannot resume: checkpoint has plan={obj.get('plan', 'rows')}, this run {self._plan_id} "
                             "(the epoch plan depends on it)")
        history = [(int(w), int(k)) for w, k in obj.get("history", [])]
        step = int(obj["step"])
        if saved_world != self.world_size:
            if self.plan_kind != "rows":
                raise ValueError(f"cannot resume a checkpoint of world size {saved_world} on {self.world_size} rank(s) "
                                 f"with data.plan={self.plan_kind}: elastic resume re-chunks the rows plan only")
            history.append((saved_world, step))
            log.warning("elastic resume: epoch %d was at step %d on %d rank(s); it goes on with its remaining rows "
                        "on %d rank(s)", int(obj["epoch"]), step, saved_world, self.world_size)
        self.epoch, self._start_step, self._history = int(obj["epoch"]), step, history
        self.mined_negatives.load_state_dict(obj.get("negatives"))     # the version the checkpointed run served
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


def _check_reading(*, prefetch_steps: int, prefetch_workers: int, plan: str, plan_block_shards: int,
                   cache_limit, local_cache: str | None, train_data: str) -> None:
    if prefetch_steps < 0 or prefetch_workers < 1:
        raise ValueError(f"prefetch_steps must be >= 0 and prefetch_workers >= 1, got {prefetch_steps}, "
                         f"{prefetch_workers}")
    if plan not in PLAN_KINDS:
        raise ValueError(f"plan must be one of {PLAN_KINDS}, got {plan!r}")
    if plan_block_shards < 1:
        raise ValueError(f"plan_block_shards must be >= 1, got {plan_block_shards}")
    if cache_limit is not None and local_cache is None:
        # read in place, Streaming's eviction would delete the dataset's own shards
        raise ValueError(f"{train_data}: cache_limit needs a local_cache (a cache dir apart from the data)")


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

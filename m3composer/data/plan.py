"""The epoch plan: which rows form each step's global batch, as a pure function of (seed, epoch, W).

Streams (one task × length bucket each, from `m3_index.json`) become groups (`group_streams`: a
stream on its own, or a task's small streams merged); every global batch comes from one group;
rank r takes its slice of it. The rules and how they compare with FlagEmbedding's
`SameDatasetTrainDataset.refresh_epoch` are in docs/recipe.md §Small-stream merge, §Epoch plan,
§Tail rule. Rows that sit out an epoch under the tail rule are counted in `EpochPlan.left_out`
and logged by the dataset.

Epoch e draws from `default_rng([seed, PLAN_STREAM, e])` (every purpose tag is in
`m3composer/seeds.py`), so any step of any epoch can be recomputed directly, which is what makes
resume exact.

Elastic resume (docs/recipe.md §Elastic resume): an epoch begun at world size W and continued
at W' after k steps is `plan_epoch(..., world_size=W', history=[(W, k)])`: its first k steps are
the W plan's, then the rows of each group that the W plan had for its later steps are chunked
again for W' under the same tail rule. Still a pure function, so it resumes exactly too.
"""
from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from m3composer.data.index import StreamEntry
from m3composer.seeds import ELASTIC_STREAM, PLAN_STREAM, SHARD_BLOCK_STREAM

log = logging.getLogger(__name__)

TAIL_RULES = ("keep_if_ge_2W", "drop_partial")


@dataclass(frozen=True)
class Group:
    """A batching unit: every global batch is drawn from exactly one group."""
    name: str
    streams: tuple[int, ...]      # positions in the index's stream list; rows are concatenated in this order
    rows: int
    per_device_batch_size: int
    is_parallel: bool
    has_teacher_scores: bool


def group_streams(streams: Sequence[StreamEntry], batch_sizes: Sequence[int], *,
                  small_threshold: int, drop_threshold: int) -> tuple[list[Group], list[str]]:
    """The small-stream merge (docs/recipe.md §Small-stream merge): (groups, names of dropped merged groups).

    Streams with `0 < rows < small_threshold` are merged per (task, has_teacher_scores, is_parallel) into one
    group named `<task>/small` whose batch size is the members' minimum; a merged group with fewer
    than `drop_threshold` rows is dropped. Streams with 0 rows are never a group.
    """
    groups: list[Group] = []
    small: dict[tuple[str, bool, bool], list[int]] = defaultdict(list)
    for i, stream in enumerate(streams):
        if stream.rows <= 0:
            continue
        if stream.rows < small_threshold:
            small[(stream.task, stream.has_teacher_scores, stream.is_parallel)].append(i)
        else:
            groups.append(Group(stream.name, (i,), stream.rows, int(batch_sizes[i]), stream.is_parallel,
                                stream.has_teacher_scores))
    dropped: list[str] = []
    keys_per_task = defaultdict(int)
    for task, _, _ in small:
        keys_per_task[task] += 1
    for (task, has_teacher_scores, is_parallel), members in small.items():
        name = f"{task}/small"
        if keys_per_task[task] > 1:  # a task whose small streams differ in scores/parallel: keep names unique
            name += f"-{'scores' if has_teacher_scores else 'noscores'}{'-parallel' if is_parallel else ''}"
        total = sum(streams[i].rows for i in members)
        if total < drop_threshold:
            dropped.append(name)
            log.warning("dropping merged small streams %s of task %s: %d rows < drop_threshold %d",
                        [streams[i].name for i in members], task, total, drop_threshold)
            continue
        groups.append(Group(name, tuple(members), total, min(int(batch_sizes[i]) for i in members),
                            is_parallel, has_teacher_scores))
    return groups, dropped


@dataclass(frozen=True)
class Step:
    """One global batch: `rows` are group-local row indices, rank r's slice is `rank_rows(r)`."""
    group: int
    rows: np.ndarray          # exactly per_rank × W rows (leftovers are not part of the step)
    per_rank: int

    def rank_rows(self, rank: int) -> np.ndarray:
        return self.rows[rank * self.per_rank:(rank + 1) * self.per_rank]


@dataclass(frozen=True)
class EpochPlan:
    epoch: int
    world_size: int
    steps: list[Step]
    left_out: list[int]       # per group: rows that sit out this epoch (tail rule)
    # Steps before this index were planned at another world size (an elastic resume, `history`):
    # they are already trained, and only their rows and sizes are meaningful here.
    first_step_at_world_size: int = 0

    def __len__(self) -> int:
        return len(self.steps)

    def samples_per_step(self) -> np.ndarray:
        """Global queries of each step (what Composer counts with get_num_samples_in_batch × W)."""
        return np.array([len(s.rows) for s in self.steps], dtype=np.int64)


def _chunk_sizes(rows: int, per_device_batch_size: int, world_size: int, tail: str) -> list[int]:
    """Global batch sizes of one group, in order; the last may be short (tail rule)."""
    if tail not in TAIL_RULES:
        raise ValueError(f"tail must be one of {TAIL_RULES}, got {tail!r}")
    if per_device_batch_size < 1 or world_size < 1:
        raise ValueError(f"per_device_batch_size and world_size must be >= 1, got {per_device_batch_size}, {world_size}")
    global_batch = per_device_batch_size * world_size
    full, rest = divmod(rows, global_batch)
    sizes = [global_batch] * full
    if rest and tail == "keep_if_ge_2W" and rest >= 2 * world_size:
        sizes.append(rest - rest % world_size)
    return sizes


def steps_per_epoch(group_rows: Sequence[int], per_device_batch_sizes: Sequence[int], *,
                    world_size: int, tail: str) -> int:
    """Number of steps of every epoch (it does not depend on the epoch; an elastically resumed epoch differs)."""
    return sum(len(_chunk_sizes(n, b, world_size, tail)) for n, b in zip(group_rows, per_device_batch_sizes))


def _chunk_and_shuffle(orders: Sequence[np.ndarray], per_device_batch_sizes: Sequence[int], world_size: int,
                       tail: str, rng: np.random.Generator) -> list[Step]:
    """Each group's rows, in the given order, cut into global batches; then the steps in random order."""
    steps: list[Step] = []
    for g, (order, batch) in enumerate(zip(orders, per_device_batch_sizes)):
        start = 0
        for size in _chunk_sizes(len(order), batch, world_size, tail):
            steps.append(Step(g, order[start:start + size], size // world_size))
            start += size
    shuffled = rng.permutation(len(steps))
    return [steps[i] for i in shuffled]


def plan_epoch(group_rows: Sequence[int], per_device_batch_sizes: Sequence[int], *, seed: int, epoch: int,
               world_size: int, tail: str, history: Sequence[tuple[int, int]] = ()) -> EpochPlan:
    """The steps of `epoch`: identical on every rank, a pure function of its arguments.

    `history` is empty for an epoch run at one world size. After elastic resumes it lists, in order,
    `(world size, steps of the epoch done when it stopped)`: the epoch began at `history[0][0]`; after
    `history[i][1]` steps (counted from the epoch's start) it went on at the next entry's world size,
    the last time at `world_size`. The done steps are kept as they were; each group's rows that they
    still had for later steps, in the epoch's row order, are chunked again for the new world size (same
    tail rule) and the new steps drawn in a new random order. No row is planned twice in an epoch; a row
    is left out only by a tail rule (at the world size that planned it).
    """
    if len(group_rows) != len(per_device_batch_sizes):
        raise ValueError("group_rows and per_device_batch_sizes differ in length")
    if seed < 0 or epoch < 0:
        raise ValueError(f"seed and epoch must be >= 0, got {seed}, {epoch}")
    rng = np.random.default_rng([seed, PLAN_STREAM, epoch])
    orders = [rng.permutation(rows) for rows in group_rows]
    sizes = per_device_batch_sizes
    world_sizes = [int(w) for w, _ in history] + [int(world_size)]
    steps = _chunk_and_shuffle(orders, sizes, world_sizes[0], tail, rng)
    previous_done = 0
    for i, (_, done) in enumerate(history):
        done = int(done)
        if not previous_done <= done <= len(steps):
            raise ValueError(f"history {list(history)}: entry {i} has {done} steps done; the epoch's plan at that "
                             f"point has {len(steps)} steps and {previous_done} were done before")
        kept = steps[:done]
        # Rows the plan still has for later steps: planned, and not taken by a done step. Rows the tail
        # rule had left out stay out (the epoch never trains more rows than it was planned with).
        remaining_mask = [np.zeros(n, dtype=bool) for n in group_rows]
        for j, step in enumerate(steps):
            remaining_mask[step.group][step.rows] = j >= done
        remaining = [order[mask[order]] for order, mask in zip(orders, remaining_mask)]
        rng_i = np.random.default_rng([seed, ELASTIC_STREAM, epoch, i, done, world_sizes[i + 1]])
        steps = kept + _chunk_and_shuffle(remaining, sizes, world_sizes[i + 1], tail, rng_i)
        previous_done = done
    planned = [0] * len(group_rows)
    for step in steps:
        planned[step.group] += len(step.rows)
    return EpochPlan(epoch, world_size, steps, [n - p for n, p in zip(group_rows, planned)],
                     first_step_at_world_size=previous_done)


# ---- the shard-aware plan (data.plan: shard_blocks) ------------------------------------------------
PLAN_KINDS = ("rows", "shard_blocks")


def plan_epoch_shard_blocks(group_rows: Sequence[int], per_device_batch_sizes: Sequence[int],
                            group_shard_rows: Sequence[Sequence[int]], *, block_shards: int, seed: int, epoch: int,
                            world_size: int, tail: str) -> EpochPlan:
    """The steps of `epoch` with batch membership drawn within blocks of shards (docs/recipe.md §Shard-aware plan).

    `group_shard_rows[g]` are the rows of group g's shards in the group's row order (they sum to
    `group_rows[g]`). Per group: the shards are shuffled, cut into blocks of `block_shards`, the
    rows of each block shuffled, and the concatenation cut into global batches exactly as
    `plan_epoch` does (same sizes, same tail rule, same step count). Each group's steps then keep
    their block order and the groups are interleaved at random, so a window of steps touches at
    most about two blocks per group. Like `plan_epoch`, a pure function of its arguments.
    """
    if len(group_rows) != len(per_device_batch_sizes) or len(group_rows) != len(group_shard_rows):
        raise ValueError("group_rows, per_device_batch_sizes and group_shard_rows differ in length")
    if block_shards < 1:
        raise ValueError(f"block_shards must be >= 1, got {block_shards}")
    if seed < 0 or epoch < 0:
        raise ValueError(f"seed and epoch must be >= 0, got {seed}, {epoch}")
    rng = np.random.default_rng([seed, SHARD_BLOCK_STREAM, epoch])
    per_group: list[list[Step]] = []
    left_out: list[int] = []
    for g, (rows, batch, shard_rows) in enumerate(zip(group_rows, per_device_batch_sizes, group_shard_rows)):
        shard_rows = np.asarray(shard_rows, dtype=np.int64)
        if int(shard_rows.sum()) != rows or (shard_rows < 0).any():
            raise ValueError(f"group {g}: shard rows {shard_rows.tolist()} do not add up to its {rows} rows")
        starts = np.concatenate([[0], np.cumsum(shard_rows)[:-1]])
        shuffled = rng.permutation(len(shard_rows))
        blocks = [shuffled[i:i + block_shards] for i in range(0, len(shuffled), block_shards)]
        order = np.concatenate([rng.permutation(np.concatenate(
            [np.arange(starts[s], starts[s] + shard_rows[s]) for s in block])) for block in blocks] or [[]])
        order = order.astype(np.int64)
        steps, start = [], 0
        for size in _chunk_sizes(rows, batch, world_size, tail):
            steps.append(Step(g, order[start:start + size], size // world_size))
            start += size
        per_group.append(steps)
        left_out.append(rows - start)
    labels = rng.permutation(np.repeat(np.arange(len(per_group)), [len(s) for s in per_group]))
    taken = [0] * len(per_group)
    steps = []
    for g in labels:
        steps.append(per_group[g][taken[g]])
        taken[g] += 1
    return EpochPlan(epoch, world_size, steps, left_out)

"""NegativeRefresh: re-mine the training rows' hard negatives with the model being trained, at
epoch boundaries, and serve them from the next epoch on (`callbacks.negative_refresh`).

At the `EPOCH_END` of every `interval_epochs`-th epoch (not after the last one) every rank:

1. builds the training data's own pool once (data/negatives.py: per stream, identical passages
   once) and keeps it for later refreshes;
2. encodes its contiguous share of the pool and of the rows' queries with the chosen head
   (`retrieval/refresh.py`), prefixed and truncated as in training. Dense: the pool's vectors are
   gathered onto every rank, each rank mines its share of the rows with faiss and the choices are
   gathered. Sparse, ColBERT, ensemble: the pool stays sharded, the queries' representations are
   gathered, each rank ranks every query against its share of the pool and the top-k lists are
   gathered and merged. Either way `m3c mine`'s rules (rank range, positive-aware filter, seeded
   draw) pick the negatives and every rank holds the one result;
4. rank 0 writes `run_dir/negatives/v{N}/` (N = the refresh's number, epoch / interval) and the
   pool atomically; after a barrier every rank loads v{N} from disk into the dataset, checks it is
   the result it gathered, and the dataset serves it from the next epoch.

The dataset's checkpoint state records the version (`MinedNegatives.state_dict`), so a resumed run
reads the same files back. A run killed during a refresh resumes from a checkpoint taken before it
(the epoch's checkpoint comes after `EPOCH_END`) and mines again from the same weights, so it gets
the same negatives. Nothing is kept on the callback across a resume except the pool, which is
rebuilt from the data.

Test hook: with the environment variable `M3C_TEST_KILL_DURING_REFRESH=N`, rank 0 SIGKILLs its own
process while refresh N's folder is written but not yet swapped in (tests/callbacks/test_negative_refresh.py).
"""
from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path
from typing import Optional

import numpy as np
from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist

from m3composer.data.collate import with_prefix
from m3composer.data.negatives import (TrainingPool, build_pool, version_arrays, version_sha256, write_pool,
                                       write_version)
from m3composer.distributed import gather_rows, shard
from m3composer.model.inference import unwrap_m3
from m3composer.model.scores import SCORE_NAMES
from m3composer.retrieval.refresh import encode_token_ids, mine_rows, mine_rows_sharded_pool

log = logging.getLogger(__name__)

KILL_HOOK_ENV = "M3C_TEST_KILL_DURING_REFRESH"


class NegativeRefresh(Callback):
    """Re-mine negatives every `interval_epochs` epochs; see the module doc.

    The settings are the run schema's `callbacks.negative_refresh` section (defaults and meanings in
    m3composer/config.py); `train.negative_refresh_settings` translates it.

    Args:
        folder: where versions are written (`run_dir/negatives`; the dataset's `negatives_dir`).
        interval_epochs: refresh after epochs interval, 2·interval, …
        head: the ranking head: dense, sparse, colbert or ensemble (`m3c mine --head`; how each is
            shared among ranks: retrieval/refresh.py).
        rank_range, negatives, max_score_ratio, margin: `m3c mine`'s `--range`, `--negatives`,
            `--max-score-ratio`, `--margin`.
        batch_size: encoding batch.
        seed: the draw's seed (the run's).
    """

    def __init__(self, folder: str | os.PathLike, *, interval_epochs: int, head: str, rank_range: tuple[int, int],
                 negatives: int, max_score_ratio: Optional[float], margin: Optional[float], batch_size: int,
                 seed: int):
        if head not in SCORE_NAMES:
            raise ValueError(f"NegativeRefresh: head must be one of {SCORE_NAMES}, got {head!r}")
        if interval_epochs < 1 or negatives < 1 or batch_size < 1:
            raise ValueError("NegativeRefresh: interval_epochs, negatives and batch_size must be >= 1")
        self.folder = Path(folder)
        self.interval_epochs = interval_epochs
        self.head = head
        self.rank_range = tuple(rank_range)
        self.negatives = negatives
        self.max_score_ratio = max_score_ratio
        self.margin = margin
        self.batch_size = batch_size
        self.seed = seed
        self._pool: Optional[TrainingPool] = None
        self.history: list[dict] = []      # meta of every refresh this process ran (tests, callers)

    def epoch_end(self, state: State, logger: Logger) -> None:
        # timestamp has moved to the next epoch when EPOCH_END fires (see DataEpoch)
        next_epoch = int(state.timestamp.epoch)
        elapsed = state.get_elapsed_duration()
        if next_epoch % self.interval_epochs or (elapsed is not None and elapsed.value >= 1):
            return              # not a refresh epoch, or training ends here: nothing would serve it
        self.refresh(state, logger, version=next_epoch // self.interval_epochs, from_epoch=next_epoch)

    def refresh(self, state: State, logger: Logger, *, version: int, from_epoch: int) -> dict:
        """`run` on the Trainer's model and training dataset, and log the figures."""
        meta = self.run(state.model, state.train_dataloader.dataset, version=version, from_epoch=from_epoch,
                        batch=int(state.timestamp.batch))
        logger.log_metrics({"negatives/version": version, "negatives/refresh_seconds": meta["seconds"]["total"],
                            "negatives/rows_with_fewer_negatives": meta["rows_with_fewer_negatives"],
                            "negatives/dropped_by_score": meta["dropped_by_score"]})
        return meta

    def run(self, model, dataset, *, version: int, from_epoch: int, batch: int = 0) -> dict:
        """Mine version `version` with `model` (an M3Model or a wrapper) for `dataset` (an
        M3TrainDataset), write it, and make the dataset serve it from `from_epoch`; every rank
        calls this. Returns the version's meta (counts, seconds)."""
        started = time.perf_counter()
        rank, world = dist.get_global_rank(), dist.get_world_size()
        if self._pool is None:
            self._pool = build_pool(dataset.stream_rows(s) for s in range(len(dataset.streams)))
            if any(dataset.group_has_teacher_scores) and rank == 0:
                log.warning("from epoch %d no stream is served with teacher scores: they scored the converted "
                            "negatives, not the mined ones (docs/recipe.md §Negative refresh)", from_epoch)
        pool, spec = self._pool, dataset.token_spec
        device = next(unwrap_m3(model).parameters()).device

        lo, hi, size = shard(len(pool.passages), rank, world)
        passages = [with_prefix(p, spec.passage_prefix, dataset.passage_max_len, spec.eos_id)
                    for p in pool.passages[lo:hi]]
        queries = [with_prefix(q, spec.query_prefix, dataset.query_max_len, spec.eos_id) for q in pool.queries]
        options = dict(rank_range=self.rank_range, negatives=self.negatives, seed=self.seed, version=version,
                       max_score_ratio=self.max_score_ratio, margin=self.margin)
        if self.head == "dense":
            pool_vecs = gather_rows(encode_token_ids(model, passages, spec.pad_id, self.batch_size),
                                    len(pool.passages), size, device)
            encoded_pool = time.perf_counter()
            lo, hi, size = shard(len(pool.row_ids), rank, world)
            rows = np.arange(lo, hi)
            query_vecs = encode_token_ids(model, queries[lo:hi], spec.pad_id, self.batch_size)
            chosen, counts = mine_rows(pool, rows, query_vecs, pool_vecs, **options)
            chosen = gather_rows(chosen, len(pool.row_ids), size, device)
            keys = sorted(counts)
            totals = gather_rows(np.array([[counts[k] for k in keys]], dtype=np.int64), world, 1,
                                 device).sum(axis=0)
            counts = {k: int(v) for k, v in zip(keys, totals)}
            seconds = {"encode_pool": round(encoded_pool - started, 3),
                       "encode_queries_and_mine": round(time.perf_counter() - encoded_pool, 3)}
        else:
            # the pool stays sharded; every rank ends with every row's choice (retrieval/refresh.py)
            chosen, counts = mine_rows_sharded_pool(model, pool, queries, dict(zip(range(lo, hi), passages)),
                                                    head=self.head, pad_id=spec.pad_id, batch_size=self.batch_size,
                                                    **options)
            seconds = {"encode_and_mine": round(time.perf_counter() - started, 3)}

        pool_sha = pool.sha256
        meta = {"version": version, "from_epoch": from_epoch, "mined_after_epoch": from_epoch - 1,
                "batch": batch, "head": self.head, "range": list(self.rank_range),
                "negatives_per_row": self.negatives, "max_score_ratio": self.max_score_ratio, "margin": self.margin,
                "pool_passages": len(pool.passages), "world_size": world, **counts, "seconds": seconds}
        if rank == 0:
            write_pool(self.folder, pool)
            meta = write_version(self.folder, version, pool.row_ids, chosen, pool_sha, meta,
                                 before_publish=_kill_hook(version))
        dist.barrier()
        served = dataset.mined_negatives.use(version, from_epoch)
        expected = version_sha256(*version_arrays(pool.row_ids, chosen), pool_sha)
        if served.sha256 != expected:
            raise RuntimeError(f"rank {rank}: {self.folder}/v{version} holds {served.sha256}, not the gathered "
                               f"result {expected}")
        seconds = time.perf_counter() - started
        meta = dict(served.meta, seconds=dict(served.meta["seconds"], total=round(seconds, 3)))
        self.history.append(meta)
        log.info("rank %d serves mined negatives v%d (sha256 %s) from epoch %d: %d rows, pool %d, %d rows with fewer "
                 "than %d, %d candidates dropped by the score filter, %.1f s", rank, version, served.sha256[:16],
                 from_epoch, len(pool.row_ids), len(pool.passages), counts["rows_with_fewer_negatives"],
                 self.negatives, counts["dropped_by_score"], seconds)
        return meta


def _kill_hook(version: int):
    """The test hook of the module doc, or None."""
    if os.environ.get(KILL_HOOK_ENV) != str(version):
        return None

    def kill(_tmp: Path) -> None:
        os.kill(os.getpid(), signal.SIGKILL)
    return kill

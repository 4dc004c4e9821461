"""Tiny converted dirs (MDS streams + m3_index.json, the contract of docs/architecture.md) with
synthetic token ids that say which row and passage they are, for the data tests.

Ids: query of row r = [<s>=0, 10, r, (filler 7)…, </s>=2]; positive j = [0, 11, r, j, …, 2];
negative n = [0, 12, r, n, …, 2]. So a collated batch tells which passages were drawn.

Also the 2-rank resume script: `composer -n 2 m3_tiny_data.py DATA OUT PHASE` (see test_resume.py).
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from composer.models import ComposerModel
from streaming import MDSWriter

COLUMNS = {
    "query": "ndarray:int32", "passages": "ndarray:int32", "passage_offsets": "ndarray:int32",
    "num_pos": "int32", "scores": "ndarray:float32", "row_id": "int64", "source": "str",
}


@dataclass
class StreamSpec:
    task: str
    bucket: str
    rows: int
    num_pos: int = 2
    num_neg: int | list[int] = 3        # per row: an int for all rows or a list
    has_teacher_scores: bool = False
    first_row_id: int = 0
    passage_len: int = 6                 # content tokens per passage (ids 0/2 added around)
    bucket_hi: int | None = 500
    extra: dict = field(default_factory=dict)


def _concat(passages: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.cumsum([0] + [len(p) for p in passages]).astype(np.int32)
    return np.concatenate(passages).astype(np.int32), offsets


def passage_ids(kind: int, row_id: int, j: int, length: int) -> np.ndarray:
    return np.array([0, kind, row_id, j] + [7] * max(0, length - 3) + [2], dtype=np.int32)


def write_converted(out: str | os.PathLike, specs: list[StreamSpec], size_limit: int = 1 << 10) -> Path:
    """Write one MDS stream per spec under out/<task>/<bucket>/ and out/m3_index.json."""
    out = Path(out)
    entries = []
    for spec in specs:
        rel = f"{spec.task}/{spec.bucket}"
        neg_counts = spec.num_neg if isinstance(spec.num_neg, list) else [spec.num_neg] * spec.rows
        rng = np.random.default_rng(spec.first_row_id + 1)
        with MDSWriter(out=str(out / rel), columns=COLUMNS, compression="zstd", size_limit=size_limit) as writer:
            for i in range(spec.rows):
                r = spec.first_row_id + i
                pos = [passage_ids(11, r, j, spec.passage_len) for j in range(spec.num_pos)]
                neg = [passage_ids(12, r, n, spec.passage_len) for n in range(neg_counts[i])]
                ids, offsets = _concat(pos + neg)
                # positives score 1..2, negatives 0..1: a teacher ranks every positive first
                scores = (np.concatenate([rng.random(len(pos)) + 1, rng.random(len(neg))]).astype(np.float32)
                          if spec.has_teacher_scores else np.full(len(pos) + len(neg), np.nan, np.float32))
                writer.write({"query": np.array([0, 10, r, 7, 2], dtype=np.int32), "passages": ids,
                              "passage_offsets": offsets, "num_pos": len(pos), "scores": scores,
                              "row_id": r, "source": f"{spec.task}_{spec.bucket}.jsonl:{i + 1}"})
        entries.append({"name": rel, "path": rel, "task": spec.task, "bucket": spec.bucket, "bucket_lo": 0,
                        "bucket_hi": spec.bucket_hi, "rows": spec.rows, "is_parallel": spec.task.startswith("parallel_"),
                        "has_teacher_scores": spec.has_teacher_scores, "min_neg": min(neg_counts), "max_neg": max(neg_counts),
                        "tokens": {"query_len_max": 5, "passage_len_max": spec.passage_len + 2}, **spec.extra})
    (out / "m3_index.json").write_text(json.dumps({"version": 2, "tokenizer": "synthetic", "streams": entries}))
    return out


# ---- the Composer run used by the resume tests (1 rank in-process, 2 ranks under the launcher) -----------------

RESUME_SPECS = [
    StreamSpec("t1", "len-0-500", 23, first_row_id=0),
    StreamSpec("t1", "len-500-1000", 10, first_row_id=1000, bucket_hi=1000),
    StreamSpec("parallel_t2", "len-0-500", 14, first_row_id=2000, has_teacher_scores=True),
]
RESUME_TABLE = {"len-0-500": {4: 3}, "len-500-1000": {4: 2}}


class Dummy(ComposerModel):
    """One parameter and a loss that ignores the data: the Trainer runs, only the batches matter."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, batch):
        return self.w * batch["query_input_ids"].shape[0]

    def loss(self, outputs, batch):
        return (outputs - 1).pow(2).sum()

    def get_metrics(self, is_train=False):
        return {}


def run_composer(data: str, record: str, *, max_duration: str, save_folder: str | None = None,
                 load_path: str | None = None, num_workers: int = 0) -> int:
    """Train a dummy model on M3TrainDataset, recording every batch's (batch, epoch, row_ids, passage ids)."""
    from composer import Callback, Trainer
    from torch.utils.data import DataLoader

    from m3composer.data.collate import make_data_spec
    from m3composer.data.dataset import M3TrainDataset
    from m3composer.testing.settings import dataset_settings

    class SetEpoch(Callback):
        def epoch_start(self, state, logger):
            state.dataloader.dataset.set_epoch(int(state.timestamp.epoch))

    class Record(Callback):
        def __init__(self):
            self.rows = []

        def after_dataloader(self, state, logger):
            b = state.batch
            self.rows.append({"batch": int(state.timestamp.batch), "epoch": int(state.timestamp.epoch),
                              "row_ids": b["row_ids"].tolist(),
                              "passages": b["passage_input_ids"][:, 1:4].tolist()})

        def fit_end(self, state, logger):
            Path(record).write_text(json.dumps(self.rows))

    from composer.utils import dist
    dist.initialize_dist("cpu")       # before the dataset: one process group for Streaming and the Trainer
    dataset = M3TrainDataset(data, **dataset_settings(train_group_size=4, default_batch_size=2, seed=5,
                                                      batch_size_table=RESUME_TABLE, query_max_len=16,
                                                      passage_max_len=16))
    model = Dummy()
    trainer = Trainer(model=model, train_dataloader=make_data_spec(DataLoader(dataset, batch_size=None,
                                                                               num_workers=num_workers)),
                      optimizers=torch.optim.SGD(model.parameters(), lr=0.0), max_duration=max_duration,
                      device="cpu", device_train_microbatch_size=dataset.max_per_device_batch_size,
                      callbacks=[Record(), SetEpoch()], save_folder=save_folder, save_interval="3ba",
                      save_num_checkpoints_to_keep=-1, save_overwrite=True, load_path=load_path,
                      progress_bar=False, log_to_console=False, seed=3)
    trainer.fit()
    trainer.close()
    return len(dataset)


if __name__ == "__main__":   # composer -n 2 m3_tiny_data.py DATA OUTDIR full MAX_DURATION NUM_WORKERS
    data, outdir, phase = sys.argv[1], sys.argv[2], sys.argv[3]
    assert phase == "full", phase
    rank = int(os.environ.get("RANK", 0))
    run_composer(data, f"{outdir}/full-rank{rank}.json", max_duration=sys.argv[4], save_folder=f"{outdir}/ckpt",
                 num_workers=int(sys.argv[5]))

"""NegativeRefresh (m3composer/callbacks/negative_refresh.py) in real training runs: the tiny model
on real text (8 rows of Python's own `pydoc_data` topics, with teacher scores), 3 epochs of 2
steps, a refresh after epochs 0 and 1. (Pools of several streams: tests/data/test_negatives.py.)

* mined negatives come from the row's own stream, never its positives, and are served from the
  next epoch on;
* SIGKILL during the second refresh (test hook: after its folder is written, before it is swapped
  in), then the same command: the restart resumes from the checkpoint in epoch 1 (which records
  v1, so it reads v1 back from disk and serves it for the epoch's last step), mines v2 again, and every step of both runs logs the losses of
  the uninterrupted run; v1 and v2 are byte-identical to its;
* on 2 ranks (gloo) both ranks serve the same version, the one on disk, with the dense head (vectors
  gathered) and with the ensemble (the pool sharded: tests/retrieval/test_refresh_heads.py).
"""
from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from m3composer.config import load_config
from tests import bounded
from tests.test_train import read_loss_log, tiny_recipe, write_recipe

REPO = Path(__file__).resolve().parents[2]
ROWS = 8                                     # 2 steps of 4 queries per epoch on one rank


def write_topics_jsonl(root: Path) -> Path:
    """(topic name -> its text) rows with teacher scores; negatives are texts of unrelated topics."""
    from pydoc_data.topics import topics

    names = sorted(topics)
    text = {n: " ".join(topics[n].split())[:300] for n in names}
    (root / "topics").mkdir(parents=True)
    with open(root / "topics" / "topics_len-0-500.jsonl", "w") as out:
        for i, name in enumerate(names[:ROWS]):
            negs = [text[names[ROWS + i * 3 + j]] for j in range(3)]
            row = {"query": f"python {name.replace('-', ' ')}", "pos": [text[name]], "neg": negs,
                   "pos_scores": [1.0], "neg_scores": [0.3, 0.2, 0.1]}   # dropped once negatives are mined
            out.write(json.dumps(row) + "\n")
    return root


@pytest.fixture(scope="module")
def topics_mds(tmp_path_factory) -> Path:
    from m3composer.cli import main as m3c

    root = tmp_path_factory.mktemp("topics")
    write_topics_jsonl(root / "jsonl")
    assert m3c(["convert", str(root / "jsonl"), "--out", str(root / "mds"), "--no-progress"]) == 0
    return root / "mds"


def refresh_recipe(run: Path, mds: Path, epochs: int = 3, head: str = "dense", **trainer) -> Path:
    return write_recipe(run / "recipe.yaml", tiny_recipe(
        run, mds,
        loss={"knowledge_distillation": True, "self_distill_start_step": "3ba"},
        trainer={"max_duration": f"{epochs}ep", "save_folder": str(run / "ckpt"), "save_interval": "3ba",
                 "autoresume": True, "save_num_checkpoints_to_keep": 1, **trainer},
        callbacks={"negative_refresh": {"interval": "1ep", "range": "2-20", "negatives": 4, "head": head}}))


def version_arrays(run: Path, version: int) -> dict:
    folder = run / "negatives" / f"v{version}"
    return {n: np.load(folder / f"{n}.npy") for n in ("row_ids", "offsets", "pool_ids")}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, topics_mds):
    """The uninterrupted 3-epoch run, in this process."""
    from m3composer.train import build_trainer

    run = tmp_path_factory.mktemp("reference")
    trainer = build_trainer(load_config(refresh_recipe(run, topics_mds)))
    dataset = trainer.state.train_dataloader.dataset
    (refresh,) = [c for c in trainer.state.callbacks if type(c).__name__ == "NegativeRefresh"]
    trainer.fit()
    trainer.close()
    (steps,) = read_loss_log(run / "losses.jsonl")
    return {"run": run, "steps": steps, "dataset": dataset, "refresh": refresh}


def test_mined_negatives_come_from_the_rows_own_stream_and_are_served_from_the_next_epoch(reference):
    dataset, history = reference["dataset"], reference["refresh"].history
    assert [(m["version"], m["from_epoch"]) for m in history] == [(1, 1), (2, 2)]     # none after the last epoch
    assert [r["step"] for r in reference["steps"]] == list(range(6))
    pool = reference["refresh"]._pool
    for version in (1, 2):
        arrays = version_arrays(reference["run"], version)
        assert arrays["row_ids"].tolist() == sorted(pool.row_ids.tolist())
        for k, row_id in enumerate(arrays["row_ids"]):
            r = pool.row_ids.tolist().index(int(row_id))
            mined = arrays["pool_ids"][arrays["offsets"][k]:arrays["offsets"][k + 1]]
            lo, hi = pool.stream_range(int(pool.row_streams[r]))
            assert len(mined) == 4 and len(set(mined.tolist())) == 4           # a pool of 32 passages
            assert all(lo <= i < hi and i not in pool.excluded[r] for i in mined.tolist())
    # the dataset serves v2 now; epoch 0 of the same dataset still serves the converted negatives
    assert dataset.mined_negatives.state_dict()["version"] == 2
    for step in range(len(dataset)):           # teacher scores until the refresh, none after
        assert bool(dataset.batch(0, step)["has_teacher_scores"])
        assert not bool(dataset.batch(2, step)["has_teacher_scores"])


def test_sigkill_during_a_refresh_then_the_same_command_continues_with_the_same_negatives_and_losses(
        reference, topics_mds, tmp_path):
    from m3composer.train import main

    run = tmp_path / "killed"
    recipe = refresh_recipe(run, topics_mds)
    env = dict(os.environ, M3C_TEST_KILL_DURING_REFRESH="2", PYTHONPATH=str(REPO))
    proc = bounded.run([sys.executable, str(REPO / "scripts" / "train.py"), str(recipe)], env=env, timeout=300)
    assert proc.returncode == -9, proc.stderr[-3000:]
    negatives = run / "negatives"
    assert (negatives / "v1").is_dir() and not (negatives / "v2").exists()
    assert [p.name for p in negatives.iterdir() if p.name.startswith(".v2.tmp-")], "the kill came mid-write"

    main([str(recipe)]).close()                   # the same command, without the hook
    killed, resumed = read_loss_log(run / "losses.jsonl")
    assert [r["step"] for r in killed] == list(range(4))       # epochs 0 and 1, then the kill in refresh 2
    assert [r["step"] for r in resumed] == list(range(3, 6))   # from the ep1-ba3 checkpoint (serving v1)
    want = {r["step"]: r for r in reference["steps"]}
    for got in killed + resumed:
        for key, value in want[got["step"]].items():
            if key.startswith(("loss/", "lr-")):
                assert got[key] == pytest.approx(value, rel=1e-6, abs=1e-7), (got["step"], key)
    for version in (1, 2):
        mine, ref = version_arrays(run, version), version_arrays(reference["run"], version)
        assert all(np.array_equal(mine[k], ref[k]) for k in ref), version


@pytest.mark.parametrize("head", ["dense", "ensemble"])   # vectors gathered / pool sharded (retrieval/refresh.py)
def test_two_ranks_serve_the_same_version(topics_mds, tmp_path, head):
    from tests.test_train_distributed import launch

    run = tmp_path / "two"
    assert not launch(refresh_recipe(run, topics_mds, epochs=2, head=head), run / "logs", cwd=run)
    meta = json.loads((run / "negatives" / "v1" / "meta.json").read_text())
    assert meta["world_size"] == 2 and meta["rows"] == ROWS and meta["head"] == head
    offsets = np.load(run / "negatives" / "v1" / "offsets.npy")
    assert np.diff(offsets).tolist() == [4] * ROWS             # a pool of 32: every row gets its 4
    # local rank 0 logs through the launcher (launcher.txt), rank 1 to r1.err
    text = "".join(p.read_text() for p in sorted((run / "logs").iterdir()))
    served = re.findall(r"rank (\d) serves mined negatives v(\d+) \(sha256 (\w+)\)", text)
    assert sorted(served) == [("0", "1", meta["sha256"][:16]), ("1", "1", meta["sha256"][:16])]
    (steps,) = read_loss_log(run / "losses.jsonl")
    assert len(steps) == 2 and all(np.isfinite(r["loss/train/total"]) for r in steps)

"""Exact resume (m3composer/data/dataset.py under Composer): a run resumed from a mid-epoch checkpoint
serves exactly the batches (row ids, drawn passages, order) of the uninterrupted run, across epoch
boundaries, on 1 rank in-process; and under `composer -n 2` (gloo, CPU) the two ranks read disjoint
rows of one stream at every step."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests import bounded
from tests.data.m3_tiny_data import RESUME_SPECS, run_composer, write_converted

HERE = Path(__file__).parent


def _checkpoint(folder: Path, batch: int) -> Path:
    (path,) = [p for p in folder.iterdir() if f"-ba{batch}-" in p.name]
    return path


def test_resume_one_rank_mid_epoch_and_at_epoch_end(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = write_converted(tmp_path / "mds", RESUME_SPECS)
    # W = 1: 23 rows / 3 -> 8 steps (tail 2 kept), 10 / 2 -> 5, 14 / 3 -> 5 (tail 2 kept): 18 steps per epoch
    steps = run_composer(str(data), str(tmp_path / "full.json"), max_duration="24ba",
                         save_folder=str(tmp_path / "ckpt"))
    assert steps == 18
    full = json.loads((tmp_path / "full.json").read_text())
    assert [r["batch"] for r in full] == list(range(24))
    assert [r["epoch"] for r in full] == [0] * 18 + [1] * 6
    assert [r["row_ids"] for r in full[:6]] != [r["row_ids"] for r in full[18:24]]
    for at in (6, 18, 21):          # mid epoch 0, the last batch of epoch 0, mid epoch 1
        out = tmp_path / f"resume{at}.json"
        run_composer(str(data), str(out), max_duration="24ba", load_path=str(_checkpoint(tmp_path / "ckpt", at)),
                     num_workers=1 if at == 21 else 0)
        assert json.loads(out.read_text()) == full[at:], f"resume from ba{at} differs"


def _launch(args: list[str], logs: Path) -> None:
    launcher = Path(sys.executable).parent / "composer"
    logs.mkdir(parents=True, exist_ok=True)
    cmd = [str(launcher), "-n", "2", "--stdout", str(logs / "r{rank}.out"), "--stderr", str(logs / "r{rank}.err"),
           str(HERE / "m3_tiny_data.py"), *args]
    # own session, so a hung rank can be killed with the launcher (the launcher alone would leave it running)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:                  # every process prints its stacks, then dies
        stderr = "timed out after 240 s\n" + bounded.abort_with_stacks(proc)[1]
    if proc.returncode != 0:
        errs = "\n".join(p.read_text()[-3000:] for p in sorted(logs.glob("r*.err")))
        pytest.fail(f"composer -n 2 failed ({proc.returncode}):\n{stderr[-3000:]}\n{errs}")


def test_two_ranks_under_the_launcher_read_disjoint_rows_of_one_stream_per_step_across_epochs(tmp_path):
    """One `composer -n 2` run with a DataLoader worker: the ranks take their rank from the launcher's
    environment. Resuming on 2 ranks is tested step-exact in tests/test_train_distributed.py (SIGUSR1
    mid epoch 0, on into epoch 1) and mid epoch 1 with a worker on 1 rank above."""
    data = write_converted(tmp_path / "mds", RESUME_SPECS)
    out = tmp_path / "out"
    out.mkdir()
    # W = 2: 23 / 6 -> 3 + tail 5 (2 per rank), 10 / 4 -> 2, 14 / 6 -> 2: 8 steps per epoch; 20 steps = 2.5 epochs
    _launch([str(data), str(out), "full", "20ba", "1"], tmp_path / "logs_full")
    full = [json.loads((out / f"full-rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["epoch"] for r in full[0]] == [0] * 8 + [1] * 8 + [2] * 4
    for a, b in zip(*full, strict=True):
        assert a["batch"] == b["batch"]
        streams = {rid // 1000 for rid in a["row_ids"] + b["row_ids"]}
        assert len(streams) == 1, f"step {a['batch']} mixes streams"
        assert len(a["row_ids"]) == len(b["row_ids"]) and not set(a["row_ids"]) & set(b["row_ids"])
    served = [[rid for r in (0, 1) for step in full[r] if step["epoch"] == e for rid in step["row_ids"]]
              for e in (0, 1)]
    assert len(served[0]) == len(served[1]) >= 23 + 10 + 14 - 2 * 3     # at most a short tail per stream left out
    assert all(len(rows) == len(set(rows)) for rows in served), "a row served twice in one epoch"
    assert [s["row_ids"] for s in full[0][:8]] != [s["row_ids"] for s in full[0][8:16]]   # reshuffled

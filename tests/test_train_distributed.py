"""2-rank training through the launcher (`composer -n 2 scripts/train.py RECIPE`), gloo on CPU.

* an uninterrupted reference run with `model.fix_position_embedding=true` and cross-rank negatives:
  trains under DDP without errors and exports position embeddings equal to the initial ones;
* SIGKILL and autoresume, with the gradient cache on: the whole process group is killed after
  step 5, the same command is started again from the ba4 checkpoint, and the steps it repeats log
  the same loss terms and learning rate as before the kill (so the data position, the dropout
  masks, the optimizer and the schedule resumed), and self-distillation switches on at step 10;
* preemption: SIGUSR1 to one rank, every rank checkpoints and exits 0, the same command resumes
  step-exact against the plain reference run; and a 2-rank checkpoint resumed on 1 rank (elastic).

Checkpoints to s3:// and autoresume from the store in a fresh working directory are tested in
tests/test_train_store.py (1 rank, through a store failing a quarter of its requests, with a
small-vocabulary model whose checkpoints are kB, not the 96 MB of this recipe's).

The recipe is test_train.py's tiny one (tiny XLM-R, real sample text, 16 steps).
"""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest
from omegaconf import OmegaConf

from tests import bounded
from tests.test_train import MAX_STEPS, SELF_DISTILL_START, read_loss_log, sample_mds, tiny_recipe, write_recipe

REPO = Path(__file__).resolve().parents[1]
LAUNCHER = Path(sys.executable).parent / "composer"
TIMEOUT_S = 240
KILL_AFTER_STEP = 5


def _last_logged_step(loss_log: Path) -> int:
    steps = [json.loads(line).get("step", -1) for line in loss_log.read_text().splitlines()] \
        if loss_log.exists() else []
    return max(steps, default=-1)


def _tails(logs: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(logs.glob("*")) if p.is_file())


def launch(recipe: Path, logs: Path, *, cwd: Path, kill_when: Callable[[int], bool] | None = None,
           script: list[str] | None = None, launcher: list[str] | None = None, expect_error: bool = False) -> bool:
    """Run the recipe on 2 ranks; with `kill_when`, SIGKILL the whole process group as soon as
    `kill_when(last step in the loss log)` is true. Returns whether it was killed; fails the test on
    error or timeout (or a non-zero exit, or a rank that aborted in C++: "terminate called"; with
    `expect_error`, on a zero exit instead). `script`: another training script and its arguments
    before the recipe (default scripts/train.py); `launcher`: instead of `composer`."""
    bounded.release_finished_datasets()
    logs.mkdir(parents=True)
    cwd.mkdir(parents=True, exist_ok=True)
    loss_log = Path(_recipe_value(recipe, "callbacks", "loss_log"))
    cmd = [*(launcher or [str(LAUNCHER)]), "-n", "2", "--stdout", str(logs / "r{rank}.out"), "--stderr", str(logs / "r{rank}.err"),
           *(script or [str(REPO / "scripts" / "train.py")]), str(recipe)]
    with open(logs / "launcher.txt", "w") as out:
        # Own session: the launcher and both ranks form one process group we can kill.
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + TIMEOUT_S
        try:
            while proc.poll() is None:
                if time.monotonic() > deadline:       # every process prints its stacks into the logs
                    bounded.abort_with_stacks(proc)
                    pytest.fail(f"composer -n 2 timed out after {TIMEOUT_S} s\n{_tails(logs)}")
                if kill_when is not None and kill_when(_last_logged_step(loss_log)):
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                    return True
                time.sleep(0.05)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    if (proc.returncode != 0) != expect_error or "terminate called" in _tails(logs):
        pytest.fail(f"composer -n 2 exited {proc.returncode}\n{_tails(logs)}")
    return False


def _recipe_value(recipe: Path, section: str, key: str):
    return OmegaConf.load(recipe)[section][key]


def two_rank_recipe(run_dir: Path, mds: Path, save_folder: str, save_interval: str = "2ba",
                    model: dict | None = None) -> Path:
    return write_recipe(run_dir / "recipe.yaml", tiny_recipe(
        run_dir, mds,
        model={"fix_position_embedding": True, **(model or {})},
        loss={"negatives_cross_device": True},
        trainer={"save_folder": save_folder, "save_interval": save_interval, "autoresume": True,
                 "save_num_checkpoints_to_keep": 1}))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted 2-rank run."""
    mds = sample_mds(tmp_path_factory)
    run = tmp_path_factory.mktemp("reference")
    recipe = two_rank_recipe(run, mds, str(run / "ckpt"))
    assert not launch(recipe, run / "logs", cwd=run)
    (fit,) = read_loss_log(run / "losses.jsonl")
    return {"run": run, "mds": mds, "steps": fit}


def test_frozen_position_embeddings_train_under_ddp_and_are_exported_unchanged(reference, tiny_dir):
    from safetensors.torch import load_file

    assert [r["step"] for r in reference["steps"]] == list(range(MAX_STEPS))
    initial = load_file(tiny_dir / "model.safetensors")
    exported = load_file(reference["run"] / "export" / "model.safetensors")

    def one(weights: dict, part: str):
        (key,) = [k for k in weights if f"{part}.weight" in k]
        return weights[key]

    assert one(exported, "position_embeddings").equal(one(initial, "position_embeddings"))
    # ... while the rest of the encoder trained
    assert not one(exported, "word_embeddings").equal(one(initial, "word_embeddings"))
    assert not one(exported, "layer.0.attention.self.query").equal(one(initial, "layer.0.attention.self.query"))


def assert_same_as_reference(steps: list[dict], reference_steps: list[dict]) -> None:
    """Every loss term, learning rate and the self-distill switch equal the reference run's at each step."""
    want = {r["step"]: r for r in reference_steps}
    for got in steps:
        ref = want[got["step"]]
        assert got["self_distill_on"] is ref["self_distill_on"] is (got["step"] >= SELF_DISTILL_START)
        assert (got["loss/train/self_distill"] > 0) is ref["self_distill_on"]
        for key, value in ref.items():
            if key.startswith(("loss/", "lr-")):
                assert got[key] == pytest.approx(value, rel=1e-6, abs=1e-7), (got["step"], key)


# Chunks of 5 rows: each rank's 4 queries + 12 passages take 4 chunks, so every step replays.
GRADIENT_CACHE = {"gradient_cache": {"enabled": True, "max_sequences": 5, "max_tokens": 160}}


def test_with_the_gradient_cache_sigkill_then_the_same_command_resumes_exactly(reference, tmp_path):
    """Killed after step 5 with its last checkpoint at ba4, the same command restarts at step 4: its
    steps 4 to the kill repeat the killed run's to 1e-6 (data position, dropout masks through the
    cache's RNG replay, optimizer state and schedule all restored), self-distillation switches on at
    step 10 by itself, and the run completes. The killed run is the uninterrupted run up to the
    kill, so no third launch is needed (the plain run is checked against a whole reference below)."""
    recipe = two_rank_recipe(tmp_path / "run", reference["mds"], str(tmp_path / "ckpt"), save_interval="4ba",
                             model=GRADIENT_CACHE)
    assert launch(recipe, tmp_path / "logs1", cwd=tmp_path, kill_when=lambda step: step >= KILL_AFTER_STEP), \
        "the run finished before it could be killed"
    assert not launch(recipe, tmp_path / "logs2", cwd=tmp_path)

    starts = [json.loads(line)["step"] for line in (tmp_path / "run" / "losses.jsonl").read_text().splitlines()
              if '"fit_start"' in line]
    killed, restarted = read_loss_log(tmp_path / "run" / "losses.jsonl")
    assert starts == [0, 4] and [r["step"] for r in killed] == list(range(len(killed)))
    assert len(killed) >= KILL_AFTER_STEP + 1 and len(killed) < 8      # killed before the ba8 checkpoint
    assert [r["step"] for r in restarted] == list(range(4, MAX_STEPS))
    # the overlap, at least steps 4 and 5, computed once before the kill and once after the restart
    assert_same_as_reference(restarted[:len(killed) - 4], killed)
    for got in restarted:
        assert got["self_distill_on"] is (got["step"] >= SELF_DISTILL_START)
        assert (got["loss/train/self_distill"] > 0) is got["self_distill_on"]
        assert all(math.isfinite(v) for k, v in got.items() if k.startswith("loss/"))
    assert (tmp_path / "run" / "export" / "model.safetensors").is_file()


# ---- preemption (SIGTERM/SIGUSR1) and elastic resume -----------------------------------------------------------

SIGNAL_AT_STEP = 10      # mid-epoch (15 steps per epoch on 2 ranks), far from save_interval=100ba


@pytest.fixture(scope="module")
def preempted(reference, tmp_path_factory):
    """The reference recipe, saving only every 100 steps, with SIGUSR1 sent to rank 1 alone during step 10,
    under scripts/launch.py (the launcher the README gives for preemptible jobs)."""
    run = tmp_path_factory.mktemp("preempted")
    recipe = two_rank_recipe(run / "run", reference["mds"], str(run / "ckpt"), save_interval="100ba")
    script = [str(REPO / "tests" / "callbacks" / "signal_train.py"), str(SIGNAL_AT_STEP), "SIGUSR1", "1"]
    assert not launch(recipe, run / "logs1", cwd=run, script=script,
                      launcher=[sys.executable, str(REPO / "scripts" / "launch.py")])       # launch() fails unless every rank exits 0
    checkpoints = sorted(p.name for p in (run / "ckpt").glob("ep*.pt"))
    # the checkpoint of the resume test below replaces it (save_num_checkpoints_to_keep=1): keep a link
    kept = run / "kept"
    kept.mkdir()
    os.link(run / "ckpt" / checkpoints[0], kept / checkpoints[0])
    return {"run": run, "recipe": recipe, "checkpoints": checkpoints, "kept": kept / checkpoints[0]}


def test_sigusr1_on_one_rank_checkpoints_on_every_rank_exits_0_and_the_same_command_resumes_exactly(
        reference, preempted):
    run = preempted["run"]
    assert preempted["checkpoints"] == [f"ep0-ba{SIGNAL_AT_STEP + 1}-rank0.pt"]
    assert not (run / "run" / "export").exists(), "a preempted run exported a model"
    assert not launch(preempted["recipe"], run / "logs2", cwd=run)
    stopped, resumed = read_loss_log(run / "run" / "losses.jsonl")
    assert [r["step"] for r in stopped] == list(range(SIGNAL_AT_STEP + 1))
    assert [r["step"] for r in resumed] == list(range(SIGNAL_AT_STEP + 1, MAX_STEPS))
    assert_same_as_reference(stopped + resumed, reference["steps"])
    assert (run / "run" / "export" / "model.safetensors").is_file()


def test_a_two_rank_checkpoint_resumes_on_one_rank_and_its_epoch_ends_after_the_remaining_rows(
        preempted, tmp_path):
    """Elastic 2 -> 1: the epoch goes on at W=1 with the rows the 2-rank plan still had (more steps:
    half the rows per step) and ends there; the next epoch is an ordinary W=1 epoch."""
    from m3composer.data.plan import plan_epoch
    from m3composer.train import build_trainer
    from m3composer.config import load_config

    done = SIGNAL_AT_STEP + 1
    recipe = OmegaConf.to_container(OmegaConf.load(preempted["recipe"]))
    recipe["run_dir"] = str(tmp_path)
    recipe["callbacks"].update(export_dir=str(tmp_path / "export"), loss_log=str(tmp_path / "losses.jsonl"))
    recipe["trainer"].update(autoresume=False, save_folder=None, load_path=str(preempted["kept"]),
                             max_duration=f"{done + 10}ba")
    trainer = build_trainer(load_config(write_recipe(tmp_path / "recipe.yaml", recipe)))
    dataset = trainer.state.train_dataloader.dataset
    assert dataset.world_size == 1 and int(trainer.state.timestamp.batch_in_epoch) == done
    sizes = ([g.rows for g in dataset.groups], [g.per_device_batch_size for g in dataset.groups])
    two_rank_epoch = len(plan_epoch(*sizes, seed=7, epoch=0, world_size=2, tail="keep_if_ge_2W"))
    epoch_end = len(plan_epoch(*sizes, seed=7, epoch=0, world_size=1, history=[(2, done)], tail="keep_if_ge_2W"))
    # the rest of the epoch at half the rows per step takes more steps, and it ends within this run
    assert two_rank_epoch - done < epoch_end - done < done + 10 - done
    trainer.fit()       # DataEpoch raises at EPOCH_END if the epoch served another number of batches
    trainer.close()
    (fit,) = read_loss_log(tmp_path / "losses.jsonl")
    assert [r["step"] for r in fit] == list(range(done, done + 10))
    assert [r["epoch"] for r in fit] == [0] * (epoch_end - done) + [1] * (done + 10 - epoch_end)
    assert all(math.isfinite(r["loss/train/total"]) for r in fit)
    assert len(dataset) == dataset.steps_per_epoch       # epoch 1: planned normally at W=1


def test_two_rank_runs_end_cleanly_after_success_and_after_an_error(reference, tmp_path):
    """A finished 2-rank run once died at exit with SIGABRT ("terminate called without an active
    exception": gloo's teardown, docs/recipe.md §Process-group teardown); `launch` checks every run
    for it. One more short run to the end exits 0; a run that fails on every rank after the process
    group is up (a microbatch below the device batch) ends at once with the one-line error, no hang,
    no traceback and no abort."""
    run = tmp_path / "ok"
    recipe = write_recipe(run / "recipe.yaml", tiny_recipe(
        run, reference["mds"], model={"sparse_init_passages": 64}, loss={"negatives_cross_device": True},
        trainer={"max_duration": "2ba"}))
    assert not launch(recipe, run / "logs", cwd=run)
    assert [r["step"] for r in read_loss_log(run / "losses.jsonl")[0]] == [0, 1]

    run = tmp_path / "error"
    recipe = write_recipe(run / "recipe.yaml", tiny_recipe(
        run, reference["mds"], trainer={"max_duration": "2ba", "device_train_microbatch_size": 1}))
    assert launch(recipe, run / "logs", cwd=run, expect_error=True) is False
    logs = _tails(run / "logs")        # rank 0 prints to the launcher's output, rank 1 to r1.err
    assert "scripts/train.py: error: trainer.device_train_microbatch_size=1 is below" in logs, logs
    assert "Traceback" not in logs, logs

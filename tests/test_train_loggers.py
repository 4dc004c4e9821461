"""Experiment tracking for real: one short tiny-model training with `loggers: {mlflow, tensorboard}`.

MLflow writes to its file store (`tracking_uri` a local folder) and TensorBoard to event files; both
are read back with their own readers (`MlflowClient`, `EventAccumulator`) and compared with what the
run itself recorded (`callbacks.loss_log`, `RetrievalEval.history`). The step numbers are Composer's:

* `loss/train/<term>`: the 0-based step that produced it (logged before the batch counter moves);
* `lr-AdamW/group<i>`: LRMonitor logs at BATCH_END, after the counter moved, the rate of the *next*
  step: its value at step s is the rate the loss log records for step s;
* `throughput/*`: from step `speed_window + 1` on (SpeedMonitor needs a full window of batches);
* `metrics/eval/<head>/<metric>`: at each `callbacks.eval_interval` step (and at the end).

Composer's MLFlowLogger does not send a value equal to the last one it sent for that key (within
`log_duplicated_metric_every_n_steps`, default 100 steps), so MLflow's history is compared with the
run's values less such repeats; TensorBoard gets every value, as float32.
"""
from __future__ import annotations

import math
import sys

import pytest

from m3composer.config import ConfigError, load_config
from tests.test_train import read_loss_log, sample_mds, tiny_recipe, write_recipe

STEPS = 4
EVAL_EVERY = 2
SPEED_WINDOW = 1
LOSS_TERMS = ("dense", "sparse", "colbert", "ensemble", "self_distill", "bidirectional", "total")
HEADS = ("dense", "sparse", "colbert", "ensemble")
RETRIEVAL = [f"metrics/eval/{head}/{metric}" for head in HEADS for metric in ("recall@1", "ndcg@10")]
THROUGHPUT = ("throughput/samples_per_sec", "throughput/batches_per_sec", "throughput/tokens_per_sec")
LR = "lr-AdamW/group0"
PEAK_LR, WARMUP = 1e-3, 2        # tiny_recipe's optimizer


def schedule(t: int) -> float:
    """Linear warm-up then linear decay to 0 at STEPS, evaluated at step t (tests/test_train.py)."""
    return PEAK_LR * t / WARMUP if t < WARMUP else PEAK_LR * (STEPS - t) / (STEPS - WARMUP)


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    """Train once with both loggers; return the run's own records and the two loggers' read-backs."""
    pytest.importorskip("mlflow", reason="pip install 'm3composer[mlflow]'")      # in .[test]: CI has both
    pytest.importorskip("tensorboard", reason="pip install 'm3composer[tensorboard]'")
    from m3composer.callbacks.retrieval_eval import RetrievalEval
    from m3composer.train import build_trainer

    mds = sample_mds(tmp_path_factory)
    eval_rows = mds.parent / "jsonl" / "train" / "pydoc_topics" / "pydoc_topics_len-0-500.jsonl"
    run = tmp_path_factory.mktemp("tracked")
    recipe = tiny_recipe(
        run, mds, trainer={"max_duration": f"{STEPS}ba"},
        callbacks={"eval_data": str(eval_rows), "eval_interval": f"{EVAL_EVERY}ba", "eval_max_queries": 4,
                   "eval_passage_max_len": 64, "speed_window": SPEED_WINDOW},
        # synchronous: each step's metrics are written by the training thread. MLflow's asynchronous
        # writer pool lost the first throughput point once in CI (a key's first two batches at once).
        loggers={"mlflow": {"tracking_uri": str(run / "mlruns"), "experiment_name": "m3-tiny",
                            "log_system_metrics": False, "synchronous": True},
                 "tensorboard": {"log_dir": str(run / "tensorboard")}})
    cfg = load_config(write_recipe(run / "recipe.yaml", recipe))
    with pytest.MonkeyPatch.context() as mp:
        # MLFlowLogger sets these process-wide; give them back to the rest of the suite afterwards.
        mp.delenv("MLFLOW_ASYNC_LOGGING_BUFFERING_SECONDS", raising=False)
        mp.setattr(sys, "excepthook", sys.excepthook)
        mp.setenv("MLFLOW_ALLOW_FILE_STORE", "true")   # MLflow 3 refuses a folder store without it (README)
        trainer = build_trainer(cfg)
        trainer.fit()
        evaluator = next(c for c in trainer.state.callbacks if isinstance(c, RetrievalEval))
        trainer.close()            # MLflow flushes its async queue and ends the run; TensorBoard flushes

    from mlflow import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    client = MlflowClient(str(run / "mlruns"))
    (mlflow_run,) = client.search_runs([client.get_experiment_by_name("m3-tiny").experiment_id])
    events = EventAccumulator(str(run / "tensorboard" / "tiny"), size_guidance={"scalars": 0})
    events.Reload()
    [fit] = read_loss_log(run / "losses.jsonl")
    truth = {f"loss/train/{term}": {r["step"]: r[f"loss/train/{term}"] for r in fit} for term in LOSS_TERMS}
    # LRMonitor's value at step s >= 1 is the rate step s runs with: schedule(s - 1), Composer being
    # one step behind HF (docs/recipe.md §Learning-rate lag); the loss log has it for s < STEPS.
    truth[LR] = {s: schedule(s - 1) for s in range(1, STEPS + 1)}
    for name in RETRIEVAL:
        _, label, head, metric = name.split("/")
        truth[name] = {batch: results[head][metric] for batch, results in evaluator.history}
    return {
        "truth": truth, "status": mlflow_run.info.status, "loss_log_lr": {r["step"]: r[LR] for r in fit},
        "mlflow": {key: {m.step: m.value for m in client.get_metric_history(mlflow_run.info.run_id, key)}
                   for key in mlflow_run.data.metrics},
        "tensorboard": {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]},
    }


def without_repeats(points: dict[int, float]) -> dict[int, float]:
    """What Composer's MLFlowLogger sends: a value equal to the last one sent (within 100 steps) is dropped."""
    sent, last = {}, None
    for step in sorted(points):
        if last is None or points[step] != last[1] or step >= last[0] + 100:
            sent[step] = points[step]
            last = (step, points[step])
    return sent


def assert_points(got: dict[int, float], expected: dict[int, float], rel: float, name: str) -> None:
    assert sorted(got) == sorted(expected), f"{name}: logged at steps {sorted(got)}, expected {sorted(expected)}"
    for step, value in expected.items():
        assert got[step] == pytest.approx(value, rel=rel, abs=1e-7), f"{name} at step {step}"


def test_the_run_logs_what_the_test_reads(logged):
    """The reference values are real: every loss term at every step, evaluations at 2 and 4, and the
    schedule is the one the steps ran with."""
    truth = logged["truth"]
    assert all(sorted(truth[f"loss/train/{t}"]) == list(range(STEPS)) for t in LOSS_TERMS)
    assert all(sorted(truth[name]) == [EVAL_EVERY, STEPS] for name in RETRIEVAL)
    ran_with = logged["loss_log_lr"]
    assert [ran_with[s] for s in range(1, STEPS)] == pytest.approx([truth[LR][s] for s in range(1, STEPS)])
    assert all(0.0 <= v <= 1.0 for name in RETRIEVAL for v in truth[name].values())


@pytest.mark.parametrize("name", [f"loss/train/{t}" for t in LOSS_TERMS] + [LR] + RETRIEVAL)
def test_mlflow_file_store_has_each_value_at_its_step(logged, name):
    from m3composer.callbacks.mlflow_logger import mlflow_metric_name

    assert logged["status"] == "FINISHED"
    assert_points(logged["mlflow"][mlflow_metric_name(name)], without_repeats(logged["truth"][name]), 1e-9, name)


@pytest.mark.parametrize("name", [f"loss/train/{t}" for t in LOSS_TERMS] + [LR] + RETRIEVAL)
def test_tensorboard_events_have_each_value_at_its_step(logged, name):
    assert_points(logged["tensorboard"][name], logged["truth"][name], 1e-6, name)   # float32 on disk


@pytest.mark.parametrize("reader", ["mlflow", "tensorboard"])
def test_throughput_arrives_once_the_speed_window_is_full(logged, reader):
    for name in THROUGHPUT:
        points = logged[reader][name]     # a name MLflow accepts as it is
        assert min(points) == SPEED_WINDOW + 1 and max(points) == STEPS, name
        assert all(math.isfinite(v) and v > 0 for v in points.values()), name


@pytest.mark.parametrize("name, module", [("mlflow", "mlflow"), ("tensorboard", "tensorboard")])
def test_a_missing_logger_package_is_one_line_naming_the_extra(tmp_path, monkeypatch, name, module):
    monkeypatch.setitem(sys.modules, module, None)      # what `import mlflow` sees when it is not installed
    recipe = write_recipe(tmp_path / "recipe.yaml", tiny_recipe(tmp_path, tmp_path / "mds", loggers={name: {}}))
    with pytest.raises(ConfigError) as err:
        load_config(recipe)
    message = str(err.value)
    assert message == (f"loggers.{name}: needs the {module} package, which is not installed: "
                       f"pip install 'm3composer[{name}]'")


def test_a_misspelled_logger_argument_names_the_logger(tmp_path):
    from m3composer.train import build_loggers

    cfg = load_config(write_recipe(tmp_path / "recipe.yaml", tiny_recipe(
        tmp_path, tmp_path / "mds", loggers={"file": {"filname": str(tmp_path / "log.txt")}})))
    with pytest.raises(ConfigError, match=r"^loggers\.file: .*filname"):
        build_loggers(cfg)


def test_mlflow_names_lose_only_the_characters_mlflow_refuses():
    from m3composer.callbacks.mlflow_logger import mlflow_metric_name

    assert mlflow_metric_name("metrics/eval/dense/ndcg@10") == "metrics/eval/dense/ndcg_at_10"
    assert mlflow_metric_name("lr-AdamW/group0") == "lr-AdamW/group0"
    assert mlflow_metric_name("loss/train/total (x+y)") == "loss/train/total _x_y_"


def test_a_folder_store_without_mlflows_opt_in_is_refused_before_training(tmp_path, monkeypatch):
    from m3composer.train import build_loggers

    env = pytest.importorskip("mlflow.environment_variables", reason="pip install 'm3composer[mlflow]'")
    if not hasattr(env, "MLFLOW_ALLOW_FILE_STORE"):
        pytest.skip("this MLflow opens folder stores without an opt-in")
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    cfg = load_config(write_recipe(tmp_path / "recipe.yaml", tiny_recipe(
        tmp_path, tmp_path / "mds", loggers={"mlflow": {"tracking_uri": str(tmp_path / "mlruns")}})))
    with pytest.raises(ConfigError, match=r"^loggers\.mlflow\.tracking_uri: .*MLFLOW_ALLOW_FILE_STORE=true"):
        build_loggers(cfg)
    assert not (tmp_path / "mlruns").exists()

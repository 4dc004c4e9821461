"""Training (m3composer/train.py) against an object store that fails a quarter of its requests.

The data is read from s3:// and the checkpoints go to s3:// through m3composer.testing.s3.FaultProxy
in front of moto, with `trainer.object_store_max_attempts` raised so that botocore rides the failures
out. The run stops after step 3 (its checkpoint and Composer's `latest` pointer uploaded through the
failing proxy), then the same command in a fresh working directory autoresumes from the store. Its
per-step losses, both halves, are those of a clean run from the local copy of the data.

The model is the tiny XLM-R layout over the data's 211-word tokenizer, so a checkpoint is a few
hundred kB, not the 96 MB of the 250k-vocabulary asset.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from composer import Callback
from composer.callbacks import CheckpointSaver

from m3composer.config import load_config
from m3composer.testing.s3 import FaultProxy
from tests.data.conftest import converted_dir, converted_source, s3_server, word_tokenizer_dir  # noqa: F401
from tests.data.test_store_faults import upload
from tests.test_train import read_loss_log, tiny_recipe, write_recipe

STEPS, STOP_AT = 6, 3


class StopAfter(Callback):
    """Ends the fit after `steps` optimizer steps, as if the job were stopped there (fit_end runs:
    Composer finishes its uploads and the `latest` pointer, so the same command can autoresume)."""

    def __init__(self, steps: int):
        self.steps = steps

    def batch_end(self, state, logger) -> None:
        if int(state.timestamp.batch) >= self.steps:
            state.stop_training()


def fit(recipe: Path, stop_after: int | None = None) -> None:
    from m3composer.train import build_trainer

    trainer = build_trainer(load_config(recipe))
    if stop_after is not None:
        trainer.state.callbacks.append(StopAfter(stop_after))
    for callback in trainer.state.callbacks:
        if isinstance(callback, CheckpointSaver):
            # Composer polls for an uploaded checkpoint every 30 s before it uploads the `latest`
            # pointer (no public setting); a second keeps the test short and changes nothing else.
            callback._symlink_upload_wait_before_next_try_in_seconds = 1.0
    trainer.fit()
    trainer.close()


@pytest.fixture(scope="module")
def word_model(tmp_path_factory, word_tokenizer_dir):  # noqa: F811
    from m3composer.assets.tiny import build_tiny

    return build_tiny(tmp_path_factory.mktemp("word-model") / "tiny-words", word_tokenizer_dir)


def recipe_for(run_dir: Path, data: str, model: Path, **trainer) -> dict:
    recipe = tiny_recipe(run_dir, data, model={"name_or_path": str(model)},
                         data={"local_cache": str(run_dir / "cache"), "download_retry": 2},
                         loss={"use_self_distill": False},
                         trainer={"max_duration": f"{STEPS}ba", **trainer})
    recipe["callbacks"].pop("export_dir")
    return recipe


def test_training_and_checkpoints_through_a_store_failing_a_quarter_of_requests(
        s3_server, converted_dir, word_model, tmp_path, monkeypatch):  # noqa: F811
    clean = tmp_path / "clean"
    fit(write_recipe(clean / "recipe.yaml", recipe_for(clean, str(converted_dir), word_model)))
    [clean_steps] = read_loss_log(clean / "losses.jsonl")
    assert [r["step"] for r in clean_steps] == list(range(STEPS))

    remote = upload(s3_server, converted_dir, f"train-faults/{tmp_path.name}")
    run = tmp_path / "run"
    recipe = write_recipe(run / "recipe.yaml", recipe_for(
        run, remote, word_model, save_folder=f"s3://{s3_server['bucket']}/ckpt-{tmp_path.name}/{{run_name}}",
        save_interval=f"{STOP_AT}ba", autoresume=True, object_store_max_attempts=10))
    with FaultProxy(s3_server["endpoint"], fail_fraction=0.25, seed=5) as proxy:
        monkeypatch.setenv("S3_ENDPOINT_URL", proxy.url)     # Streaming, Composer and its upload workers
        for node in ("node1", "node2"):                      # the second starts with nothing local
            (tmp_path / node).mkdir()
            monkeypatch.chdir(tmp_path / node)
            if node == "node2":
                os.environ.pop("AWS_MAX_ATTEMPTS", None)     # the recipe sets it again
                for path in (run / "cache").rglob("*"):
                    path.unlink() if path.is_file() else None
            fit(recipe, stop_after=STOP_AT if node == "node1" else None)
        assert proxy.failed >= 5, (proxy.requests, proxy.failed)
    assert os.environ["AWS_MAX_ATTEMPTS"] == "10"
    stopped, resumed = read_loss_log(run / "losses.jsonl")
    assert [r["step"] for r in stopped] == list(range(STOP_AT))
    assert [r["step"] for r in resumed] == list(range(STOP_AT, STEPS))
    for got, want in zip(stopped + resumed, clean_steps):
        for key, value in want.items():
            if isinstance(value, float):
                assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-7), (got["step"], key)

"""The trainer (m3composer/train.py) end to end in one process, on real sample text.

The data is `m3c sample-data` (pydoc topics, stdlib docstrings, Django en->xx catalogues; 40 rows
per task) converted with the real e5/XLM-R tokenizer; the model is the tiny random XLM-R asset
(2 layers, hidden 32) trained with short lengths (query 32, passage 48 tokens), G=3, 4 queries
per step. One 16-step run (self-distillation from step 10, a checkpoint every 4 steps) is shared
by the tests that look at its loss, its export and its resume.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from m3composer.config import ConfigError, load_config

SELF_DISTILL_START = 10
MAX_STEPS = 16
_SAMPLE: dict[str, Path] = {}


def sample_mds(tmp_path_factory) -> Path:
    """Real sample text, converted once per test session (also used by test_train_distributed.py)."""
    if "mds" not in _SAMPLE:
        from m3composer.cli import main as m3c

        root = tmp_path_factory.mktemp("sample")
        assert m3c(["sample-data", str(root / "jsonl"), "--max-rows-per-task", "40"]) == 0
        assert m3c(["convert", str(root / "jsonl" / "train"), "--out", str(root / "mds"), "--no-progress"]) == 0
        _SAMPLE["mds"] = root / "mds"
    return _SAMPLE["mds"]


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def tiny_recipe(run_dir: Path, mds: Path, **sections) -> dict:
    """The tiny-model recipe as a YAML dict; `sections` are merged in (e.g. trainer={...})."""
    recipe = {
        "run_name": "tiny", "run_dir": str(run_dir), "seed": 7,
        "model": {"name_or_path": "asset:tiny-xlmr"},
        "data": {"train_data": str(mds), "train_group_size": 3, "query_max_len": 32, "passage_max_len": 48,
                 "default_batch_size": 4},
        "loss": {"use_self_distill": True, "self_distill_start_step": f"{SELF_DISTILL_START}ba"},
        "optimizer": {"lr": 1e-3, "warmup_steps": 2},
        "trainer": {"max_duration": f"{MAX_STEPS}ba", "progress_bar": False, "log_to_console": False},
        "callbacks": {"export_dir": str(run_dir / "export"), "loss_log": str(run_dir / "losses.jsonl")},
    }
    return _merge(recipe, sections)


def write_recipe(path: Path, recipe: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(OmegaConf.create(recipe), path)
    return path


def read_loss_log(path: Path) -> list[list[dict]]:
    """The loss log split into fits: one list of step records per `fit_start` line."""
    fits: list[list[dict]] = []
    for line in path.read_text().splitlines():
        record = json.loads(line)
        if record.get("event") == "fit_start":
            fits.append([])
        else:
            fits[-1].append(record)
    return fits


def probe_loss(model, batches: list[dict]) -> float:
    """Mean unified loss (no self-distillation, no dropout) of `model` on fixed batches."""
    was_training, distill = model.training, model.self_distill_on
    model.eval()
    model.self_distill_on = False
    try:
        with torch.no_grad():
            return sum(float(model.loss(model(b), b)["total"]) for b in batches) / len(batches)
    finally:
        model.train(was_training)
        model.self_distill_on = distill


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture(scope="session")
def train_data(tmp_path_factory) -> Path:
    return sample_mds(tmp_path_factory)


@pytest.fixture(scope="module")
def tiny_weights_dir(tmp_path_factory, tiny_dir) -> Path:
    """The tiny model's folder without its tokenizer (links to its files): what `build_model` reads in
    the tests that only look at the model, less a load of the 250k-entry tokenizer each time."""
    folder = tmp_path_factory.mktemp("tiny-weights")
    for name in ("config.json", "m3composer.json", "model.safetensors"):
        (folder / name).symlink_to(tiny_dir / name)
    return folder


@pytest.fixture(scope="module")
def trained(tmp_path_factory, train_data):
    """One 16-step run; returns what the tests need (the in-memory model stays alive)."""
    from m3composer.train import build_trainer

    run = tmp_path_factory.mktemp("run")
    recipe = write_recipe(run / "recipe.yaml", tiny_recipe(
        run, train_data, trainer={"save_folder": str(run / "ckpt"), "save_interval": "4ba",
                                  "save_num_checkpoints_to_keep": -1}))
    records = _Records()
    train_log = logging.getLogger("m3composer.train")
    train_log.addHandler(records)
    old_level = train_log.level
    train_log.setLevel(logging.INFO)
    try:
        trainer = build_trainer(load_config(recipe))
    finally:
        train_log.removeHandler(records)
        train_log.setLevel(old_level)
    model = trainer.state.model
    dataset = trainer.state.train_dataloader.dataset
    probe = [dataset.batch(0, step) for step in range(4)]
    before = probe_loss(model, probe)
    trainer.fit()
    after = probe_loss(model, probe)
    trainer.close()
    return {"run": run, "data": train_data, "model": model, "probe": probe, "before": before, "after": after,
            "log": records.messages, "steps_per_epoch": len(dataset)}


def test_training_lowers_the_loss_on_fixed_batches(trained):
    (fit,) = read_loss_log(trained["run"] / "losses.jsonl")
    assert [r["step"] for r in fit] == list(range(MAX_STEPS))
    assert all(torch.isfinite(torch.tensor(r["loss/train/total"])) for r in fit)
    # The same 4 batches before and after 16 steps: a random-init model must have learnt something.
    assert trained["after"] < 0.8 * trained["before"], (trained["before"], trained["after"])


def test_loss_log_has_every_term_and_the_learning_rate(trained):
    (fit,) = read_loss_log(trained["run"] / "losses.jsonl")
    terms = {"dense", "sparse", "colbert", "ensemble", "self_distill", "bidirectional", "total"}
    assert all({f"loss/train/{t}" for t in terms} <= set(r) for r in fit)
    # HF's linear schedule f(t): warm-up over 2 steps to 1e-3, then linear decay to 0 at t = 16.
    # Composer evaluates the schedule in scheduler.step() before it advances the timestamp, so step
    # s >= 1 runs with f(s - 1): one step behind HF (read in composer/optim/scheduler.py + trainer.py).
    def f(t):
        return 1e-3 * t / 2 if t < 2 else 1e-3 * (MAX_STEPS - t) / (MAX_STEPS - 2)
    lrs = [r["lr-AdamW/group0"] for r in fit]
    assert lrs == pytest.approx([f(max(s - 1, 0)) for s in range(MAX_STEPS)])
    assert [r["lr-AdamW/group1"] for r in fit] == lrs


def test_self_distill_term_is_zero_before_the_start_step_and_on_after(trained):
    (fit,) = read_loss_log(trained["run"] / "losses.jsonl")
    for r in fit:
        on = r["step"] >= SELF_DISTILL_START
        assert r["self_distill_on"] is on
        assert (r["loss/train/self_distill"] > 0) is on, r


def test_resume_from_a_checkpoint_repeats_the_losses_and_switches_self_distill_at_the_same_step(trained, tmp_path):
    """Resume at step 8 (before the switch at 10): every later loss term and learning rate equals the
    uninterrupted run's, so data position, dropout, optimizer, scheduler and the switch all resumed."""
    from m3composer.train import build_trainer

    (full,) = read_loss_log(trained["run"] / "losses.jsonl")
    checkpoint = trained["run"] / "ckpt" / "ep0-ba8-rank0.pt"
    recipe = write_recipe(tmp_path / "recipe.yaml", tiny_recipe(tmp_path, trained["data"],
                                                                trainer={"load_path": str(checkpoint)}))
    trainer = build_trainer(load_config(recipe))
    trainer.fit()
    trainer.close()
    (resumed,) = read_loss_log(tmp_path / "losses.jsonl")
    assert [r["step"] for r in resumed] == list(range(8, MAX_STEPS))
    for got, want in zip(resumed, full[8:], strict=True):
        assert got["self_distill_on"] is want["self_distill_on"]
        for key, value in want.items():
            if key.startswith(("loss/", "lr-")):
                assert got[key] == pytest.approx(value, rel=1e-6, abs=1e-7), (got["step"], key)


def test_export_loads_and_gives_the_in_memory_models_outputs(trained):
    from m3composer.model.m3 import M3Model

    export = trained["run"] / "export"
    for name in ("config.json", "model.safetensors", "colbert_linear.pt", "sparse_linear.pt", "m3composer.json",
                 "tokenizer.json"):
        assert (export / name).is_file(), name
    assert not [p for p in export.parent.iterdir() if p.name.startswith(".export")], "temporary folder left behind"
    from m3composer.fsutil import umask
    for made in (export, export / "model.safetensors", export / "m3composer.json"):   # modes as the umask allows
        assert made.stat().st_mode & 0o777 == {True: 0o777, False: 0o666}[made.is_dir()] & ~umask(), made
    # tiny-xlmr records CLS pooling and no instruction; the export records what training used,
    # and how the heads the folder did not have were started
    recorded = json.loads((export / "m3composer.json").read_text())
    fit = recorded["head_init"].pop("sparse_fit")                  # its values: the idf-fit test below
    assert set(fit) == {"passages", "queries", "positions", "scale", "r2"}
    assert recorded == {
        "pooling": "cls", "normalize": True, "query_instruction": None, "passage_instruction": None,
        "head_init": {"sparse": "idf", "colbert": "default", "new_head_lr_multiplier": 10.0},
        "trained_heads": ["dense", "sparse", "colbert"], "fresh_heads": [],
        "sparse_threshold": 0.0,                                   # model.sparse_threshold (issue 32, item 3)
        "matryoshka": None}                                        # no loss.matryoshka sizes (issue 32, item 2)
    loaded = M3Model.from_pretrained(export).eval()
    live = trained["model"].model.eval()
    batch = trained["probe"][0]
    with torch.no_grad():
        for ids, mask in ((batch["query_input_ids"], batch["query_attention_mask"]),
                          (batch["passage_input_ids"], batch["passage_attention_mask"])):
            a, b = loaded.encode(ids, mask), live.encode(ids, mask)
            for field in ("dense", "sparse", "colbert"):
                x, y = getattr(a, field), getattr(b, field)
                assert x.shape == y.shape and torch.allclose(x, y, atol=1e-6), field
    live.train()


def test_the_exports_model_card_records_the_data_the_recipe_changes_and_the_last_losses(trained):
    from m3composer.data.index import read_index

    export = trained["run"] / "export"
    facts = json.loads((export / "training_run.json").read_text())
    card = (export / "README.md").read_text()
    index = read_index(str(trained["data"]))
    streams = {(s["task"], s["bucket"]): s for s in facts["data"]["streams"]}
    assert facts["data"]["rows"] == index["rows"] == sum(s["rows"] for s in streams.values())
    for entry in index["streams"]:
        recorded = streams[(entry["task"], entry["bucket"])]
        assert (recorded["rows"], recorded["has_teacher_scores"], recorded["is_parallel"]) == (
            entry["rows"], entry["has_teacher_scores"], entry["is_parallel"])
        assert f"| {entry['task']} | {entry['bucket']} | {entry['rows']} |" in card
    changes = facts["recipe_changes"]
    assert changes["optimizer.lr"] == 1e-3 and changes["data.train_group_size"] == 3
    assert changes["trainer.max_duration"] == f"{MAX_STEPS}ba" and changes["model.name_or_path"] == "asset:tiny-xlmr"
    assert "loss.temperature" not in changes and "optimizer.weight_decay" not in changes    # at their defaults
    assert "| `loss.use_self_distill` | True |" in card
    assert facts["base_model"] == "asset:tiny-xlmr" and facts["steps"] == MAX_STEPS and facts["eval"] is None
    (fit,) = read_loss_log(trained["run"] / "losses.jsonl")
    assert facts["final_losses_step"] == fit[-1]["step"] == MAX_STEPS - 1
    assert facts["final_losses"] == {k.removeprefix("loss/train/"): v for k, v in fit[-1].items()
                                     if k.startswith("loss/train/")}
    assert "`callbacks.eval_data` was not set" in card and (export / "plots" / "losses.png").is_file()


def test_the_chosen_pooling_and_instructions_are_logged(trained):
    assert any("pooling=cls query_instruction=None passage_instruction=None" in m for m in trained["log"]), \
        trained["log"]


def _cfg(tmp_path: Path, mds: Path, **sections):
    return load_config(write_recipe(tmp_path / "recipe.yaml", tiny_recipe(tmp_path, mds, **sections)))


def test_model_aware_defaults_follow_the_folder_and_explicit_values_win(tmp_path, e5_dir, tiny_dir):
    from m3composer.train import ModelDefaults, model_aware_defaults

    cfg = _cfg(tmp_path, tmp_path / "data")
    assert model_aware_defaults(cfg, e5_dir) == ModelDefaults("mean", "query: ", "passage: ")
    assert model_aware_defaults(cfg, tiny_dir) == ModelDefaults("cls", None, None)
    explicit = _cfg(tmp_path, tmp_path / "data", model={"pooling": "cls"},
                    data={"query_instruction_for_retrieval": None, "passage_instruction_for_retrieval": "doc: "})
    assert model_aware_defaults(explicit, e5_dir) == ModelDefaults("cls", None, "doc: ")


def test_e5_defaults_are_logged_and_a_microbatch_below_the_device_batch_is_rejected(tmp_path, train_data, caplog):
    from m3composer.train import build_trainer

    caplog.set_level(logging.INFO, logger="m3composer.train")
    cfg = _cfg(tmp_path, train_data, model={"name_or_path": "asset:e5-small"},
               trainer={"device_train_microbatch_size": 3})
    with pytest.raises(ConfigError, match=r"trainer\.device_train_microbatch_size=3 .*largest per-device batch \(4\)"):
        build_trainer(cfg)
    assert "pooling=mean query_instruction='query: ' passage_instruction='passage: '" in caplog.text


def test_unknown_asset_and_missing_model_folder_are_errors_naming_the_key(tmp_path, train_data):
    from m3composer.train import build_trainer

    with pytest.raises(ConfigError, match=r"model\.name_or_path: .*no-such-asset"):
        build_trainer(_cfg(tmp_path, train_data, model={"name_or_path": "asset:no-such-asset"}))
    missing = tmp_path / "not-downloaded"
    with pytest.raises(ConfigError, match=r"model\.name_or_path: .*not-downloaded"):
        build_trainer(_cfg(tmp_path, train_data, model={"name_or_path": str(missing)}))


def test_the_same_command_after_a_finished_autoresume_run_only_exports_again(tmp_path, train_data):
    """Killed after its final checkpoint (e.g. while uploading it): the restart must not crash in
    Composer's fit() ('max_duration ... less than or equal to the elapsed training duration')."""
    from m3composer.train import main

    # With every algorithm, callback and file logger on: the final checkpoint holds their state and
    # loads under the allow-list (m3composer/checkpoints.py).
    eval_rows = train_data.parent / "jsonl" / "train" / "pydoc_topics" / "pydoc_topics_len-0-500.jsonl"
    recipe = write_recipe(tmp_path / "recipe.yaml", tiny_recipe(
        tmp_path, train_data, trainer={"max_duration": "2ba", "save_folder": str(tmp_path / "ckpt"),
                                       "save_interval": "2ba", "autoresume": True},
        model={"fix_position_embedding": True, "sparse_init_passages": 64,
               "gradient_cache": {"enabled": True, "max_sequences": 8}},
        loss={"self_distill_start_step": "1ba"},
        callbacks={"eval_data": str(eval_rows), "eval_interval": "1ba", "eval_max_queries": 4,
                   "eval_passage_max_len": 64, "negative_refresh": {"range": "2-20", "negatives": 2}},
        loggers={"tensorboard": {"log_dir": str(tmp_path / "tensorboard")}}))
    main([str(recipe)]).close()
    export = tmp_path / "export"
    shutil.rmtree(export)                           # as if the kill came before the export
    trainer = main([str(recipe)])
    assert int(trainer.state.timestamp.batch) == 2
    assert (export / "model.safetensors").is_file()
    fits = read_loss_log(tmp_path / "losses.jsonl")
    assert [[r["step"] for r in fit] for fit in fits] == [[0, 1]]   # the second run trained nothing


def test_new_heads_start_as_configured_and_the_export_records_it(tmp_path, tiny_weights_dir, train_data):
    from m3composer.model.folder_config import M3FolderConfig
    from m3composer.train import ModelDefaults, build_model, build_optimizer

    chosen = ModelDefaults("cls", None, None)
    cfg = _cfg(tmp_path, train_data, model={"new_sparse_head_init": "lexical_overlap"},
               optimizer={"new_head_lr_multiplier": 10.0})
    model = build_model(cfg, tiny_weights_dir, chosen)
    sparse = model.model.sparse_linear
    assert torch.count_nonzero(sparse.weight) == 0 and sparse.bias.item() == pytest.approx(0.02 ** 0.5)
    # the two usual groups, then two at 10x the lr holding exactly the fresh heads
    optimizer = build_optimizer(cfg, model)
    lrs = [g["lr"] for g in optimizer.param_groups]
    assert lrs == [cfg.optimizer.lr, cfg.optimizer.lr, 10 * cfg.optimizer.lr, 10 * cfg.optimizer.lr]
    head_params = {id(p) for p in (*sparse.parameters(), *model.model.colbert_linear.parameters())}
    assert {id(p) for g in optimizer.param_groups[2:] for p in g["params"]} == head_params
    export = model.model.save_pretrained(tmp_path / "export")
    assert M3FolderConfig.from_folder(export).head_init == {"sparse": "lexical_overlap", "colbert": "default",
                                                            "new_head_lr_multiplier": 10.0}

    # a folder with trained heads keeps them, and its heads keep the base lr
    trained = build_model(cfg, export, chosen)
    assert not trained.model.fresh_heads
    assert torch.equal(trained.model.sparse_linear.weight, sparse.weight)
    assert [g["lr"] for g in build_optimizer(cfg, trained).param_groups] == [cfg.optimizer.lr] * 2
    default = build_model(_cfg(tmp_path, train_data, model={"new_sparse_head_init": "default"}), tiny_weights_dir,
                          chosen)
    assert torch.count_nonzero(default.model.sparse_linear.weight) > 0      # PyTorch's init, as FlagEmbedding
    assert build_model(_cfg(tmp_path, train_data), tiny_weights_dir, chosen).model.head_init == {
        "sparse": "idf", "colbert": "default", "new_head_lr_multiplier": 10.0}   # the defaults (fitted later)


def test_a_fresh_head_left_out_of_loss_heads_is_not_initialised_fitted_nor_optimised(tmp_path, tiny_weights_dir,
                                                                                     train_data):
    from m3composer.callbacks.head_diagnostics import HeadDiagnostics
    from m3composer.train import ModelDefaults, build_callbacks, build_model, build_optimizer, fit_new_sparse_head

    chosen = ModelDefaults("cls", None, None)
    cfg = _cfg(tmp_path, train_data, loss={"heads": ["dense", "colbert"]})
    model = build_model(cfg, tiny_weights_dir, chosen)
    m3 = model.model
    assert m3.fresh_heads == ("sparse", "colbert") and m3.untrained_fresh_heads() == ("sparse",)
    assert torch.count_nonzero(m3.sparse_linear.weight) > 0            # PyTorch's init, not lexical overlap
    assert m3.head_init == {"colbert": "default", "new_head_lr_multiplier": 10.0}
    assert fit_new_sparse_head(cfg, m3, dataset=None, on_gpu=False) is None     # returns before reading data
    groups = build_optimizer(cfg, model).param_groups
    in_groups = {id(p) for g in groups for p in g["params"]}
    assert not any(id(p) in in_groups for p in m3.sparse_linear.parameters())
    assert {id(p) for g in groups[2:] for p in g["params"]} == {id(p) for p in m3.colbert_linear.parameters()}
    assert any(isinstance(c, HeadDiagnostics) for c in build_callbacks(cfg, False, chosen))
    dense_only = _cfg(tmp_path, train_data, loss={"heads": ["dense"], "use_self_distill": False})
    assert not any(isinstance(c, HeadDiagnostics) for c in build_callbacks(dense_only, False, chosen))


def test_sigterm_mid_epoch_checkpoints_at_the_step_boundary_and_the_same_command_resumes_exactly(trained, tmp_path):
    """One rank, in this process: SIGTERM during step 5, far from any save_interval; fit returns after
    step 5 with a checkpoint at ba6 and no export; the same command resumes there, and every later loss
    term and learning rate equals the uninterrupted run's."""
    import signal

    from m3composer.train import main
    from tests.callbacks.signal_train import with_signal

    (full,) = read_loss_log(trained["run"] / "losses.jsonl")
    recipe = write_recipe(tmp_path / "recipe.yaml", tiny_recipe(
        tmp_path, trained["data"], trainer={"save_folder": str(tmp_path / "ckpt"), "save_interval": "100ba",
                                            "autoresume": True}))
    before = signal.getsignal(signal.SIGTERM)
    undo = with_signal(5, signal.SIGTERM, 0)
    try:
        main([str(recipe)]).close()
    finally:
        undo()
    assert signal.getsignal(signal.SIGTERM) is before, "the old SIGTERM handler was not put back"
    assert sorted(p.name for p in (tmp_path / "ckpt").glob("ep*.pt")) == ["ep0-ba6-rank0.pt"]
    assert not (tmp_path / "export").exists(), "a preempted run exported a model"
    main([str(recipe)]).close()
    stopped, resumed = read_loss_log(tmp_path / "losses.jsonl")
    assert [r["step"] for r in stopped] == list(range(6))
    assert [r["step"] for r in resumed] == list(range(6, MAX_STEPS))
    for got, want in zip(stopped + resumed, full, strict=True):
        assert got["self_distill_on"] is want["self_distill_on"]
        for key, value in want.items():
            if key.startswith(("loss/", "lr-")):
                assert got[key] == pytest.approx(value, rel=1e-6, abs=1e-7), (got["step"], key)
    assert (tmp_path / "export" / "model.safetensors").is_file()


def test_train_subset_num_batches_ends_every_epoch_after_n_steps_of_a_fresh_plan(tmp_path, train_data):
    """`trainer.train_subset_num_batches` N: epochs of N steps (Composer's option), each the start of
    that epoch's own plan; epoch-end callbacks (DataEpoch's batch count, NegativeRefresh) run after N."""
    from m3composer.train import build_trainer

    recipe = write_recipe(tmp_path / "recipe.yaml", tiny_recipe(
        tmp_path, train_data, trainer={"max_duration": "2ep", "train_subset_num_batches": 3}))
    trainer = build_trainer(load_config(recipe))
    dataset = trainer.state.train_dataloader.dataset
    assert len(dataset) > 3
    planned = [dataset.batch(epoch, step)["row_ids"] for epoch in (0, 1) for step in range(3)]
    trainer.fit()
    assert (int(trainer.state.timestamp.epoch), int(trainer.state.timestamp.batch)) == (2, 6)
    assert int(trainer.state.dataloader_len) == 3
    assert dataset.epoch == 1                        # the second epoch drew its own plan
    assert not torch.equal(planned[0], planned[3])
    fits = read_loss_log(tmp_path / "losses.jsonl")
    assert [r["step"] for r in fits[0]] == list(range(6))
    trainer.close()


def test_train_subset_num_batches_below_one_is_an_error_naming_the_key(tmp_path, train_data):
    recipe = write_recipe(tmp_path / "recipe.yaml", tiny_recipe(tmp_path, train_data,
                                                                trainer={"train_subset_num_batches": 0}))
    with pytest.raises(ConfigError, match="trainer.train_subset_num_batches"):
        load_config(recipe)


def test_a_fresh_sparse_head_is_fitted_to_idf_on_the_training_data_and_the_export_records_it(trained):
    """The default `model.new_sparse_head_init: idf` (model/sparse_fit.py) on the run's own rows."""
    from m3composer.model.folder_config import M3FolderConfig

    head_init = M3FolderConfig.from_folder(trained["run"] / "export").head_init
    assert head_init["sparse"] == "idf"
    fit = head_init["sparse_fit"]
    assert fit["passages"] > 0 and fit["queries"] > 0 and fit["positions"] > fit["passages"]
    assert 0 < fit["r2"] <= 1 and fit["scale"] > 0
    assert any("fitted to idf" in m for m in trained["log"])



# ---- checkpoint loading without pickle's code execution (m3composer/checkpoints.py) --------------
class _Payload:
    """Unpickling this runs `touch MARKER` (what a crafted checkpoint does)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os
        return os.system, (f"touch {self.marker}",)


def _crafted(path: Path, marker: Path, inside: Path | None = None) -> Path:
    """`{"state": payload}`, or a real checkpoint (`inside`) with the payload deep in its optimizer state."""
    if inside is None:
        torch.save({"state": _Payload(marker)}, path)
    else:
        checkpoint = torch.load(inside, weights_only=False)     # our own file: trusted
        (optimizer,) = checkpoint["state"]["optimizers"].values()
        next(iter(optimizer["state"].values()))["exp_avg_sq_max"] = _Payload(marker)
        torch.save(checkpoint, path)
    return path


def test_every_checkpoint_of_a_run_loads_under_the_allow_list(trained):
    from m3composer import checkpoints

    saved = sorted((trained["run"] / "ckpt").glob("ep*-ba*.pt"))
    assert len(saved) == MAX_STEPS // 4
    for path in saved:
        loaded = checkpoints.load(path)
        assert {"model", "optimizers", "schedulers", "timestamp", "dataset_state"} <= set(loaded["state"])
        assert loaded["rng"] and loaded["state"]["dataset_state"]["train"]["step"] > 0


@pytest.mark.parametrize("where", ["top level", "inside the optimizer state"])
def test_a_crafted_checkpoint_is_refused_without_running_its_payload(trained, tmp_path, where):
    from m3composer.checkpoints import CheckpointError
    from m3composer.train import build_trainer

    marker = tmp_path / "payload-ran"
    inside = trained["run"] / "ckpt" / "ep0-ba8-rank0.pt" if where != "top level" else None
    crafted = _crafted(tmp_path / "crafted.pt", marker, inside)
    recipe = write_recipe(tmp_path / "recipe.yaml", tiny_recipe(tmp_path, trained["data"],
                                                                trainer={"load_path": str(crafted)}))
    with pytest.raises(CheckpointError) as refused:
        build_trainer(load_config(recipe))
    assert not marker.exists()
    message = str(refused.value)
    assert "\n" not in message and str(crafted) in message and "posix.system" in message
    assert "trainer.trust_checkpoint=true" in message


def test_trust_checkpoint_loads_with_full_pickle(trained, tmp_path):
    """The documented opt-in does what it says: the file is unpickled, its code runs."""
    from m3composer.train import build_trainer

    marker = tmp_path / "payload-ran"
    crafted = _crafted(tmp_path / "crafted.pt", marker)
    recipe = write_recipe(tmp_path / "recipe.yaml", tiny_recipe(tmp_path, trained["data"], trainer={
        "load_path": str(crafted), "trust_checkpoint": True}))
    with pytest.raises(Exception):                  # not a checkpoint after all
        build_trainer(load_config(recipe))
    assert marker.exists()


def test_an_unreadable_checkpoint_is_one_line_naming_the_file_and_the_earlier_ones(trained, tmp_path):
    """A truncated latest checkpoint: the error (scripts/train.py prints it as its one line) names
    the file and the earlier checkpoint the save folder keeps."""
    from m3composer.checkpoints import CheckpointError
    from m3composer.train import main

    folder = tmp_path / "ckpt"
    folder.mkdir()
    shutil.copy(trained["run"] / "ckpt" / "ep0-ba4-rank0.pt", folder / "ep0-ba4-rank0.pt")
    latest = trained["run"] / "ckpt" / "ep0-ba8-rank0.pt"
    (folder / "ep0-ba8-rank0.pt").write_bytes(latest.read_bytes()[: latest.stat().st_size // 2])
    recipe = write_recipe(tmp_path / "recipe.yaml", tiny_recipe(tmp_path, trained["data"], trainer={
        "load_path": str(folder / "ep0-ba8-rank0.pt"), "save_folder": str(folder), "save_num_checkpoints_to_keep": 2}))
    with pytest.raises(CheckpointError) as refused:
        main([str(recipe)])
    message = str(refused.value)
    assert "\n" not in message and message.startswith(f"{folder / 'ep0-ba8-rank0.pt'}: cannot read this checkpoint")
    assert "save_num_checkpoints_to_keep=2" in message and "ep0-ba4-rank0.pt" in message


def test_a_finished_run_keeps_nothing_of_its_dataset_alive(tmp_path, train_data):
    """Composer's atexit hook of a closed engine would hold the run's state, and with it the dataset's
    shared memory and file descriptors, until the process exits (train.closed_at_end drops it)."""
    import gc
    import weakref

    from m3composer.train import main

    recipe = write_recipe(tmp_path / "recipe.yaml", tiny_recipe(
        tmp_path, train_data, model={"sparse_init_passages": 64}, trainer={"max_duration": "2ba"}))
    trainer = main([str(recipe)])
    dataset = weakref.ref(trainer.state.train_dataloader.dataset)
    del trainer
    gc.collect()
    assert dataset() is None


def test_a_matryoshka_size_the_models_vectors_do_not_have_is_a_config_error_naming_the_key(tmp_path, tiny_weights_dir):
    from m3composer.train import ModelDefaults, build_model

    chosen = ModelDefaults("cls", None, None)      # the tiny model: hidden 32, ColBERT vectors of 32
    model = build_model(_cfg(tmp_path, tmp_path / "data", loss={"matryoshka": {"dense_dims": [16, 8]}},
                             model={"colbert_dim": 24}), tiny_weights_dir, chosen)
    assert model.model.matryoshka == {"dense_dims": [16, 8], "colbert_dims": []}
    with pytest.raises(ConfigError, match=r"loss\.matryoshka\.dense_dims: .*below the dense vectors' size 32, got \[32\]"):
        build_model(_cfg(tmp_path, tmp_path / "data", loss={"matryoshka": {"dense_dims": [32]}}), tiny_weights_dir,
                    chosen)
    with pytest.raises(ConfigError, match=r"loss\.matryoshka\.colbert_dims: .*size 24, got \[24\]"):
        build_model(_cfg(tmp_path, tmp_path / "data", loss={"matryoshka": {"colbert_dims": [24]}},
                         model={"colbert_dim": 24}), tiny_weights_dir, chosen)

"""ExportModel (m3composer/callbacks/export.py): the FlagEmbedding-layout folder at fit end and every
N batches or epochs, written atomically, in real Composer runs of the tiny XLM-R model on the
synthetic streams of tests/data/m3_tiny_data.py (24 rows, 4 per step: 6 steps per epoch)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from composer import Trainer
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from m3composer.callbacks.export import ExportModel, export_model
from m3composer.data.collate import make_data_spec
from m3composer.data.dataset import M3TrainDataset
from m3composer.model.folder_config import M3FolderConfig
from m3composer.model.composer_model import ComposerM3
from m3composer.model.m3 import M3Model
from tests.data.m3_tiny_data import StreamSpec, write_converted
from m3composer.testing.settings import dataset_settings
from tests.model.conftest import model_settings

FILES = {"config.json", "model.safetensors", "colbert_linear.pt", "sparse_linear.pt", "m3composer.json"}


def _trainer(tmp_path: Path, tiny_dir: Path, callbacks: list, max_duration: str, load_tokenizer: bool = True,
             **settings) -> Trainer:
    """`load_tokenizer=False`: a model without its tokenizer, whose exports (and their reloads) skip the
    250k-entry tokenizer's files, for the tests that look only at weights and schedules."""
    data = write_converted(tmp_path / "mds", [StreamSpec("t", "len-0-500", 24, num_pos=1, num_neg=3)])
    dataset = M3TrainDataset(str(data), **dataset_settings(train_group_size=2, default_batch_size=4, seed=1,
                                                           query_max_len=16, passage_max_len=16))
    model = ComposerM3(M3Model.from_pretrained(tiny_dir, load_tokenizer=load_tokenizer),
                       **model_settings(train_group_size=2, **settings))
    return Trainer(model=model, train_dataloader=make_data_spec(DataLoader(dataset, batch_size=None)),
                   optimizers=torch.optim.AdamW(model.parameters(), lr=1e-2), max_duration=max_duration,
                   device="cpu", device_train_microbatch_size=dataset.max_per_device_batch_size,
                   callbacks=callbacks, progress_bar=False, seed=1)


def _weights(folder: Path) -> dict:
    return load_file(folder / "model.safetensors")


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


def test_exports_every_n_batches_every_epoch_and_at_fit_end(tmp_path, tiny_dir):
    by_batch, by_epoch = tmp_path / "by_batch", tmp_path / "by_epoch"
    trainer = _trainer(tmp_path, tiny_dir, [ExportModel(str(by_batch), "3ba"), ExportModel(str(by_epoch), "1ep")],
                       "8ba", load_tokenizer=False)
    trainer.fit()
    trainer.close()

    # every 3 batches -> steps 3 and 6; once per epoch (6 steps) -> step 6; both: the final one at step 8
    assert sorted(p.name for p in by_batch.iterdir() if p.is_dir()) == ["step-3", "step-6"]
    assert sorted(p.name for p in by_epoch.iterdir() if p.is_dir()) == ["step-6"]
    for folder in (by_batch, by_batch / "step-3", by_batch / "step-6", by_epoch, by_epoch / "step-6"):
        assert FILES <= {p.name for p in folder.iterdir()}, folder
        M3Model.from_pretrained(folder)   # loadable
    step3, step6, final = _weights(by_batch / "step-3"), _weights(by_batch / "step-6"), _weights(by_batch)
    assert _same(step6, _weights(by_epoch / "step-6")) and _same(final, _weights(by_epoch))
    assert not _same(step3, step6) and not _same(step6, final)     # each export is the model of its step
    live = trainer.state.model.model.encoder.state_dict()
    assert all(final[k].equal(live[k]) for k in final)
    assert not [p for p in tmp_path.rglob(".*tmp-*")], "temporary folder left behind"


def test_a_failing_export_leaves_no_half_folder_and_keeps_the_previous_one(tmp_path, tiny_dir, monkeypatch):
    export = tmp_path / "export"
    trainer = _trainer(tmp_path, tiny_dir, [ExportModel(str(export), None)], "2ba", load_tokenizer=False)
    trainer.fit()
    before = _weights(export)

    def disk_full(*args, **kwargs):
        raise OSError("disk full")

    # the last file of the folder fails: everything else has been written by then
    monkeypatch.setattr(M3FolderConfig, "save", disk_full)
    with torch.no_grad():
        for p in trainer.state.model.parameters():
            p.add_(1.0)                      # a different model, so a partial overwrite would show
    with pytest.raises(OSError, match="disk full"):
        export_model(trainer.state, export)                  # replacing an existing export
    with pytest.raises(OSError, match="disk full"):
        export_model(trainer.state, tmp_path / "new-export")  # a first export
    trainer.close()

    assert _same(_weights(export), before)
    assert FILES <= {p.name for p in export.iterdir()}
    assert not (tmp_path / "new-export").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "mds"], "temporary folders left behind"


def test_an_export_that_fails_at_fit_end_fails_the_run(tmp_path, tiny_dir, monkeypatch):
    def disk_full(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(M3FolderConfig, "save", disk_full)
    trainer = _trainer(tmp_path, tiny_dir, [ExportModel(str(tmp_path / "export"), None)], "1ba", load_tokenizer=False)
    with pytest.raises(OSError, match="disk full"):
        trainer.fit()
    trainer.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mds"]


EVAL_PAIRS = [("how do I open a file", "Use open(path) to read a file."),
              ("sort a list", "sorted() returns a new sorted list."),
              ("dictionary", "A dictionary maps keys to values."),
              ("exception handling", "try and except catch errors raised in a block.")]


def _card_numbers(card: str, title: str) -> dict[str, list[str]]:
    """`{first cell: other cells}` of the markdown table under the `### title` heading of a card."""
    section = card.split(f"### {title}\n", 1)[1].split("\n#", 1)[0]
    rows = [line.strip("|").split("|") for line in section.splitlines() if line.startswith("| ")]
    return {cells[0].strip(): [c.strip() for c in cells[1:]] for cells in rows[1:]}


def test_every_export_has_a_model_card_whose_figures_are_the_runs_logs(tmp_path, tiny_dir):
    from m3composer.callbacks.loss_log import LossLog
    from m3composer.callbacks.plots import Plots
    from m3composer.callbacks.retrieval_eval import RetrievalEval

    eval_file = tmp_path / "eval.jsonl"
    eval_file.write_text("".join(json.dumps({"query": q, "pos": [p]}) + "\n" for q, p in EVAL_PAIRS))
    export = tmp_path / "export"
    facts = {"run_name": "card-test", "base_model": "asset:tiny-xlmr", "recipe_changes": {"optimizer.lr": 0.01},
             "eval_data": str(eval_file)}
    evaluation = RetrievalEval(eval_file, interval="3ba", max_queries=None, batch_size=8, query_max_len=16, passage_max_len=32)
    plots, loss_log = Plots(tmp_path / "run"), LossLog(tmp_path / "losses.jsonl")
    trainer = _trainer(tmp_path, tiny_dir, [evaluation, ExportModel(str(export), "3ba", facts), loss_log, plots],
                       "4ba")
    trainer.fit()
    trainer.close()

    logged = [json.loads(line) for line in (tmp_path / "losses.jsonl").read_text().splitlines()][1:]
    evaluated = dict(evaluation.history)          # {batch: results}: at step 3 and at the end (4)
    assert sorted(evaluated) == [3, 4]
    for folder, steps in ((export / "step-3", 3), (export, 4)):
        card = (folder / "README.md").read_text()
        recorded = json.loads((folder / "training_run.json").read_text())
        assert recorded["steps"] == steps and f"exported at step {steps}." in card
        assert recorded["run_name"] == "card-test" and "`asset:tiny-xlmr`" in card and "| `optimizer.lr` | 0.0100 |" in card
        # the last step's loss terms are LossLog's record of that step (0-based step = steps - 1)
        last = logged[steps - 1]
        assert last["step"] == recorded["final_losses_step"] == steps - 1
        table = _card_numbers(card, "Final losses")
        for term in ("dense", "sparse", "colbert", "ensemble", "total"):
            assert recorded["final_losses"][term] == pytest.approx(last[f"loss/train/{term}"], rel=1e-9)
            assert table[term] == [f"{last[f'loss/train/{term}']:.4f}"]
        # the held-out metrics are RetrievalEval's results at that step
        assert recorded["eval"]["step"] == steps and recorded["eval"]["data"] == str(eval_file)
        table = _card_numbers(card, "Held-out retrieval")
        metric_names = [n.strip() for n in card.split("### Held-out retrieval")[1].split("| head |")[1]
                        .splitlines()[0].strip(" |").split("|")]
        for head in ("dense", "sparse", "colbert", "ensemble"):
            assert recorded["eval"]["metrics"][head] == pytest.approx(evaluated[steps][head], rel=1e-9)
            assert table[head] == [f"{evaluated[steps][head][m]:.4f}" for m in metric_names]
        assert recorded["wall_time_s"] > 0 and "CPU" in recorded["hardware"]["summary"]
        assert (folder / "plots" / "losses.png").stat().st_size > 1000 and "](plots/losses.png)" in card
        assert "BGEM3FlagModel" in card and "AutoModel" in card and "m3c export-st" in card
    # the card of a sentence-transformers folder is made from the same facts
    from m3composer.model.st_export import export_sentence_transformers
    export_sentence_transformers(export, tmp_path / "st", heads=["dense"])
    st_card = (tmp_path / "st" / "dense" / "README.md").read_text()
    assert _card_numbers(st_card, "Final losses") == _card_numbers((export / "README.md").read_text(), "Final losses")
    assert "SentenceTransformer(" in st_card and (tmp_path / "st" / "dense" / "plots" / "losses.png").is_file()


def test_a_subset_export_keeps_every_head_says_which_were_trained_and_eval_skips_the_fresh_one(tmp_path, tiny_dir,
                                                                                               capsys):
    """loss.heads=[dense, colbert] from a folder without heads: the fresh sparse head is saved as it
    was initialised, recorded as fresh, named in the card, and left out of every evaluation."""
    from m3composer.callbacks.retrieval_eval import RetrievalEval
    from m3composer.cli import main as m3c
    from m3composer.model.inference import heads_in_folder

    eval_file = tmp_path / "eval.jsonl"
    eval_file.write_text("".join(json.dumps({"query": q, "pos": [p]}) + "\n" for q, p in EVAL_PAIRS))
    export = tmp_path / "export"
    evaluation = RetrievalEval(eval_file, interval=None, max_queries=None, batch_size=8, query_max_len=16,
                               passage_max_len=32)
    trainer = _trainer(tmp_path, tiny_dir, [evaluation, ExportModel(str(export), None, {"run_name": "heads"})],
                       "2ba", heads=("colbert", "dense"))
    m3 = trainer.state.model.model
    before = {name: p.detach().clone() for name, p in m3.named_parameters() if not name.startswith("encoder.")}
    trainer.fit()
    trainer.close()

    for name in ("sparse_linear.weight", "sparse_linear.bias"):          # saved exactly as initialised
        assert torch.equal(torch.load(export / "sparse_linear.pt")[name.split(".")[1]], before[name])
    assert not torch.equal(torch.load(export / "colbert_linear.pt")["weight"], before["colbert_linear.weight"])
    recorded = M3FolderConfig.from_folder(export)
    assert recorded.trained_heads == ["dense", "colbert"] and recorded.fresh_heads == ["sparse"]
    assert heads_in_folder(export) == ("dense", "colbert")
    facts = json.loads((export / "training_run.json").read_text())
    assert facts["trained_heads"] == ["dense", "colbert"] and facts["fresh_heads"] == ["sparse"]
    card = (export / "README.md").read_text()
    assert ("heads trained (`loss.heads`): `dense`, `colbert`; not trained: `sparse` (fresh: never trained, "
            "skipped by `m3c eval`)") in card
    # the callback evaluated the trained heads and their ensemble only
    (_, results), = evaluation.history
    assert results["heads"] == ["dense", "colbert"] and "sparse" not in results and "ensemble" in results
    # so does m3c eval on the export, and it says why
    assert m3c(["eval", str(export), str(eval_file), "--output", str(tmp_path / "m.json"), "--no-progress",
                "--passage-max-len", "32"]) == 0
    assert "never trained" in capsys.readouterr().err
    cli = json.loads((tmp_path / "m.json").read_text())
    assert cli["skipped_heads"] == ["sparse"] and cli["trained_heads"] == ["dense", "colbert"]
    assert cli["heads"] == ["dense", "colbert"] and "sparse" not in cli and "ensemble" in cli
    # m3c export-st writes the trained heads' folders only
    from m3composer.model.st_export import export_sentence_transformers
    assert sorted(export_sentence_transformers(export, tmp_path / "st")) == ["colbert", "dense"]
    with pytest.raises(ValueError, match="no trained sparse head .*never trained"):
        export_sentence_transformers(export, tmp_path / "st2", heads=["sparse"])
    # a later run that trains the sparse head makes it a trained head of its export
    again = ComposerM3(M3Model.from_pretrained(export), **model_settings(heads=("sparse",)))
    assert again.model.fresh_heads == ("sparse",) and again.model.untrained_fresh_heads() == ()
    again.model.save_pretrained(tmp_path / "again")
    assert heads_in_folder(tmp_path / "again") == ("dense", "sparse", "colbert")


def test_a_matryoshka_export_records_its_sizes_and_the_card_says_what_each_costs(tmp_path, tiny_dir):
    export = tmp_path / "export"
    sizes = {"dense_dims": [16, 8], "dense_weights": [], "colbert_dims": [8, 4], "colbert_weights": [1.0, 0.5]}
    trainer = _trainer(tmp_path, tiny_dir, [ExportModel(str(export), None, {"run_name": "mrl"})], "1ba",
                       load_tokenizer=False, matryoshka=sizes)
    trainer.fit()
    trainer.close()
    recorded = {"dense_dims": [16, 8], "colbert_dims": [8, 4]}
    assert M3FolderConfig.from_folder(export).matryoshka == recorded
    assert M3Model.from_pretrained(export).matryoshka == recorded
    assert json.loads((export / "training_run.json").read_text())["matryoshka"] == recorded
    card = (export / "README.md").read_text()
    assert "Matryoshka sizes trained besides the full ones (`loss.matryoshka`)" in card
    assert "dense vector: 16 (64 bytes fp32, 32 fp16), 8 (32 bytes fp32, 16 fp16)" in card
    assert "ColBERT vector per token: 8 (32 bytes fp32, 16 fp16), 4 (16 bytes fp32, 8 fp16)" in card
    # a run without sizes records none, and its card says nothing about them
    plain = _trainer(tmp_path / "plain", tiny_dir, [ExportModel(str(tmp_path / "plain-export"), None, None)], "1ba",
                     load_tokenizer=False)
    plain.fit()
    plain.close()
    assert M3FolderConfig.from_folder(tmp_path / "plain-export").matryoshka is None
    assert "Matryoshka" not in (tmp_path / "plain-export" / "README.md").read_text()

"""Plots: loss and eval PNGs from a metric history, and the Plots logger inside a real Trainer run."""
import json
import math

import pytest
import torch
from composer import Trainer
from composer.core import Timestamp
from composer.loggers import InMemoryLogger
from matplotlib import image as mpimg

from m3composer.callbacks.plots import Plots, normalize_history, write_plots
from m3composer.callbacks.retrieval_eval import RetrievalEval
from m3composer.model.m3 import M3Model
from tests.callbacks.test_retrieval_eval import PAIRS, DenseOnly, batches

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def synthetic_history(steps=30):
    history = {f"loss/train/{term}": [(s, scale * math.exp(-s / 10) + 0.05) for s in range(steps)]
               for term, scale in (("dense", 2.0), ("sparse", 3.0), ("colbert", 2.5), ("total", 2.4))}
    history["loss/train/self_distill"] = [(s, 0.0) for s in range(steps)]     # switched off all run
    for head, base in (("dense", 0.5), ("ensemble", 0.6)):
        for metric in ("recall@1", "recall@10", "mrr@10", "ndcg@10"):
            history[f"metrics/eval/{head}/{metric}"] = [(s, base + s / 100) for s in (0, 10, 20, 29)]
    return history


def test_the_same_history_is_drawn_once_and_its_pngs_written_again(tmp_path, monkeypatch):
    """At fit end the export's card and the Plots logger write the same history: one drawing."""
    from m3composer.callbacks import plots

    history = synthetic_history(8)
    first = write_plots(tmp_path / "a", history)
    with monkeypatch.context() as patched:
        patched.setattr(plots, "_render", lambda *args: pytest.fail("the same history was drawn again"))
        second = write_plots(tmp_path / "b", {name: list(points) for name, points in history.items()})
    assert [p.name for p in second] == [p.name for p in first] == ["losses.png", "eval.png"]
    assert [p.read_bytes() for p in second] == [p.read_bytes() for p in first]
    history["loss/train/dense"][-1] = (7, 9.0)                          # another history is drawn anew
    assert (write_plots(tmp_path / "c", history)[0].read_bytes() != first[0].read_bytes())


def test_write_plots_makes_two_non_empty_pngs_and_leaves_out_all_zero_terms(tmp_path):
    written = write_plots(tmp_path / "run", synthetic_history())
    assert written == [tmp_path / "run" / "plots" / "losses.png", tmp_path / "run" / "plots" / "eval.png"]
    for path in written:
        assert path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 10_000
    losses = mpimg.imread(written[0])
    # 4 panels (dense, sparse, colbert, total; self_distill is all zero) of 2.2 in at 110 dpi
    assert losses.shape[0] == round(4 * 2.2 * 110)
    assert losses[..., :3].std() > 0.05                          # something is drawn, not a blank canvas
    evaluation = mpimg.imread(written[1])
    assert evaluation.shape[:2] == (round(2 * 3.4 * 110), round(2 * 5.5 * 110))   # 4 metrics in a 2 x 2 grid
    assert sorted(p.name for p in (tmp_path / "run" / "plots").iterdir()) == ["eval.png", "losses.png"]  # no temp files


def test_history_from_an_in_memory_logger_and_empty_histories(tmp_path):
    data = {"loss/train/total": [(Timestamp(batch=3), torch.tensor(1.5)), (Timestamp(batch=4), 1.0)],
            "metrics/eval/dense/ndcg@10": [(Timestamp(batch=4), 0.25)],
            "some/text": [(Timestamp(batch=1), "not a number")]}
    assert normalize_history(data) == {"loss/train/total": [(3, 1.5), (4, 1.0)],
                                       "metrics/eval/dense/ndcg@10": [(4, 0.25)]}
    assert [p.name for p in write_plots(tmp_path, data)] == ["losses.png", "eval.png"]
    assert write_plots(tmp_path / "empty", {}) == []
    assert not (tmp_path / "empty").exists()


@pytest.mark.parametrize("as_logger", [True, False])
def test_plots_records_a_training_run_and_writes_at_fit_end(tiny_dir, tokenizer, tmp_path, as_logger):
    eval_path = tmp_path / "eval.jsonl"
    eval_path.write_text("".join(json.dumps({"query": q, "pos": [p]}) + "\n" for q, p in PAIRS))
    torch.manual_seed(0)
    m3 = M3Model.from_pretrained(tiny_dir).train()
    plots = Plots(tmp_path / "run", smoothing_window=2)
    memory = InMemoryLogger()
    Trainer(model=DenseOnly(m3), train_dataloader=batches(tokenizer, 6), max_duration="6ba",
            optimizers=torch.optim.SGD(m3.parameters(), lr=0.5), device="cpu", progress_bar=False,
            device_train_microbatch_size=len(PAIRS),
            callbacks=[RetrievalEval(eval_path, interval="3ba", max_queries=None, heads=("dense",))] + ([] if as_logger else [plots]),
            loggers=[memory] + ([plots] if as_logger else [])).fit()
    assert [s for s, _ in plots.history["loss/train/dense"]] == [int(ts.batch) for ts, _ in
                                                                 memory.data["loss/train/dense"]]
    assert len(plots.history["loss/train/dense"]) == 6
    assert [s for s, _ in plots.history["metrics/eval/dense/mrr@10"]] == [3, 6]
    assert plots.written == [tmp_path / "run" / "plots" / "losses.png", tmp_path / "run" / "plots" / "eval.png"]
    assert all(p.stat().st_size > 10_000 for p in plots.written)


def test_head_diagnostics_are_recorded_and_drawn_under_the_losses(tmp_path):
    plots = Plots(tmp_path / "run")
    for step in range(3):
        plots.log_metrics({"heads/sparse/zero_weight_share": 0.9 - step / 10, "grad_norm/total": 5.0,
                           "metrics/eval/dense/ndcg@10": 0.5}, step=step)
    assert [v for _, v in plots.history["heads/sparse/zero_weight_share"]] == pytest.approx([0.9, 0.8, 0.7])
    assert "grad_norm/total" not in plots.history          # only the series the plot draws are kept
    history = dict(synthetic_history(), **{"heads/sparse/zero_weight_share": [(s, 0.5) for s in range(30)]})
    written = write_plots(tmp_path / "run", history)
    with_diagnostics = written[0].stat().st_size
    without = write_plots(tmp_path / "plain", synthetic_history())[0].stat().st_size
    assert with_diagnostics > without                      # one more panel in losses.png


def test_a_full_runs_loss_plot_is_a_grid_that_fits_a_screen(tmp_path):
    """Eight loss terms and the four head diagnostics: 3 columns of 4 panels (968 x 1815 px at 110 dpi),
    not one column of twelve (2,904 px tall); five panels stay in one column, six take 2 columns of 3."""
    from m3composer.callbacks.plots import DIAGNOSTIC_SERIES, LOSS_ORDER, loss_grid

    # (loss.sparsity is off in such a run: its term stays 0 and is not drawn; issue 32 added the key)
    history = {f"loss/train/{term}": [(s, 1.0 + s / 10) for s in range(12)] for term in LOSS_ORDER
               if term != "sparsity"}
    history.update({name: [(s, 0.5) for s in range(12)] for name in DIAGNOSTIC_SERIES})
    image = mpimg.imread(write_plots(tmp_path / "run", history)[0])
    assert loss_grid(12) == (4, 3) and image.shape[:2] == (round(4 * 2.2 * 110), round(3 * 5.5 * 110))
    assert image.shape[0] <= 1200 and image.shape[1] <= 1920
    assert [loss_grid(n) for n in (1, 4, 5, 6, 8, 10, 16)] == [(1, 1), (4, 1), (5, 1), (3, 2), (4, 2), (5, 2), (4, 4)]
    six = {f"loss/train/{term}": history[f"loss/train/{term}"] for term in LOSS_ORDER[:6]}
    assert mpimg.imread(write_plots(tmp_path / "six", six)[0]).shape[:2] == (round(3 * 2.2 * 110),
                                                                              round(2 * 5.5 * 110))

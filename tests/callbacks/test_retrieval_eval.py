"""RetrievalEval in a real Composer Trainer: metrics logged at the configured steps, equal to m3c eval's."""
import json

import pytest
import torch
from composer import Trainer
from composer.loggers import InMemoryLogger
from composer.models import ComposerModel
from torch.utils.data import DataLoader

from m3composer.callbacks.retrieval_eval import RetrievalEval, eval_metrics_to_log
from m3composer.model.m3 import M3Model
from m3composer.retrieval.beir import load_eval_set
from m3composer.retrieval.evaluate import evaluate_model

PAIRS = [("how do I open a file", "Use open(path) to read a file."),
         ("list comprehension", "List comprehensions build lists: [x for x in y]."),
         ("sort a list", "sorted() returns a new sorted list."),
         ("dictionary", "A dictionary maps keys to values.")]


class DenseOnly(ComposerModel):
    """The smallest ComposerModel around an M3Model: in-batch InfoNCE on the dense head."""

    def __init__(self, m3: M3Model):
        super().__init__()
        self.model = m3

    def forward(self, batch):
        q = self.model.encode(batch["query_input_ids"], batch["query_attention_mask"], with_sparse=False,
                              with_colbert=False)
        p = self.model.encode(batch["passage_input_ids"], batch["passage_attention_mask"], with_sparse=False,
                              with_colbert=False)
        return q.dense @ p.dense.T / 0.05

    def loss(self, outputs, batch):
        dense = torch.nn.functional.cross_entropy(outputs, torch.arange(outputs.shape[0]))
        return {"dense": dense, "total": dense}


def batches(tokenizer, n):
    q = tokenizer([a for a, _ in PAIRS], padding=True, return_tensors="pt")
    p = tokenizer([b for _, b in PAIRS], padding=True, return_tensors="pt")
    one = {"query_input_ids": q["input_ids"], "query_attention_mask": q["attention_mask"],
           "passage_input_ids": p["input_ids"], "passage_attention_mask": p["attention_mask"]}
    return DataLoader([one] * n, batch_size=None)


@pytest.fixture()
def eval_path(tmp_path):
    path = tmp_path / "eval.jsonl"
    path.write_text("".join(json.dumps({"query": q, "pos": [p]}) + "\n" for q, p in PAIRS))
    return path


def train(tiny_dir, tokenizer, callback, steps, tmp_path):
    torch.manual_seed(0)
    m3 = M3Model.from_pretrained(tiny_dir).train()
    memory = InMemoryLogger()
    trainer = Trainer(model=DenseOnly(m3), train_dataloader=batches(tokenizer, steps), max_duration=f"{steps}ba",
                      optimizers=torch.optim.SGD(m3.parameters(), lr=0.5), callbacks=[callback], loggers=[memory],
                      device="cpu", progress_bar=False, save_folder=None, run_name="t",
                      device_train_microbatch_size=len(PAIRS))
    trainer.fit()
    return trainer, m3, memory


def test_metrics_are_logged_at_every_interval_and_at_fit_end(tiny_dir, tokenizer, eval_path, tmp_path):
    callback = RetrievalEval(eval_path, interval="2ba", max_queries=None, heads=("dense", "sparse", "colbert"), batch_size=3)
    trainer, m3, memory = train(tiny_dir, tokenizer, callback, steps=5, tmp_path=tmp_path)
    for head in ("dense", "sparse", "colbert", "ensemble"):
        for metric in ("recall@1", "recall@10", "mrr@10", "ndcg@10"):
            points = memory.data[f"metrics/eval/{head}/{metric}"]
            assert [int(ts.batch) for ts, _ in points] == [2, 4, 5]          # interval, interval, fit end
            assert all(0.0 <= v <= 1.0 for _, v in points)
    assert [batch for batch, _ in callback.history] == [2, 4, 5]
    # the last logged numbers are m3c eval's numbers for the trained model, and it is back in train mode
    assert m3.training
    final = evaluate_model(m3, load_eval_set(eval_path), batch_size=3)
    logged = {k: v[-1][1] for k, v in memory.data.items() if k.startswith("metrics/eval/")}
    assert logged == eval_metrics_to_log(final)
    assert len(logged) == 16


def test_fit_end_is_not_evaluated_twice_and_interval_none_means_fit_end_only(tiny_dir, tokenizer, eval_path,
                                                                             tmp_path):
    on_last_step = RetrievalEval(eval_path, interval="2ba", max_queries=None, heads=("dense",), label="ret")
    _, _, memory = train(tiny_dir, tokenizer, on_last_step, steps=4, tmp_path=tmp_path)
    assert [int(ts.batch) for ts, _ in memory.data["metrics/ret/dense/ndcg@10"]] == [2, 4]
    assert "metrics/ret/sparse/ndcg@10" not in memory.data
    end_only = RetrievalEval(eval_path, interval=None, max_queries=2, heads=("dense",))
    _, _, memory = train(tiny_dir, tokenizer, end_only, steps=2, tmp_path=tmp_path)
    assert [int(ts.batch) for ts, _ in memory.data["metrics/eval/dense/recall@1"]] == [2]
    assert end_only.history[0][1]["num_queries"] == 2


def test_unknown_evaluation_arguments_are_refused(eval_path):
    with pytest.raises(TypeError, match="passage_max_length"):
        RetrievalEval(eval_path, interval=None, max_queries=None, passage_max_length=10)

"""The model card (`README.md`) of an export folder, rendered from what the training run knew.

A training export (`run_dir/export`, the periodic `step-N` folders) records its run in
`training_run.json` (written by `callbacks/model_card.py`: base model, training data, the recipe's
keys that differ from the defaults, steps, wall time, hardware, final losses, held-out metrics)
and the loss plot in `plots/losses.png`. `render_card(facts, kind)` turns those facts into the
card of one folder kind: the M3 folder itself, or one of the sentence-transformers folders of
`m3c export-st` (`dense`, `colbert`, `sparse`), which copy the facts and the plot of the folder
they were made from. Every figure in a card comes from the facts; a fact the run did not have
(a folder that was never trained here, no `callbacks.eval_data`) is said to be missing, not guessed.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

from m3composer.model.scores import HEADS, SCORE_NAMES

FACTS_FILE = "training_run.json"
CARD_FILE = "README.md"
LOSS_PLOT = "plots/losses.png"
KINDS = ("m3", "dense", "colbert", "sparse")
HEAD_ORDER = SCORE_NAMES

_TITLES = {
    "m3": "BGE-M3-style model (dense, sparse and ColBERT heads)",
    "dense": "sentence-transformers `SentenceTransformer`: the dense head",
    "colbert": "sentence-transformers `MultiVectorEncoder`: the ColBERT head",
    "sparse": "sentence-transformers `SparseEncoder`: the sparse (lexical weights) head",
}


def read_facts(folder: str | os.PathLike) -> Optional[dict]:
    """The `training_run.json` of a folder, or None when it has none (not exported by a training run)."""
    path = Path(folder) / FACTS_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) >= 1e-3 or value == 0 else f"{value:.3e}"
    return "`null`" if value is None else f"`{json.dumps(value, ensure_ascii=False)}`" \
        if not isinstance(value, (int, str)) else str(value)


def _duration(seconds: Optional[float]) -> str:
    if seconds is None:
        return "unknown"
    minutes, secs = divmod(float(seconds), 60.0)
    return f"{seconds:.1f} s" if minutes < 1 else f"{int(minutes)} min {secs:.0f} s ({seconds:.1f} s)"


def _heads_lines(facts: dict) -> list[str]:
    """Which heads the run trained (`loss.heads`), and which it left as they were."""
    trained = facts.get("trained_heads")
    if trained is None:
        return []
    fresh = facts.get("fresh_heads") or []

    def left_out(head: str) -> str:
        if head == "dense":
            return "no loss term of its own; the encoder under it was trained"
        return "fresh: never trained, skipped by `m3c eval`" if head in fresh else "saved as loaded"

    line = "- heads trained (`loss.heads`): " + ", ".join(f"`{h}`" for h in trained)
    kept = [h for h in HEADS if h not in trained]
    if kept:
        line += "; not trained: " + ", ".join(f"`{h}` ({left_out(h)})" for h in kept)
    return [line]


def _matryoshka_lines(facts: dict, kind: str) -> list[str]:
    """The Matryoshka sizes the run trained (`loss.matryoshka`), with what each costs to store, and how a
    sentence-transformers folder of `kind` serves them."""
    sizes = facts.get("matryoshka")
    if not sizes:
        return []
    lines = ["- Matryoshka sizes trained besides the full ones (`loss.matryoshka`): "
             "cut a vector to its first d dims and L2-normalise it again; `m3c eval` reports each size"]
    for head, label in (("dense", "dense vector"), ("colbert", "ColBERT vector per token")):
        dims = sizes.get(f"{head}_dims") or []
        if dims:
            lines.append(f"  - {label}: " + ", ".join(f"{d} ({4 * d} bytes fp32, {2 * d} fp16)" for d in dims))
    if kind == "dense" and sizes.get("dense_dims"):
        lines.append("  - load a size with `SentenceTransformer(path, truncate_dim=d)` (cosine similarity)")
    if kind == "colbert" and sizes.get("colbert_dims"):
        lines.append("  - each ColBERT size has its own folder beside this one, `colbert-<d>`")
    return lines


def _data_section(data: Optional[dict]) -> list[str]:
    if not data:
        return ["Not recorded."]
    lines = [f"`{data.get('train_data')}`: {data.get('rows')} rows in {len(data.get('streams', []))} "
             "streams (task × length bucket).", "",
             "| task | bucket | rows | teacher scores | parallel |", "|---|---|---|---|---|"]
    for s in data.get("streams", []):
        lines.append(f"| {s['task']} | {s['bucket']} | {s['rows']} | {'yes' if s.get('has_teacher_scores') else 'no'} "
                     f"| {'yes' if s.get('is_parallel') else 'no'} |")
    return lines


def _losses_section(facts: dict) -> list[str]:
    losses = facts.get("final_losses")
    if not losses:
        return ["No training losses were recorded."]
    lines = [f"Loss terms of the last step (step {facts.get('final_losses_step')}, 0-based, averaged over the "
             "ranks; `loss/train/<term>` in the run's logs):", "", "| term | loss |", "|---|---|"]
    order = [t for t in (*HEAD_ORDER, "self_distill", "bidirectional", "total") if t in losses]
    order += sorted(t for t in losses if t not in order)
    lines += [f"| {term} | {losses[term]:.4f} |" for term in order]
    return lines


def _eval_section(evaluation: Optional[dict]) -> list[str]:
    if not evaluation or not evaluation.get("metrics"):
        return ["No held-out evaluation during training (`callbacks.eval_data` was not set)."]
    metrics = evaluation["metrics"]
    names = sorted({m for per_head in metrics.values() for m in per_head},
                   key=lambda m: ({"recall": 0, "mrr": 1, "ndcg": 2}.get(m.split("@")[0], 3),
                                  int(m.split("@")[1]) if "@" in m and m.split("@")[1].isdigit() else 0, m))
    lines = [f"On `{evaluation.get('data')}` (`metrics/{evaluation.get('label')}/<head>/<metric>`), "
             f"at step {evaluation.get('step')}:", "",
             "| head | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for head in [h for h in HEAD_ORDER if h in metrics] + sorted(h for h in metrics if h not in HEAD_ORDER):
        lines.append(f"| {head} | " + " | ".join(f"{metrics[head][m]:.4f}" if m in metrics[head] else "–"
                                                 for m in names) + " |")
    return lines


def _snippets(facts: dict, kind: str) -> list[str]:
    q = facts.get("query_instruction") or ""
    p = facts.get("passage_instruction") or ""
    pooling = facts.get("pooling", "cls")
    pool_line = ("dense = hidden[:, 0]" if pooling == "cls" else
                 "mask = batch['attention_mask'].unsqueeze(-1).float()\n"
                 "    dense = (hidden * mask).sum(1) / mask.sum(1)")
    lines = ["## How to load it", ""]
    if kind == "m3":
        lines += ["FlagEmbedding (all three heads):", "", "```python",
                  "from FlagEmbedding import BGEM3FlagModel",
                  f"model = BGEM3FlagModel(\"PATH\", pooling_method=\"{pooling}\", use_fp16=False)",
                  f"q = model.encode([{json.dumps(q + 'how do I read a file?')}], return_dense=True, "
                  "return_sparse=True, return_colbert_vecs=True)",
                  f"d = model.encode([{json.dumps(p + 'open() returns a file object.')}], return_dense=True, "
                  "return_sparse=True, return_colbert_vecs=True)",
                  "```", ""]
    lines += ["transformers (the dense vector; the encoder is a plain `AutoModel` folder):", "", "```python",
              "import torch, torch.nn.functional as F",
              "from transformers import AutoModel, AutoTokenizer",
              "tok, enc = AutoTokenizer.from_pretrained(\"PATH\"), AutoModel.from_pretrained(\"PATH\").eval()",
              f"batch = tok([{json.dumps(q + 'how do I read a file?')}], padding=True, truncation=True, "
              "return_tensors=\"pt\")",
              "with torch.no_grad():",
              "    hidden = enc(**batch).last_hidden_state",
              f"    {pool_line}",
              *(["dense = F.normalize(dense, dim=-1)"] if facts.get("normalize", True) else []),
              "```", ""]
    st = {"dense": ("SentenceTransformer", ""), "colbert": ("MultiVectorEncoder", ""),
          "sparse": ("SparseEncoder", ", trust_remote_code=True")}
    if kind == "m3":
        lines += ["sentence-transformers ≥ 6: `m3c export-st PATH OUT` writes `OUT/dense`, `OUT/colbert` and "
                  "`OUT/sparse`, one folder per head, each with its own card and loading code.", ""]
    else:
        cls, extra = st[kind]
        lines += ["sentence-transformers ≥ 6 (the query/passage instructions are the `query`/`document` "
                  "prompts, used by `encode_query`/`encode_document`):", "", "```python",
                  f"from sentence_transformers import {cls}",
                  f"model = {cls}(\"PATH\"{extra})",
                  "q = model.encode_query([\"how do I read a file?\"])",
                  "d = model.encode_document([\"open() returns a file object.\"])",
                  "print(model.similarity(q, d))",
                  "```", ""]
        if kind == "sparse":
            lines += ["`trust_remote_code=True` runs `m3_lexical_weights.py` from this folder: M3's lexical "
                      "weights (`ReLU(sparse_linear(h))` per token, max per token id, special tokens 0) have no "
                      "module in sentence-transformers (its `SpladePooling` needs MLM logits and applies "
                      "log1p). Read the file before you trust it; it is 100 lines of torch.", ""]
    return lines


def render_card(facts: Optional[dict], kind: str = "m3") -> str:
    """The markdown card of a folder of `kind` (see KINDS) from its run facts (None: not trained here)."""
    if kind not in KINDS:
        raise ValueError(f"model card kind must be one of {KINDS}, got {kind!r}")
    facts = dict(facts or {})
    lines = ["---", "library_name: " + ("sentence-transformers" if kind != "m3" else "transformers"),
             "tags: [m3composer, bge-m3, retrieval]", "---", "", f"# {_TITLES[kind]}", ""]
    if facts.get("run_name"):
        lines += [f"Fine-tuned with m3composer (run `{facts['run_name']}`)"
                  + (f", exported at step {facts['steps']}." if facts.get("steps") is not None else "."), ""]
    else:
        lines += ["Exported with m3composer from a model folder that carries no record of a training run.", ""]
    lines += ["## Model", "",
              f"- base model: `{facts.get('base_model', 'unknown')}`",
              f"- dense pooling: `{facts.get('pooling', 'unknown')}`, normalised: {facts.get('normalize', 'unknown')}",
              f"- query instruction: {_fmt(facts.get('query_instruction'))}; passage instruction: "
              f"{_fmt(facts.get('passage_instruction'))}"]
    if facts.get("colbert_dim") is not None:
        lines.append(f"- ColBERT vector size: {facts['colbert_dim']}")
    lines += _heads_lines(facts)
    lines += _matryoshka_lines(facts, kind)
    if "steps" in facts:
        lines += ["", "## Training", "",
                  f"- steps: {facts.get('steps')} (epoch {facts.get('epochs')})",
                  f"- wall time: {_duration(facts.get('wall_time_s'))}",
                  f"- hardware: {facts.get('hardware', {}).get('summary', 'unknown')}",
                  "", "### Data", "", *_data_section(facts.get("data")),
                  "", "### Recipe: keys that differ from the defaults", ""]
        changes = facts.get("recipe_changes")
        if changes:
            lines += ["| key | value |", "|---|---|"] + [f"| `{k}` | {_fmt(v)} |" for k, v in sorted(changes.items())]
        else:
            lines.append("Not recorded." if changes is None else "None: every key at its default.")
        lines += ["", "### Final losses", "", *_losses_section(facts),
                  "", "### Held-out retrieval", "", *_eval_section(facts.get("eval"))]
        if facts.get("loss_plot"):
            lines += ["", f"![training losses]({LOSS_PLOT})"]
    lines += ["", *_snippets(facts, kind)]
    return "\n".join(lines).rstrip() + "\n"


def write_card(folder: str | os.PathLike, facts: Optional[dict], kind: str = "m3") -> Path:
    """Write `README.md` (and, with facts, `training_run.json`) into `folder`, a folder being built."""
    folder = Path(folder)
    if facts is not None:
        (folder / FACTS_FILE).write_text(json.dumps(facts, indent=2, ensure_ascii=False) + "\n")
    path = folder / CARD_FILE
    path.write_text(render_card(facts, kind))
    return path

"""`m3c export-st MODEL_DIR OUT_DIR`: one sentence-transformers (≥ 6) folder per M3 head.

From an m3composer export or a FlagEmbedding-layout folder (encoder + tokenizer +
`colbert_linear.pt` + `sparse_linear.pt`), written without sentence-transformers installed (it needs
transformers ≥ 5; this project pins < 4.54), in the layout sentence-transformers 6.2 itself saves:

    OUT/dense/    SentenceTransformer: Transformer -> Pooling (cls | mean, prompt tokens included) -> Normalize
    OUT/colbert/  MultiVectorEncoder: Transformer -> Dense(colbert_linear, identity) on the token embeddings
                  -> Normalize(token embeddings) -> MultiVectorMask (drops the first token, `<s>`), meanmaxsim
    OUT/sparse/   SparseEncoder: Transformer -> M3LexicalWeights (m3_lexical_weights.py, shipped in the
                  folder: needs `trust_remote_code=True`), dot product

Each folder carries the encoder (safetensors) and the tokenizer at its root, the folder's query and
passage instructions as the `query` / `document` prompts (`default_prompt_name` unset, so
`encode_query` / `encode_document` prepend them and plain `encode` prepends nothing, as
`M3Model.encode_texts` without `instruction`), and a model card (README.md, model/model_card.py).
`normalize: false` in `m3composer.json` leaves out the Normalize modules.

Matryoshka sizes (docs/recipe.md §Matryoshka), when `m3composer.json` records them: the dense folder
serves every size as it is, with sentence-transformers' own `truncate_dim` (`SentenceTransformer(path,
truncate_dim=d)` cuts the normalised vector; its `cosine` similarity normalises again, which is the
trained score). Its multi-vector encoder has no `truncate_dim`, so each ColBERT size d gets a folder
of its own, `OUT/colbert-<d>/`: the same modules with the Dense projection cut to its first d output
rows (`W[:d], b[:d]`), so Normalize then gives exactly the cut, re-normalised vectors. Each carries
the encoder again.

The ColBERT mask drops tokens by id, not by position: sentence-transformers' `MultiVectorMask` has
only a token skiplist. M3 drops position 0, which is always the tokenizer's cls token (checked at
export), so the two differ only for a text that contains the literal cls string (`<s>`), which
M3 keeps and sentence-transformers drops. `scripts/check_sentence_transformers_compat.py` loads the
folders in sentence-transformers 6 and compares their outputs with `M3Model.encode_texts`.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Optional, Sequence

from safetensors.torch import save_file
from torch import nn

from m3composer.fsutil import building_dir
from m3composer.model import m3_lexical_weights
from m3composer.model.inference import load_model_for_inference, missing_heads
from m3composer.model.model_card import LOSS_PLOT, read_facts, write_card

ST_VERSION = "6.2.0"      # the release whose save() layout these files reproduce
HEAD_FOLDERS = ("dense", "colbert", "sparse")
TRANSFORMER = "sentence_transformers.base.modules.transformer.Transformer"
POOLING = "sentence_transformers.sentence_transformer.modules.pooling.Pooling"
NORMALIZE = "sentence_transformers.base.modules.normalize.Normalize"
DENSE = "sentence_transformers.base.modules.dense.Dense"
MULTI_VECTOR_MASK = "sentence_transformers.multi_vector_encoder.modules.multi_vector_mask.MultiVectorMask"
LEXICAL_FILE = "m3_lexical_weights.py"
LEXICAL = "m3_lexical_weights.M3LexicalWeights"
# What sentence-transformers' Transformer writes for a text encoder's last hidden state.
TRANSFORMER_CONFIG = {"transformer_task": "feature-extraction",
                      "modality_config": {"text": {"method": "forward", "method_output_name": "last_hidden_state"}},
                      "module_output_name": "token_embeddings"}
MODEL_TYPES = {"dense": ("SentenceTransformer", "cosine"), "colbert": ("MultiVectorEncoder", "meanmaxsim"),
               "sparse": ("SparseEncoder", "dot")}


def _json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def _linear_weights(path: Path, linear) -> None:
    """A Dense / M3LexicalWeights module's `model.safetensors` (keys `linear.weight`, `linear.bias`)."""
    path.mkdir(parents=True, exist_ok=True)
    save_file({f"linear.{k}": v.detach().float().cpu().contiguous() for k, v in linear.state_dict().items()},
              str(path / "model.safetensors"))


def first_token_is_cls(tokenizer) -> bool:
    """Whether the tokenizer starts every text with its cls token (what M3's ColBERT head drops)."""
    ids = tokenizer(["x", "two words"])["input_ids"]
    return tokenizer.cls_token_id is not None and all(row and row[0] == tokenizer.cls_token_id for row in ids)


def _modules(folder: Path, entries: list[tuple[str, str]]) -> None:
    """`modules.json`: (path, type) per module, in order; the Transformer lives in the root ("")."""
    _json(folder / "modules.json", [{"idx": i, "name": str(i), "path": path, "type": kind}
                                    for i, (path, kind) in enumerate(entries)])


def _write_head_folder(model, head: str, folder: Path, facts: Optional[dict], source: Path,
                       colbert_size: Optional[int] = None) -> None:
    """One head's folder; `colbert_size`: the ColBERT projection cut to that many output dims."""
    folder.mkdir(parents=True)
    state = {k: v.detach().clone().cpu() for k, v in model.encoder.state_dict().items()}
    model.encoder.save_pretrained(folder, state_dict=state, safe_serialization=True)
    model.tokenizer.save_pretrained(folder)
    _json(folder / "sentence_bert_config.json", TRANSFORMER_CONFIG)
    model_type, similarity = MODEL_TYPES[head]
    _json(folder / "config_sentence_transformers.json", {
        "__version__": {"sentence_transformers": ST_VERSION}, "model_type": model_type,
        "prompts": {"query": model.query_instruction or "", "document": model.passage_instruction or ""},
        "default_prompt_name": None, "similarity_fn_name": similarity})
    hidden = model.encoder.config.hidden_size
    entries = [("", TRANSFORMER)]
    if head == "dense":
        entries.append(("1_Pooling", POOLING))
        _json(folder / "1_Pooling" / "config.json",
              {"embedding_dimension": hidden, "pooling_mode": model.pooling, "include_prompt": True})
    elif head == "colbert":
        linear = model.colbert_linear
        if colbert_size is not None:
            linear = nn.Linear(hidden, colbert_size)
            linear.load_state_dict({k: v[:colbert_size] for k, v in model.colbert_linear.state_dict().items()})
        entries.append(("1_Dense", DENSE))
        _json(folder / "1_Dense" / "config.json", {
            "in_features": hidden, "out_features": linear.out_features, "bias": True,
            "activation_function": "torch.nn.modules.linear.Identity",
            "module_input_name": "token_embeddings", "module_output_name": "token_embeddings"})
        _linear_weights(folder / "1_Dense", linear)
    else:
        entries.append(("1_M3LexicalWeights", LEXICAL))
        _json(folder / "1_M3LexicalWeights" / "config.json", {
            "in_features": hidden, "vocab_size": model.vocab_size,
            "special_token_ids": sorted(set(model.special_token_ids.values()))})
        _linear_weights(folder / "1_M3LexicalWeights", model.sparse_linear)
        shutil.copyfile(m3_lexical_weights.__file__, folder / LEXICAL_FILE)
    if model.normalize and head != "sparse":
        name = "token_embeddings" if head == "colbert" else "sentence_embedding"
        entries.append((f"{len(entries)}_Normalize", NORMALIZE))
        _json(folder / entries[-1][0] / "config.json", {"module_input_name": name, "module_output_name": name})
    if head == "colbert":
        entries.append((f"{len(entries)}_MultiVectorMask", MULTI_VECTOR_MASK))
        _json(folder / entries[-1][0] / "config.json", {
            "skiplist_words": [model.tokenizer.cls_token], "skiplist_tasks": ["query", "document"],
            "keep_only_token_ids": None})
    _modules(folder, entries)
    if facts is not None and (source / LOSS_PLOT).is_file():
        (folder / LOSS_PLOT).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source / LOSS_PLOT, folder / LOSS_PLOT)
    write_card(folder, facts, head)


def export_sentence_transformers(model_dir: str | Path, out_dir: str | Path, heads: Optional[Sequence[str]] = None,
                                 overwrite: bool = False) -> dict[str, Path]:
    """Write `out_dir/<head>` for each head (default: every head the folder has), and with ColBERT
    `out_dir/colbert-<d>` for each Matryoshka ColBERT size the folder records; returns the folders.

    `out_dir` is built beside itself and renamed into place, so a failure leaves no partial export.
    """
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    absent = missing_heads(model_dir)
    available = tuple(h for h in HEAD_FOLDERS if h not in absent)
    heads = tuple(heads) if heads else available
    unknown = [h for h in heads if h not in HEAD_FOLDERS]
    if unknown:
        raise ValueError(f"unknown head(s) {unknown}; choose from {HEAD_FOLDERS}")
    missing = [h for h in heads if h not in available]
    if missing:
        raise ValueError(f"{model_dir}: no trained {'/'.join(missing)} head ({absent[missing[0]]}); export the "
                         f"heads it has with --heads {','.join(available)}")
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not empty (pass --overwrite to replace it)")
    model = load_model_for_inference(model_dir)
    if model.tokenizer is None:
        raise ValueError(f"{model_dir}: no tokenizer files; sentence-transformers needs the tokenizer in the folder")
    if "colbert" in heads and not first_token_is_cls(model.tokenizer):
        raise ValueError(f"{model_dir}: the tokenizer does not start every text with its cls token, so the "
                         "ColBERT head's first-token drop cannot be written as sentence-transformers' token skiplist")
    facts = read_facts(model_dir)
    if model.matryoshka and not (facts or {}).get("matryoshka"):      # the cards list the sizes
        facts = {**(facts or {}), "matryoshka": model.matryoshka}
    sizes = (model.matryoshka or {}).get("colbert_dims", []) if "colbert" in heads else []
    folders = [(head, head, None) for head in heads] + [(f"colbert-{d}", "colbert", d) for d in sizes]
    with building_dir(out_dir) as tmp:
        for name, head, size in folders:
            _write_head_folder(model, head, tmp / name, facts, model_dir, colbert_size=size)
    return {name: out_dir / name for name, _, _ in folders}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_dir", help="an m3composer export or a FlagEmbedding-layout folder (or asset:NAME)")
    parser.add_argument("out_dir", help="where OUT/dense, OUT/colbert and OUT/sparse are written (and "
                                        "OUT/colbert-<d> per Matryoshka ColBERT size the folder records)")
    parser.add_argument("--heads", default=None,
                        help="comma-separated subset of dense,colbert,sparse (default: every head the folder has)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")


def run(args: argparse.Namespace) -> int:
    heads = [h.strip() for h in args.heads.split(",") if h.strip()] if args.heads else None
    try:
        written = export_sentence_transformers(args.model_dir, args.out_dir, heads, overwrite=args.overwrite)
    except (ValueError, FileExistsError) as err:
        print(f"m3c export-st: error: {err}", file=sys.stderr)
        return 2
    for head, folder in written.items():
        print(f"{head}: {folder}")
    return 0

"""`m3c export-st` (m3composer/model/st_export.py) without sentence-transformers installed: the folders
have the files and configs sentence-transformers 6.2 writes itself, and each folder's parts, run
with our transformers as sentence-transformers would run them, give M3Model.encode_texts' outputs
(dense vectors, ColBERT vectors, lexical weights) on the tiny XLM-R model with seeded heads.
scripts/check_sentence_transformers_compat.py does the same inside sentence-transformers 6."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoModel

from m3composer.cli import main as m3c
from m3composer.model import st_export
from m3composer.model.m3 import M3Model
from m3composer.model.m3_lexical_weights import M3LexicalWeights
from m3composer.padding import right_pad

TEXTS = ["How do I install a package from a wheel?", "x", "Die Paketverwaltung von Debian: dpkg und apt, apt und dpkg."]
QUERY, PASSAGE = "query: ", "passage: "


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_dir):
    root = tmp_path_factory.mktemp("st")
    torch.manual_seed(3)
    model = M3Model.from_pretrained(tiny_dir)
    with torch.no_grad():
        model.sparse_linear.bias.add_(0.5)     # random fresh heads weigh most tokens 0
    model.query_instruction, model.passage_instruction = QUERY, PASSAGE
    source = model.save_pretrained(root / "m3")
    assert m3c(["export-st", str(source), str(root / "st")]) == 0
    return model, root / "st"


def _json(path: Path):
    return json.loads(path.read_text())


def _modules(folder: Path) -> list[tuple[str, str]]:
    return [(m["path"], m["type"].rsplit(".", 1)[-1]) for m in _json(folder / "modules.json")]


def test_the_folders_have_the_modules_and_configs_sentence_transformers_6_reads(exported):
    model, out = exported
    assert sorted(p.name for p in out.iterdir()) == ["colbert", "dense", "sparse"]
    for head, (model_type, similarity) in st_export.MODEL_TYPES.items():
        folder = out / head
        assert {"config.json", "model.safetensors", "tokenizer.json", "sentence_bert_config.json",
                "README.md"} <= {p.name for p in folder.iterdir()}, head
        config = _json(folder / "config_sentence_transformers.json")
        assert config["model_type"] == model_type and config["similarity_fn_name"] == similarity
        assert config["prompts"] == {"query": QUERY, "document": PASSAGE} and config["default_prompt_name"] is None
        assert _json(folder / "sentence_bert_config.json")["module_output_name"] == "token_embeddings"
        assert all(m["type"].startswith("sentence_transformers.") or head == "sparse"
                   for m in _json(folder / "modules.json"))
    assert _modules(out / "dense") == [("", "Transformer"), ("1_Pooling", "Pooling"), ("2_Normalize", "Normalize")]
    assert _json(out / "dense" / "1_Pooling" / "config.json") == {
        "embedding_dimension": 32, "pooling_mode": "cls", "include_prompt": True}
    assert _modules(out / "colbert") == [("", "Transformer"), ("1_Dense", "Dense"), ("2_Normalize", "Normalize"),
                                         ("3_MultiVectorMask", "MultiVectorMask")]
    assert _json(out / "colbert" / "2_Normalize" / "config.json")["module_input_name"] == "token_embeddings"
    mask = _json(out / "colbert" / "3_MultiVectorMask" / "config.json")
    assert mask["skiplist_words"] == ["<s>"] and mask["skiplist_tasks"] == ["query", "document"]
    assert _modules(out / "sparse") == [("", "Transformer"), ("1_M3LexicalWeights", "M3LexicalWeights")]
    assert _json(out / "sparse" / "modules.json")[1]["type"] == "m3_lexical_weights.M3LexicalWeights"
    assert (out / "sparse" / "m3_lexical_weights.py").read_text() == Path(st_export.m3_lexical_weights.__file__).read_text()
    lexical = _json(out / "sparse" / "1_M3LexicalWeights" / "config.json")
    assert lexical == {"in_features": 32, "vocab_size": 250002,
                       "special_token_ids": sorted(set(model.special_token_ids.values()))}
    card = (out / "sparse" / "README.md").read_text()
    assert "trust_remote_code=True" in card and "SparseEncoder" in card


def _hidden(folder: Path, tokenizer, texts: list[str]):
    """The folder's Transformer module: its encoder's last hidden state (the in-memory tokenizer is
    the one the folder carries; loading it from each folder would only cost time)."""
    encoder = AutoModel.from_pretrained(folder).eval()
    input_ids, attention_mask = right_pad(tokenizer(texts)["input_ids"], tokenizer.pad_token_id)
    with torch.no_grad():
        return input_ids, attention_mask, encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def _linear(folder: Path) -> torch.nn.Linear:
    state = load_file(folder / "model.safetensors")
    linear = torch.nn.Linear(state["linear.weight"].shape[1], state["linear.weight"].shape[0])
    linear.load_state_dict({k.removeprefix("linear."): v for k, v in state.items()})
    return linear


def test_each_folder_run_as_its_modules_say_gives_the_m3_outputs(exported):
    model, out = exported
    tokenizer = model.tokenizer
    prompts = _json(out / "dense" / "config_sentence_transformers.json")["prompts"]
    # queries then documents, each with its prompt, as encode_query / encode_document prepend them
    texts = [prompts["query"] + t for t in TEXTS] + [prompts["document"] + t for t in TEXTS]
    ours = [model.encode_texts(TEXTS, instruction=QUERY), model.encode_texts(TEXTS, instruction=PASSAGE)]
    ref = {key: [x for side in ours for x in side[key]] for key in ("dense_vecs", "colbert_vecs", "lexical_weights")}

    _, _, hidden = _hidden(out / "dense", tokenizer, texts)       # Transformer -> Pooling(cls) -> Normalize
    dense = F.normalize(hidden[:, 0], dim=-1).numpy()
    assert np.abs(dense - np.stack(ref["dense_vecs"])).max() < 1e-5

    input_ids, mask, hidden = _hidden(out / "colbert", tokenizer, texts)
    skip = tokenizer.convert_tokens_to_ids(_json(out / "colbert" / "3_MultiVectorMask" / "config.json")["skiplist_words"])
    with torch.no_grad():
        vecs = F.normalize(_linear(out / "colbert" / "1_Dense")(hidden), dim=-1)
    keep = mask.bool() & ~torch.isin(input_ids, torch.tensor(skip))
    for row, expected in enumerate(ref["colbert_vecs"]):
        got = vecs[row][keep[row]].numpy()
        assert got.shape == expected.shape and np.abs(got - expected).max() < 1e-5

    input_ids, mask, hidden = _hidden(out / "sparse", tokenizer, texts)
    config = _json(out / "sparse" / "1_M3LexicalWeights" / "config.json")
    module = M3LexicalWeights(**config)
    module.load_state_dict(load_file(out / "sparse" / "1_M3LexicalWeights" / "model.safetensors"))
    with torch.no_grad():
        vocab = module({"token_embeddings": hidden, "input_ids": input_ids, "attention_mask": mask})["sentence_embedding"]
    assert vocab.shape == (len(texts), config["vocab_size"])
    for row, expected in enumerate(ref["lexical_weights"]):
        got = {str(int(i)): float(vocab[row, i]) for i in vocab[row].nonzero().squeeze(-1)}
        assert expected and set(got) == set(expected)
        assert max(abs(got[k] - expected[k]) for k in expected) < 1e-5


def test_errors_a_folder_without_heads_and_a_non_empty_output(tmp_path, tiny_dir, capsys):
    assert m3c(["export-st", str(tiny_dir), str(tmp_path / "out"), "--heads", "dense,sparse"]) == 2
    assert "no trained sparse head" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert m3c(["export-st", str(tiny_dir), str(tmp_path / "out")]) == 0      # a plain encoder: dense only
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["dense"]
    assert "no record of a training run" in (tmp_path / "out" / "dense" / "README.md").read_text()
    assert m3c(["export-st", str(tiny_dir), str(tmp_path / "out")]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary folder left behind"


def test_each_matryoshka_colbert_size_gets_a_folder_whose_vectors_are_the_cut_renormalised_ones(tmp_path, tiny_dir):
    torch.manual_seed(3)
    model = M3Model.from_pretrained(tiny_dir)
    model.matryoshka = {"dense_dims": [16], "colbert_dims": [8, 4]}
    source = model.save_pretrained(tmp_path / "m3")
    assert m3c(["export-st", str(source), str(tmp_path / "st"), "--heads", "dense,colbert"]) == 0
    out = tmp_path / "st"
    assert sorted(p.name for p in out.iterdir()) == ["colbert", "colbert-4", "colbert-8", "dense"]
    tokenizer = model.tokenizer
    full = model.encode_texts(TEXTS)["colbert_vecs"]
    for size in (8, 4):
        folder = out / f"colbert-{size}"
        assert _modules(folder) == _modules(out / "colbert")
        assert _json(folder / "1_Dense" / "config.json")["out_features"] == size
        input_ids, mask, hidden = _hidden(folder, tokenizer, TEXTS)
        with torch.no_grad():
            vecs = F.normalize(_linear(folder / "1_Dense")(hidden), dim=-1)
        keep = mask.bool() & (input_ids != tokenizer.cls_token_id)
        for row, whole in enumerate(full):
            cut = whole[:, :size] / np.linalg.norm(whole[:, :size], axis=-1, keepdims=True)
            assert np.abs(vecs[row][keep[row]].numpy() - cut).max() < 1e-5
    assert "SentenceTransformer(path, truncate_dim=d)" in (out / "dense" / "README.md").read_text()
    assert "`colbert-<d>`" in (out / "colbert-8" / "README.md").read_text()

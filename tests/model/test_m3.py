"""m3composer.model.m3: encode/score on the reference model (docs/recipe.md §Reference numbers),
save/load round trips, encode_texts."""
from __future__ import annotations

import json
import logging

import torch
from safetensors.torch import load_file
from transformers import BertModel

from m3composer.model.m3 import COLBERT_FILE, SPARSE_FILE, M3Model
from tests.model.conftest import recipe_batch

TEXTS = ["How do I install a package from a local wheel file?",
         "Debian FAQ: what is the difference between stable and testing?",
         "x",
         "Die Paketverwaltung verwendet dpkg und apt."]


def test_recipe_scores_match_the_reference_matrices_of_recipe_md(recipe_model):
    batch = recipe_batch()
    q = recipe_model.encode(batch["query_input_ids"], batch["query_attention_mask"])
    p = recipe_model.encode(batch["passage_input_ids"], batch["passage_attention_mask"])
    s = recipe_model.score(q, p, temperature=0.02)
    expected_dense = [[49.798645, 48.194595, 49.857792, 49.372311], [49.849072, 48.351624, 49.808052, 49.277126]]
    expected_lex = [[19.579647, 0, 0, 0], [0, 0, 0, 0]]
    expected_mul = [[49.018509, 45.668518, 45.096268, 48.615753], [49.709358, 46.539116, 47.023472, 48.651379]]
    assert torch.allclose(s.dense, torch.tensor(expected_dense), atol=2e-5)
    assert torch.allclose(s.sparse, torch.tensor(expected_lex), atol=2e-5)
    assert torch.allclose(s.colbert, torch.tensor(expected_mul), atol=2e-5)
    assert torch.allclose(s.ensemble, s.dense + 0.3 * s.sparse + s.colbert)
    assert q.sparse.shape == (2, 32) and p.colbert.shape == (4, 5, 4) and q.colbert_mask.tolist()[1] == [1, 1, 1, 0]


def _encode_all(model, tokenizer, texts=TEXTS):
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model.encode(batch["input_ids"], batch["attention_mask"])


def test_loading_a_folder_without_heads_initialises_them_and_warns(tiny_dir, caplog):
    with caplog.at_level(logging.WARNING):
        model = M3Model.from_pretrained(tiny_dir)
    assert "newly initialised" in caplog.text
    assert model.colbert_linear.weight.shape == (32, 32) and model.sparse_linear.weight.shape == (1, 32)
    assert model.pooling == "cls" and model.special_token_ids == {"cls": 0, "eos": 2, "pad": 1, "unk": 3}
    assert not hasattr(model.encoder, "pooler") or model.encoder.pooler is None


def test_save_then_load_is_bit_exact_and_has_flagembedding_layout(tiny_dir, tokenizer, tmp_path, caplog):
    torch.manual_seed(1)
    model = M3Model.from_pretrained(tiny_dir, colbert_dim=16).eval()
    out = model.save_pretrained(tmp_path / "export")
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            COLBERT_FILE, SPARSE_FILE, "m3composer.json"} <= names
    assert not any(n.startswith(".") for n in {p.name for p in tmp_path.iterdir()})   # no temp folder left
    colbert_state = torch.load(out / COLBERT_FILE, weights_only=True)
    assert set(colbert_state) == {"weight", "bias"} and colbert_state["weight"].shape == (16, 32)
    assert set(torch.load(out / SPARSE_FILE, weights_only=True)) == {"weight", "bias"}
    assert json.loads((out / "m3composer.json").read_text())["pooling"] == "cls"
    assert not any(k.startswith("pooler") for k in load_file(out / "model.safetensors"))

    caplog.clear()
    with caplog.at_level(logging.WARNING):
        reloaded = M3Model.from_pretrained(out).eval()
    assert "newly initialised" not in caplog.text
    a, b = _encode_all(model, tokenizer), _encode_all(reloaded, tokenizer)
    for field in ("dense", "sparse", "colbert", "colbert_mask"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field

    # saving again over an existing folder replaces it
    with torch.no_grad():
        reloaded.sparse_linear.bias.add_(1.0)
    reloaded.save_pretrained(out)
    again = torch.load(out / SPARSE_FILE, weights_only=True)
    assert torch.equal(again["bias"], reloaded.sparse_linear.bias.detach())


def test_bert_type_encoder_with_mean_pooling_round_trips(e5_dir, tokenizer, tmp_path):
    model = M3Model.from_pretrained(e5_dir).eval()
    assert isinstance(model.encoder, BertModel) and model.pooling == "mean"
    assert model.query_instruction == "query: " and model.passage_instruction == "passage: "
    batch = tokenizer(TEXTS[:2], padding=True, return_tensors="pt")
    with torch.no_grad():
        reps = model.encode(batch["input_ids"], batch["attention_mask"])
        hidden = model.encoder(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    mean = (hidden * mask).sum(1) / mask.sum(1)
    assert torch.allclose(reps.dense, mean / mean.norm(dim=-1, keepdim=True), atol=1e-6)
    out = model.save_pretrained(tmp_path / "e5-m3")
    reloaded = M3Model.from_pretrained(out).eval()
    assert reloaded.pooling == "mean" and reloaded.query_instruction == "query: "
    assert torch.equal(_encode_all(model, tokenizer, TEXTS[:2]).dense, _encode_all(reloaded, tokenizer, TEXTS[:2]).dense)


def test_encode_texts_matches_encode_with_flagembedding_semantics(tiny_dir, tokenizer):
    torch.manual_seed(2)
    model = M3Model.from_pretrained(tiny_dir)
    assert not model.training and not model.encoder.training
    with torch.no_grad():
        model.sparse_linear.bias.fill_(0.05)     # random-init heads: make some weights positive, some not
    out = model.train().encode_texts(TEXTS, batch_size=3, max_length=32)
    assert model.training   # restored after inference
    model.eval()            # the reference below must run without dropout too
    assert out["dense_vecs"].shape == (4, 32)
    kept = 0
    for i, text in enumerate(TEXTS):
        ids = tokenizer(text, truncation=True, max_length=32)["input_ids"]
        ref = _encode_all(model, tokenizer, [text])
        assert torch.allclose(torch.from_numpy(out["dense_vecs"][i]), ref.dense[0], atol=1e-5)
        assert out["colbert_vecs"][i].shape == (len(ids) - 1, 32)
        assert torch.allclose(torch.from_numpy(out["colbert_vecs"][i]), ref.colbert[0], atol=1e-5)
        lexical = out["lexical_weights"][i]
        reference = {str(t): ref.sparse[0, t].item() for t in set(ids)}
        # every kept weight is the reference's; a dropped one is 0 there (a weight within rounding
        # of 0 may land on either side of the ReLU, so only clearly positive ones must be kept)
        assert all(abs(w - reference[k]) < 1e-5 for k, w in lexical.items())
        assert {k for k, w in reference.items() if w > 1e-5} <= set(lexical)
        assert all(reference[k] < 1e-5 for k in set(reference) - set(lexical))
        kept += len(lexical)
        assert not {"0", "1", "2", "3"} & set(lexical)
    assert kept > 0                          # some lexical weights were compared, not only empty dicts
    single = model.encode_texts(TEXTS[0], max_length=32)
    assert single["dense_vecs"].shape == (32,) and isinstance(single["lexical_weights"], dict)


def test_sparse_threshold_drops_small_weights_outside_training_and_is_saved(tiny_dir, tmp_path):
    """docs/recipe.md §Sparsity control: the threshold applies to inference (eval mode, encode_texts),
    never to training's vectors, and the saved folder records it."""
    from tests.model.test_composer_model import text_batch

    torch.manual_seed(0)
    model = M3Model.from_pretrained(tiny_dir)
    with torch.no_grad():
        model.sparse_linear.bias.fill_(0.5)
    batch = text_batch(model.tokenizer, 2, 2)                    # the folder's tokenizer, loaded with the model
    ids, mask = batch["passage_input_ids"], batch["passage_attention_mask"]
    with torch.no_grad():
        full = model.eval().encode(ids, mask).sparse
        threshold = float(full[full > 0].median())
        model.sparse_threshold = threshold
        cut = model.encode(ids, mask).sparse
        model.train()
        torch.manual_seed(1)                                       # the same dropout draws twice
        training = model.encode(ids, mask).sparse
        model.sparse_threshold = 0.0
        torch.manual_seed(1)
        training_without = model.encode(ids, mask).sparse
        model.sparse_threshold = threshold
    model.eval()
    assert torch.equal(cut, torch.where(full >= threshold, full, torch.zeros_like(full)))
    assert 0 < int((cut > 0).sum()) < int((full > 0).sum())
    assert torch.equal(training, training_without)                # training sees every weight
    assert int(((training > 0) & (training < threshold)).sum()) > 0
    texts = ["a first passage about sorting lists", "the second one"]
    lexical = model.encode_texts(texts)["lexical_weights"]
    assert all(w >= threshold for vec in lexical for w in vec.values())
    saved = M3Model.from_pretrained(model.save_pretrained(tmp_path / "out"))
    assert saved.sparse_threshold == threshold
    assert saved.encode_texts(texts)["lexical_weights"] == lexical

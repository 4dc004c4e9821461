"""The encoded corpus on disk (`corpus_store.py`, `--corpus-cache`): a second search with the same
model and settings encodes no passage and gives the same results; a store stopped partway resumes
at its first missing shard and ends equal to one written in one go; anything that changes the
stored numbers (weights, pooling, threshold, heads, instruction, length, corpus) is another key.
The tiny model with random heads on real text (the pydoc topics of the sample data)."""
import copy
import json

import numpy as np
import pytest
import torch

from m3composer.cli import main
from m3composer.retrieval.corpus_store import (MANIFEST, CorpusCache, CorpusStore, StoreInterrupted, store_key,
                                              store_settings)
from m3composer.retrieval.evaluate import evaluate_model
from m3composer.retrieval.search import search_top_k, stored_corpus

# the tiny model with random heads and 80 pydoc topics, 16 of them queries
from tests.retrieval.test_rerank import model, real_set, write_real_set  # noqa: F401 (fixtures)

SEARCH = dict(batch_size=16, query_max_len=32, passage_max_len=64, progress=False, query_instruction="",
              passage_instruction="")
STORE = dict(instruction="", max_length=64, batch_size=16, progress=False)
SHARD_DOCS = 24                                        # 80 documents: 4 shards, the last one short


class EncodedRows:
    """Counts the texts `model.encode` sees (queries and passages), and can fail after some calls."""

    def __init__(self, model, monkeypatch, fail_after_calls=None):
        self.rows, self.calls = 0, 0
        original = model.encode

        def encode(input_ids, *args, **kwargs):
            self.calls += 1
            if fail_after_calls is not None and self.calls > fail_after_calls:
                raise KeyboardInterrupt("killed")
            self.rows += len(input_ids)
            return original(input_ids, *args, **kwargs)
        monkeypatch.setattr(model, "encode", encode)


def shard_arrays(store: CorpusStore) -> list[dict[str, np.ndarray]]:
    return [arrays for _, arrays in store.shards()]


@pytest.mark.parametrize("first_stage_k", [None, 8])
def test_a_second_evaluation_reads_the_store_encodes_no_passage_and_gives_the_same_metrics(
        model, real_set, tmp_path, monkeypatch, first_stage_k):
    heads = ("dense", "sparse") if first_stage_k is None else ("dense", "sparse", "colbert")
    plain = evaluate_model(model, real_set, heads=heads, first_stage_k=first_stage_k, **SEARCH)
    cache = CorpusCache(tmp_path / "cache", shard_docs=SHARD_DOCS)
    counter = EncodedRows(model, monkeypatch)
    first = evaluate_model(model, real_set, heads=heads, first_stage_k=first_stage_k, corpus_cache=cache, **SEARCH)
    encoded_first = counter.rows
    counter.rows = 0
    second = evaluate_model(model, real_set, heads=heads, first_stage_k=first_stage_k, corpus_cache=cache, **SEARCH)
    queries = len(real_set.queries)
    assert encoded_first >= queries + len(real_set.docs)
    if first_stage_k is None:
        assert counter.rows == queries                               # no passage encoded
    else:
        # the store gives the first stage; only ColBERT's re-rank encodes (its candidates), as before
        assert counter.rows == encoded_first - len(real_set.docs)
    assert first["corpus_cache"]["reused"] is False and first["corpus_cache"]["shards_encoded"] == 4
    assert second["corpus_cache"]["reused"] is True and second["corpus_cache"]["shards_reused"] == 4
    assert second["corpus_cache"]["dir"] == first["corpus_cache"]["dir"]
    dense_bytes = len(real_set.docs) * model.encoder.config.hidden_size * 4
    assert second["corpus_cache"]["bytes"] == first["corpus_cache"]["bytes"] > dense_bytes
    for head in heads + ("ensemble",):
        assert first[head] == pytest.approx(plain[head], abs=1e-6), head
        assert second[head] == pytest.approx(plain[head], abs=1e-6), head
    assert second["sparse_cost"] == pytest.approx(plain["sparse_cost"], rel=1e-6)


def test_exact_search_with_colbert_does_not_use_the_store_and_says_so(model, real_set, tmp_path):
    cache = CorpusCache(tmp_path / "cache", shard_docs=SHARD_DOCS)
    result = evaluate_model(model, real_set, corpus_cache=cache, **SEARCH)
    assert result["corpus_cache"]["used"] is False and "ColBERT" in result["corpus_cache"]["why"]
    assert not (tmp_path / "cache").exists()


def test_stored_vectors_are_the_encoders(model, real_set, tmp_path):
    store = stored_corpus(model, real_set.docs, CorpusCache(tmp_path, shard_docs=SHARD_DOCS), with_sparse=True,
                          tokenizer=model.tokenizer, **STORE)
    want = model.encode_texts(real_set.docs, batch_size=16, max_length=64, instruction="", return_dense=True,
                              return_sparse=False, return_colbert_vecs=False)["dense_vecs"]
    assert np.allclose(store.dense(), np.asarray(want, dtype=np.float32), atol=1e-5)
    manifest = json.loads((store.dir / MANIFEST).read_text())
    assert manifest["complete"] and [s["end"] for s in manifest["shards"]] == [24, 48, 72, 80]
    for arrays in shard_arrays(store):
        assert arrays["sparse_indptr"][-1] == len(arrays["sparse_tokens"]) == len(arrays["sparse_weights"]) > 0
        assert (arrays["sparse_weights"] > 0).all()
    assert not list(store.dir.glob(".*"))                                   # no temporary left
    assert all(p.suffix in (".json", ".safetensors") for p in store.dir.iterdir())   # no pickle


def test_a_store_stopped_partway_resumes_at_the_first_missing_shard(model, real_set, tmp_path, monkeypatch):
    settings = dict(tokenizer=model.tokenizer, with_sparse=True, **STORE)
    whole = stored_corpus(model, real_set.docs, CorpusCache(tmp_path / "whole", shard_docs=SHARD_DOCS), **settings)

    counter = EncodedRows(model, monkeypatch)
    with pytest.raises(StoreInterrupted):
        stored_corpus(model, real_set.docs, CorpusCache(tmp_path / "cut", shard_docs=SHARD_DOCS, stop_after=2),
                      **settings)
    assert counter.rows == 2 * SHARD_DOCS
    cut_dir = tmp_path / "cut" / whole.dir.name
    manifest = json.loads((cut_dir / MANIFEST).read_text())
    assert not manifest["complete"] and [s["start"] for s in manifest["shards"]] == [0, 24]

    # a kill inside the third shard: no partial shard file is left behind
    counter = EncodedRows(model, monkeypatch, fail_after_calls=0)
    with pytest.raises(KeyboardInterrupt):
        stored_corpus(model, real_set.docs, CorpusCache(tmp_path / "cut", shard_docs=SHARD_DOCS), **settings)
    assert sorted(p.name for p in cut_dir.iterdir()) == [MANIFEST, "shard-00000.safetensors", "shard-00001.safetensors"]

    # resumed: only the last two shards are encoded, and the store equals the one written in one go
    monkeypatch.undo()
    counter = EncodedRows(model, monkeypatch)
    cache = CorpusCache(tmp_path / "cut", shard_docs=999)    # the existing store keeps its own shard size
    resumed = stored_corpus(model, real_set.docs, cache, **settings)
    assert counter.rows == len(real_set.docs) - 2 * SHARD_DOCS
    assert cache.report["shards_encoded"] == 2 and cache.report["shards_reused"] == 2
    assert resumed.dir == cut_dir and json.loads((cut_dir / MANIFEST).read_text())["complete"]
    for a, b in zip(shard_arrays(whole), shard_arrays(resumed), strict=True):
        assert set(a) == set(b)
        assert np.array_equal(a["sparse_indptr"], b["sparse_indptr"])
        assert np.array_equal(a["sparse_tokens"], b["sparse_tokens"])
        for name in ("dense", "sparse_weights"):
            assert np.allclose(a[name], b[name], atol=1e-6), name
    got = search_top_k(model, real_set.queries, real_set.docs, heads=("dense", "sparse"), top_k=10,
                       corpus_cache=cache, **SEARCH)
    want = search_top_k(model, real_set.queries, real_set.docs, heads=("dense", "sparse"), top_k=10, **SEARCH)
    assert cache.report["reused"] is True
    for head in want:
        assert torch.allclose(got[head][0], want[head][0], atol=1e-5), head


def test_whatever_changes_the_stored_numbers_changes_the_key(model, real_set):
    # Reading and hashing the 250k-entry vocabulary is most of a key's cost: past the first checks, a
    # stand-in of the same type name serves the tokenizer's vocabulary, read once (in order)
    vocab = dict(sorted(model.tokenizer.get_vocab().items()))
    same_vocab = type(type(model.tokenizer).__name__, (), {"get_vocab": lambda self: vocab})()

    def key(m=model, docs=real_set.docs, tokenizer=same_vocab, **overrides):
        return store_key(store_settings(m, tokenizer, docs, **dict(dict(instruction="", max_length=64,
                                                                        with_sparse=True), **overrides)))

    base = key(tokenizer=model.tokenizer)
    assert key(tokenizer=model.tokenizer) == base                            # deterministic
    assert key() == base                                                     # the stand-in is the tokenizer

    def variant(m=model):
        # the same tokenizer object: copying its vocabulary would only cost time
        return copy.deepcopy(m, memo={id(m.tokenizer): m.tokenizer})

    changed = variant()
    with torch.no_grad():
        changed.encoder.embeddings.word_embeddings.weight[5, 0] += 1e-3     # one weight of one token
    pooled, thresholded = variant(), variant()
    pooled.pooling = "mean" if model.pooling == "cls" else "cls"
    thresholded.sparse_threshold = 0.1
    others = [key(m=changed), key(m=pooled), key(m=thresholded), key(instruction="passage: "), key(max_length=32),
              key(with_sparse=False), key(docs=real_set.docs[:-1]), key(docs=real_set.docs[:-1] + ["other text"]),
              key(docs=real_set.docs[::-1])]
    assert len({base, *others}) == len(others) + 1


# ---------------------------------------------------------------- the command line

def test_cli_eval_and_mine_reuse_the_store(model, real_set, tmp_path, capsys):
    folder = model.save_pretrained(tmp_path / "model")
    beir = write_real_set(tmp_path / "beir", real_set)
    cache = tmp_path / "cache"
    flags = ["--no-progress", "--no-instructions", "--passage-max-len", "64", "--dims", "none", "--search", "rerank",
             "--first-stage-k", "8", "--corpus-cache", str(cache)]
    results = []
    for run in ("first", "second"):
        assert main(["eval", str(folder), str(beir), "--output", str(tmp_path / f"{run}.json"), *flags]) == 0
        results.append(json.loads((tmp_path / f"{run}.json").read_text()))
    assert "corpus store" in capsys.readouterr().out
    assert [r["corpus_cache"]["reused"] for r in results] == [False, True]
    assert results[1]["corpus_cache"]["bytes"] > 0
    for head in ("dense", "sparse", "colbert", "ensemble"):
        assert results[1][head] == pytest.approx(results[0][head], abs=1e-6), head

    rows = [{"query": q, "pos": [d]} for q, d in zip(real_set.queries, real_set.docs)]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in real_set.docs))
    common = [str(tmp_path / "in.jsonl"), "--model", str(folder), "--corpus", str(tmp_path / "corpus.jsonl"),
              "--head", "dense", "--range", "1-10", "--negatives", "10", "--scores", "--no-progress",
              "--no-instructions", "--passage-max-len", "64"]
    mined = []
    for name, extra in (("plain", []), ("stored", ["--corpus-cache", str(cache)]),
                        ("again", ["--corpus-cache", str(cache)])):
        assert main(["mine", common[0], str(tmp_path / f"{name}.jsonl"), *common[1:], *extra]) == 0
        mined.append([json.loads(line) for line in (tmp_path / f"{name}.jsonl").read_text().splitlines()])
    assert capsys.readouterr().out.count("read, nothing encoded") == 1      # the third run
    assert len(list(cache.iterdir())) == 2                       # eval's store (dense + sparse), mine's (dense)
    for plain, stored, again in zip(*mined):
        assert plain["neg_scores"] == pytest.approx(stored["neg_scores"], abs=1e-5) == again["neg_scores"]


def test_the_key_hashes_only_the_weights_behind_the_stored_vectors(model, real_set):
    """A folder without head files gets fresh random heads at every load: a dense-only store must still be
    found again (its key leaves both heads out), a dense + sparse store is another one when the sparse head
    differs, and the ColBERT head, never stored, changes no key."""
    def key(m, with_sparse):
        return store_key(store_settings(m, m.tokenizer, real_set.docs, instruction="", max_length=64,
                                        with_sparse=with_sparse))

    sparse_changed, colbert_changed = copy.deepcopy(model), copy.deepcopy(model)
    with torch.no_grad():
        sparse_changed.sparse_linear.weight.add_(torch.randn_like(sparse_changed.sparse_linear.weight))
        colbert_changed.colbert_linear.weight.add_(torch.randn_like(colbert_changed.colbert_linear.weight))
    assert key(sparse_changed, False) == key(colbert_changed, False) == key(model, False)
    assert key(colbert_changed, True) == key(model, True) != key(sparse_changed, True)

"""First stages (retrieval/first_stage.py): faiss flat/HNSW/IVF against exact inner products, the
inverted index against dense sparse scores, and the agreement of two rankings, on the tiny model's
vectors of real text (the pydoc topics the sample data uses) and on hand-made numbers."""
import numpy as np
import pytest
import torch

from m3composer.model.m3 import M3Model
from m3composer.retrieval.first_stage import DenseIndex, InvertedIndex, agreement, faiss_top_k, top_k_positions
from m3composer.retrieval.search import encode_dense, inference_mode, token_batches
from m3composer.sample_data.sources import pydoc_sections


@pytest.fixture(scope="module")
def model(tiny_dir):
    torch.manual_seed(0)
    model = M3Model.from_pretrained(tiny_dir)
    with torch.no_grad():
        model.sparse_linear.bias.fill_(0.5)            # most tokens get a positive weight: postings overlap
    return model.eval()


@pytest.fixture(scope="module")
def texts():
    items = pydoc_sections()
    return [i.query for i in items[:20]], [i.passage for i in items]


@pytest.fixture(scope="module")
def vectors(model, texts):
    queries, docs = texts
    encode = dict(batch_size=16, progress=False)
    return (encode_dense(model, queries, model.tokenizer, "", 32, **encode),
            encode_dense(model, docs, model.tokenizer, "", 128, **encode))


def recall(found: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(e)) / len(e) for f, e in zip(found, exact)]))


def test_faiss_flat_gives_the_exact_inner_products(vectors):
    queries, docs = vectors
    reference = queries @ docs.T
    scores, indices = faiss_top_k(queries, docs, 10, "flat")
    assert np.allclose(scores, np.take_along_axis(reference, indices, axis=1), atol=1e-5)
    assert np.allclose(scores, -np.sort(-reference, axis=1)[:, :10], atol=1e-5)


def test_hnsw_and_ivf_approximate_flat_and_ivf_probing_every_cell_is_flat(vectors):
    queries, docs = vectors
    flat_scores, flat = faiss_top_k(queries, docs, 10, "flat")
    _, hnsw = DenseIndex("hnsw", hnsw_m=8, hnsw_ef_search=64).search(queries, docs, 10)
    assert 0.9 <= recall(hnsw, flat) <= 1.0                  # 165 vectors: HNSW is all but exact
    ivf_all_scores, ivf_all = DenseIndex("ivf", ivf_nlist=8, ivf_nprobe=8).search(queries, docs, 10)
    assert recall(ivf_all, flat) == 1.0 and np.allclose(ivf_all_scores, flat_scores, atol=1e-5)
    one_cell_scores, one_cell = DenseIndex("ivf", ivf_nlist=8, ivf_nprobe=1).search(queries, docs, 10)
    assert 0.0 < recall(one_cell, flat) <= 1.0
    found = one_cell >= 0                                    # a cell may hold fewer than 10: -1 padding
    assert np.allclose(one_cell_scores[found], (queries[:, None] * docs[np.where(found, one_cell, 0)]).sum(-1)[found],
                       atol=1e-5)


def test_index_defaults_and_bad_parameters():
    assert DenseIndex().kind_for(10) == "flat" and DenseIndex().kind_for(2_000_000) == "hnsw"
    assert DenseIndex("ivf").kind_for(10) == "ivf"
    assert DenseIndex().nlist_for(10) == 1 and DenseIndex().nlist_for(200_000) == int(4 * 200_000 ** 0.5)
    assert DenseIndex(ivf_nlist=50).nlist_for(20) == 20
    with pytest.raises(ValueError, match="index must be one of"):
        DenseIndex("ann")
    with pytest.raises(ValueError, match="ivf_nprobe must be >= 1"):
        DenseIndex("ivf", ivf_nprobe=0)


def test_inverted_index_scores_by_hand():
    # vocabulary of 5; d0 = {1: 2, 3: 1}, d1 = {3: 4}, d2 = {0: 1}; query {3: 0.5, 4: 1}
    weights = torch.tensor([[0, 2.0, 0, 1.0, 0], [0, 0, 0, 4.0, 0], [1.0, 0, 0, 0, 0]])
    index = InvertedIndex(3, 5)
    index.add([2, 0], weights[[2, 0]])                       # batches arrive in any order
    index.add([1], weights[[1]])
    index.finish()
    docs, scores = index.scores(np.array([3, 4]), np.array([0.5, 1.0]))
    assert docs.tolist() == [0, 1] and scores.tolist() == [0.5, 2.0]      # d2 shares no token: not scored
    assert [x.tolist() for x in index.search(np.array([3, 4]), np.array([0.5, 1.0]), 1)] == [[2.0], [1]]
    assert torch.equal(index.rows([1, 0, 2]), weights[[1, 0, 2]])
    empty = index.search(np.array([], dtype=np.int64), np.array([]), 5)
    assert len(empty[0]) == len(empty[1]) == 0


def test_inverted_index_equals_the_sparse_scores_of_a_real_model(model, texts):
    queries, docs = texts

    def lexical(strings, max_length):
        """(lexical weights (n, V) in text order, the encoder's batches (indices, weights))"""
        parts = []
        with inference_mode(model):
            for indices, ids, mask in token_batches(strings, model.tokenizer, "", max_length, 16):
                parts.append((indices, model.encode(ids, mask, with_sparse=True, with_colbert=False).sparse.float()))
        out = torch.zeros(len(strings), parts[0][1].shape[1])
        for indices, sparse in parts:
            out[indices] = sparse
        return out, parts

    q_sparse, _ = lexical(queries, 32)
    d_sparse, batches = lexical(docs, 128)
    index = InvertedIndex(len(docs), d_sparse.shape[1])
    for indices, sparse in batches:
        index.add(indices, sparse)
    index.finish()
    reference = (q_sparse @ d_sparse.T).numpy()
    assert (reference > 0).mean() > 0.5                      # queries and documents really share tokens
    for row, q in enumerate(q_sparse):
        tokens = q.nonzero().squeeze(1).numpy()
        found, scores = index.scores(tokens, q[tokens].numpy())
        assert np.allclose(scores, reference[row, found], rtol=1e-5, atol=1e-5)
        assert (reference[row, np.setdiff1d(np.arange(len(docs)), found)] == 0).all()
        top_scores, top = index.search(tokens, q[tokens].numpy(), 10)
        assert len(top) == min(10, (reference[row] > 0).sum())      # documents sharing no token are not found
        assert np.allclose(top_scores, -np.sort(-reference[row])[:len(top)], rtol=1e-5, atol=1e-5)
    assert torch.equal(index.rows(np.arange(len(docs))), d_sparse)


def test_top_k_positions_breaks_ties_by_position():
    scores = np.array([1.0, 3.0, 2.0, 3.0, 2.0, 2.0])
    assert top_k_positions(scores, 3).tolist() == [1, 3, 2]
    assert top_k_positions(scores, 10).tolist() == [1, 3, 2, 4, 5, 0]


def test_agreement_is_the_recall_of_the_reference_top_10():
    exact = {"dense": {"q1": [f"d{i}" for i in range(12)], "q2": ["a", "b"]},
             "sparse": {"q1": ["x"]}}
    other = {"dense": {"q1": [f"d{i}" for i in range(5, 17)], "q2": ["b", "a", "c"]},
             "sparse": {"q1": ["y"]}, "colbert": {"q1": ["x"]}}
    # q1: the exact top-10 d0..d9 share d5..d9 with d5..d14 -> 0.5; q2: both -> 1
    assert agreement(exact, other) == {"dense": pytest.approx(0.75), "sparse": 0.0}
    assert agreement(exact, exact) == {"dense": 1.0, "sparse": 1.0}

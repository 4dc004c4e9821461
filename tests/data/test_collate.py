"""m3composer/data/collate.py: drawing a query's group, shuffle_text on tokens, prefixes, padding, DataSpec."""
from __future__ import annotations

import collections

import numpy as np
import pytest
import torch

from m3composer.data.collate import (SHUFFLE_MIN_TOKENS, Example, TokenSpec, collate_examples, content_hash,
                                     draw_example, instruction_token_ids, make_data_spec, num_samples_in_batch,
                                     num_tokens_in_batch, sample_negative_indices, shuffle_text_tokens,
                                     split_batch, token_spec_from_tokenizer, with_prefix)


def passage(kind, j, length=4):
    return np.array([0, kind, j] + [7] * length + [2], dtype=np.int32)


def make_row(num_pos=2, num_neg=3, scores=None, row_id=5):
    """A row in the MDS column layout; positive j = [0, 11, j, ...], negative n = [0, 12, n, ...]."""
    ps = [passage(11, j) for j in range(num_pos)] + [passage(12, n) for n in range(num_neg)]
    offsets = np.cumsum([0] + [len(p) for p in ps]).astype(np.int32)
    return {"query": np.array([0, 10, row_id, 2], np.int32), "passages": np.concatenate(ps),
            "passage_offsets": offsets, "num_pos": num_pos, "row_id": row_id, "source": "f.jsonl:1",
            "scores": np.asarray(scores, np.float32) if scores is not None else np.full(len(ps), np.nan, np.float32)}


def ident(p):
    return int(p[1]), int(p[2])      # (11 = positive | 12 = negative, index)


def test_negative_sampling_without_replacement_when_enough():
    for seed in range(50):
        idx = sample_negative_indices(7, 4, np.random.default_rng(seed))
        assert len(idx) == 4 and len(set(idx.tolist())) == 4 and set(idx.tolist()) <= set(range(7))


def test_negative_sampling_repeats_the_list_when_too_few():
    # 2 negatives for 7 slots: list repeated ceil(7/2) = 4 times, so each index at most 4 times
    counts_seen = set()
    for seed in range(50):
        idx = sample_negative_indices(2, 7, np.random.default_rng(seed))
        counts = collections.Counter(idx.tolist())
        assert len(idx) == 7 and set(counts) <= {0, 1} and max(counts.values()) <= 4
        counts_seen.add(tuple(sorted(counts.values())))
    assert counts_seen == {(3, 4)}        # 7 = 3 + 4 is the only split with both counts <= 4


def test_draw_example_positive_first_then_negatives_of_the_row():
    row = make_row(num_pos=2, num_neg=5)
    positives_drawn = set()
    for seed in range(30):
        ex = draw_example(row, 4, np.random.default_rng(seed), has_teacher_scores=False, shuffle_ratio=0.0)
        kinds = [ident(p) for p in ex.passages]
        assert kinds[0][0] == 11 and all(k == 12 for k, _ in kinds[1:])
        assert len({j for _, j in kinds[1:]}) == 3          # 5 >= 3 negatives: no duplicates
        positives_drawn.add(kinds[0][1])
        assert ex.teacher_scores is None and ex.row_id == 5
    assert positives_drawn == {0, 1}


def test_teacher_scores_travel_with_passages_and_negatives_sorted_descending():
    # As FlagEmbedding (recipe.md §Collation): 2 negatives for 3 slots -> duplicates, sorted by score, descending
    scores = [0.9, 0.4, 0.0, 0.1]            # pos0, pos1, neg0, neg1
    row = make_row(num_pos=2, num_neg=2, scores=scores)
    score_of = {(11, 0): 0.9, (11, 1): 0.4, (12, 0): 0.0, (12, 1): 0.1}
    for seed in range(30):
        ex = draw_example(row, 4, np.random.default_rng(seed), has_teacher_scores=True, shuffle_ratio=0.0)
        kinds = [ident(p) for p in ex.passages]
        assert ex.teacher_scores == pytest.approx([score_of[k] for k in kinds])
        neg_scores = ex.teacher_scores[1:]
        assert neg_scores == sorted(neg_scores, reverse=True)
        assert sorted(collections.Counter(kinds[1:]).values()) == [1, 2]


def test_group_size_one_is_just_the_positive():
    ex = draw_example(make_row(num_neg=0), 1, np.random.default_rng(0), has_teacher_scores=False, shuffle_ratio=0.0)
    assert [ident(p)[0] for p in ex.passages] == [11]


def test_row_without_negatives_borrows_instead_of_crashing():
    row = make_row(num_pos=1, num_neg=0)
    borrowed = [passage(13, 1), passage(13, 2), passage(13, 3)]
    ex = draw_example(row, 4, np.random.default_rng(0), has_teacher_scores=False, shuffle_ratio=0.0,
                      borrow=lambda n, rng: borrowed[:n])
    assert [ident(p) for p in ex.passages] == [(11, 0), (13, 1), (13, 2), (13, 3)]
    # nothing to borrow (a one-row group): the positive is repeated, still G passages
    ex = draw_example(row, 3, np.random.default_rng(0), has_teacher_scores=False, shuffle_ratio=0.0,
                      borrow=lambda n, rng: [])
    assert [ident(p) for p in ex.passages] == [(11, 0)] * 3
    with pytest.raises(ValueError, match="no negatives"):
        draw_example(make_row(num_pos=1, num_neg=0, scores=[1.0]), 3, np.random.default_rng(0), has_teacher_scores=True,
                     shuffle_ratio=0.0)


def test_same_generator_state_same_draw():
    row = make_row(num_pos=3, num_neg=6)
    a = draw_example(row, 5, np.random.default_rng([1, 2, 3]), has_teacher_scores=False, shuffle_ratio=0.0)
    b = draw_example(row, 5, np.random.default_rng([1, 2, 3]), has_teacher_scores=False, shuffle_ratio=0.0)
    assert [ident(p) for p in a.passages] == [ident(p) for p in b.passages]


def test_shuffle_text_tokens_permutes_three_chunks_and_keeps_specials():
    content = np.arange(100, 100 + 40)               # 40 content tokens > SHUFFLE_MIN_TOKENS
    ids = np.concatenate([[0], content, [2]])
    size = 40 // 3 + 1                               # FlagEmbedding's chunk size: 14, 14, 12
    chunks = [tuple(content[s:s + size]) for s in range(0, 40, size)]
    orders = set()
    for seed in range(40):
        out = shuffle_text_tokens(ids, np.random.default_rng(seed), 1.0)
        assert out[0] == 0 and out[-1] == 2 and sorted(out[1:-1].tolist()) == content.tolist()
        body = out[1:-1].tolist()
        # the body is the three chunks in some order
        pieces, at = [], 0
        while at < len(body):
            match = [c for c in chunks if tuple(body[at:at + len(c)]) == c]
            assert match, f"not a chunk boundary at {at}"
            pieces.append(chunks.index(match[0]))
            at += len(match[0])
        orders.add(tuple(pieces))
    assert len(orders) == 6                          # all 3! orders occur


def test_shuffle_text_tokens_threshold_and_ratio():
    short = np.concatenate([[0], np.arange(100, 100 + SHUFFLE_MIN_TOKENS), [2]])
    assert np.array_equal(shuffle_text_tokens(short, np.random.default_rng(0), 1.0), short)
    long = np.concatenate([[0], np.arange(100, 160), [2]])
    assert np.array_equal(shuffle_text_tokens(long, np.random.default_rng(0), 0.0), long)
    # ratio 0.3: shuffled w.p. 0.3, and 1 of the 6 orders is the identity -> changed w.p. 0.25
    changed = sum(not np.array_equal(shuffle_text_tokens(long, np.random.default_rng(s), 0.3), long)
                  for s in range(4000))
    assert abs(changed / 4000 - 0.25) < 0.03


def test_only_the_positive_is_shuffled():
    long_pos = np.concatenate([[0], np.arange(100, 160), [2]])
    neg = passage(12, 0, length=60)
    ps = [long_pos, neg]
    row = {"query": np.array([0, 10, 2], np.int32), "passages": np.concatenate(ps).astype(np.int32),
           "passage_offsets": np.array([0, len(long_pos), len(long_pos) + len(neg)], np.int32), "num_pos": 1,
           "scores": np.full(2, np.nan, np.float32), "row_id": 1}
    ex = draw_example(row, 2, np.random.default_rng(3), has_teacher_scores=False, shuffle_ratio=1.0)
    assert np.array_equal(ex.passages[1], neg)
    moved = sum(not np.array_equal(draw_example(row, 2, np.random.default_rng(s), has_teacher_scores=False,
                                                shuffle_ratio=1.0).passages[0], long_pos) for s in range(60))
    assert 35 <= moved <= 60                         # ~5/6 of draws change the positive


def test_with_prefix_inserts_after_cls_and_truncates_keeping_eos():
    ids = np.array([0, 5, 6, 7, 8, 2])
    assert with_prefix(ids, (40, 41), 32, eos_id=2).tolist() == [0, 40, 41, 5, 6, 7, 8, 2]
    assert with_prefix(ids, (40, 41), 5, eos_id=2).tolist() == [0, 40, 41, 5, 2]
    assert with_prefix(ids, (), 4, eos_id=2).tolist() == [0, 5, 6, 2]
    assert with_prefix(ids, (), 6, eos_id=2).tolist() == ids.tolist()


def test_instruction_ids_equal_tokenising_instruction_plus_text(tokenizer):
    # With the real SentencePiece tokenizer: <s> + ids(instruction) + ids(text)[1:] == ids(instruction + text)
    texts = ["how do I reset my password?", "Die Katze sitzt auf der Matte.", "日本語のテキスト",
             "ÉCOLE normale supérieure", "x", "  two leading spaces"]
    for instruction in ("query: ", "passage: ", "Represent this sentence for searching relevant passages: "):
        prefix = instruction_token_ids(tokenizer, instruction)
        for text in texts:
            plain = np.array(tokenizer(text)["input_ids"])
            joined = tokenizer(instruction + text)["input_ids"]
            assert with_prefix(plain, prefix, 512, tokenizer.eos_token_id).tolist() == joined
    spec = token_spec_from_tokenizer(tokenizer, "query: ", None)
    assert (spec.cls_id, spec.pad_id, spec.eos_id) == (0, 1, 2)
    assert spec.query_prefix == tuple(instruction_token_ids(tokenizer, "query: ")) and spec.passage_prefix == ()


def _examples():
    return [Example(7, np.array([0, 10, 2]), [np.array([0, 11, 3, 2]), np.array([0, 12, 2])], [1.5, 0.2]),
            Example(9, np.array([0, 10, 4, 5, 6, 2]), [np.array([0, 11, 2]), np.array([0, 12, 8, 8, 8, 8, 2])],
                    [1.0, 0.5])]


def test_collate_pads_to_longest_example_major_with_flags():
    batch = collate_examples(_examples(), TokenSpec(), query_max_len=32, passage_max_len=6,
                             has_teacher_scores=True, is_parallel=True)
    assert batch["query_input_ids"].tolist() == [[0, 10, 2, 1, 1, 1], [0, 10, 4, 5, 6, 2]]
    assert batch["query_attention_mask"].tolist() == [[1, 1, 1, 0, 0, 0], [1] * 6]
    # passages: (B*G, Lp), positive of query b at b*G; the 7-token negative truncated to 6 keeping </s>
    assert batch["passage_input_ids"].tolist() == [[0, 11, 3, 2, 1, 1], [0, 12, 2, 1, 1, 1],
                                                   [0, 11, 2, 1, 1, 1], [0, 12, 8, 8, 8, 2]]
    assert batch["passage_attention_mask"].sum(1).tolist() == [4, 3, 3, 6]
    assert batch["teacher_scores"].dtype == torch.float32
    assert np.allclose(batch["teacher_scores"].numpy(), [[1.5, 0.2], [1.0, 0.5]])
    assert bool(batch["has_teacher_scores"]) and bool(batch["is_parallel"])
    assert batch["has_teacher_scores"].dim() == 0
    assert batch["row_ids"].tolist() == [7, 9]
    assert batch["query_input_ids"].dtype == torch.long


def test_collate_without_teacher_scores_gives_zeros_and_prefixes_both_sides():
    spec = TokenSpec(pad_id=1, query_prefix=(50,), passage_prefix=(60, 61))
    batch = collate_examples(_examples(), spec, query_max_len=32, passage_max_len=32, has_teacher_scores=False,
                             is_parallel=False, pad_to_multiple_of=8)
    assert batch["teacher_scores"].tolist() == [[0.0, 0.0], [0.0, 0.0]] and not bool(batch["has_teacher_scores"])
    assert batch["query_input_ids"][0, :4].tolist() == [0, 50, 10, 2]
    assert batch["passage_input_ids"][0, :6].tolist() == [0, 60, 61, 11, 3, 2]
    assert batch["query_input_ids"].shape[1] == 8 and batch["passage_input_ids"].shape[1] == 16


def test_data_spec_keeps_the_batch_whole_and_counts_queries_and_real_tokens():
    batch = collate_examples(_examples(), TokenSpec(), query_max_len=32, passage_max_len=32,
                             has_teacher_scores=False, is_parallel=False)
    assert split_batch(batch, 1) == [batch]
    assert num_samples_in_batch(batch) == 2
    assert num_tokens_in_batch(batch) == (3 + 6) + (4 + 3 + 3 + 7)
    spec = make_data_spec(torch.utils.data.DataLoader([batch], batch_size=None))
    assert spec.split_batch(batch, 1) == [batch]
    assert spec.get_num_samples_in_batch(batch) == 2 and spec.get_num_tokens_in_batch(batch) == 26


def test_collate_hashes_passages_as_encoded_and_lists_every_positive_of_a_row():
    shared = np.array([0, 11, 3, 2])
    examples = [Example(1, np.array([0, 10, 2]), [shared, np.array([0, 12, 2])], None,
                        positives=[shared, np.array([0, 13, 2])]),
                Example(2, np.array([0, 14, 2]), [np.array([0, 15, 2]), shared.copy()], None,
                        positives=[np.array([0, 15, 2])])]
    spec = TokenSpec(passage_prefix=(60,))
    batch = collate_examples(examples, spec, query_max_len=8, passage_max_len=8, has_teacher_scores=False,
                             is_parallel=False)
    hashes, positives = batch["passage_hashes"], batch["positive_hashes"]
    assert hashes.dtype == torch.long and hashes.shape == (4,) and positives.shape == (2, 3)
    assert hashes[0] == hashes[3] and len(set(hashes.tolist())) == 3          # same text, same hash
    # row 0: its column, then its two positives as encoded (with the prefix); row 1 pads with its first
    assert positives[0].tolist() == [hashes[0], hashes[0], content_hash(np.array([0, 60, 13, 2]))]
    assert positives[1].tolist() == [hashes[2]] * 3
    assert content_hash(np.array([0, 60, 11, 3, 2])) == hashes[0]           # the prefixed ids, not the raw ones
    # truncation decides identity: two passages equal in their first 3 tokens are the same input at max_len 3
    cut = collate_examples([Example(1, np.array([0, 2]), [np.array([0, 5, 6, 2]), np.array([0, 5, 7, 2])], None)],
                           TokenSpec(), query_max_len=4, passage_max_len=3, has_teacher_scores=False,
                           is_parallel=False)
    assert cut["passage_hashes"][0] == cut["passage_hashes"][1]


def test_content_hash_is_the_same_in_another_process():
    import sys

    from tests import bounded

    code = "import numpy as np; from m3composer.data.collate import content_hash; print(content_hash(np.array([0, 5, 2])))"
    done = bounded.run([sys.executable, "-c", code], timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert int(out) == content_hash(np.array([0, 5, 2], dtype=np.int32))


def test_draw_example_keeps_all_positives_of_the_row():
    row = {"row_id": 3, "query": np.array([0, 9, 2]), "passages": np.array([0, 5, 2, 0, 6, 2, 0, 7, 2]),
           "passage_offsets": np.array([0, 3, 6, 9]), "num_pos": 2, "scores": np.full(3, np.nan)}
    example = draw_example(row, 2, np.random.default_rng(0), has_teacher_scores=False, shuffle_ratio=0.0)
    assert [p.tolist() for p in example.positives] == [[0, 5, 2], [0, 6, 2]]

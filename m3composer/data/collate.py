"""One query's training group (positive + negatives + teacher scores), padding, and the DataSpec.

Rows arrive pre-tokenised (the MDS columns of docs/architecture.md). `draw_example` draws one
query's group of G passages, `collate_examples` prefixes, truncates and pads a batch of them into
the collated batch (its keys and shapes: docs/architecture.md §The collated batch). The drawing
rules and where they differ from FlagEmbedding's `create_batch_data` are in docs/recipe.md
§Collation and §shuffle_text.

Every random choice comes from a generator the caller seeds per row (the dataset uses
(seed, epoch, row_id)), so a row draws the same group whatever the worker count or resume point,
and a different one each epoch.

The DataSpec keeps a device batch whole (`split_batch` returns `[batch]`) and counts samples in
queries, the unit `M3TrainDataset.state_dict(num_samples)` expects: docs/recipe.md §Whole device
batch, §Sample counting.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
from composer.core import DataSpec

from m3composer.padding import right_pad

# FlagEmbedding shuffles texts longer than 100 characters. Text is pre-tokenised here, so the test is
# on content tokens (without <s>/</s>): about 3.3 characters per XLM-R token on English text, so
# 100 characters ≈ 30 tokens (BENCHMARKS.md §Measurements behind code comments).
SHUFFLE_MIN_TOKENS = 30
SHUFFLE_CHUNKS = 3


@dataclass(frozen=True)
class TokenSpec:
    """Special ids and instruction prefixes (token ids, no special tokens) for one tokenizer."""
    cls_id: int = 0           # XLM-R / bge-m3 / e5 ids: <s>=0, <pad>=1, </s>=2
    pad_id: int = 1
    eos_id: int = 2
    query_prefix: tuple[int, ...] = ()
    passage_prefix: tuple[int, ...] = ()


def instruction_token_ids(tokenizer, instruction: str | None) -> tuple[int, ...]:
    """Token ids of an instruction, without special tokens (empty for None or "")."""
    if not instruction:
        return ()
    return tuple(int(i) for i in tokenizer(instruction, add_special_tokens=False)["input_ids"])


def token_spec_from_tokenizer(tokenizer, query_instruction: str | None = None,
                              passage_instruction: str | None = None) -> TokenSpec:
    """TokenSpec of a Hugging Face tokenizer (object or local folder path)."""
    if isinstance(tokenizer, (str, bytes)) or hasattr(tokenizer, "__fspath__"):
        from transformers import AutoTokenizer  # local folders only; never a hub name
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer), local_files_only=True, trust_remote_code=False)
    for attr in ("cls_token_id", "pad_token_id", "eos_token_id"):
        if getattr(tokenizer, attr) is None:
            raise ValueError(f"tokenizer {type(tokenizer).__name__} has no {attr}")
    return TokenSpec(cls_id=tokenizer.cls_token_id, pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id,
                     query_prefix=instruction_token_ids(tokenizer, query_instruction),
                     passage_prefix=instruction_token_ids(tokenizer, passage_instruction))


def split_passages(ids: np.ndarray, offsets: np.ndarray) -> list[np.ndarray]:
    """The `pos`/`neg` column (all passages concatenated) cut at its n+1 offsets."""
    return [ids[offsets[i]:offsets[i + 1]] for i in range(len(offsets) - 1)]


def sample_negative_indices(num_neg: int, num_needed: int, rng: np.random.Generator) -> np.ndarray:
    """FlagEmbedding's rule: `num_needed` of `range(num_neg)` without replacement, from the list
    repeated ceil(needed/num_neg) times when it is too short (each index then at most that often)."""
    if num_needed == 0:
        return np.zeros(0, dtype=np.int64)
    if num_neg <= 0:
        raise ValueError("no negatives to sample from")
    repeats = math.ceil(num_needed / num_neg) if num_neg < num_needed else 1
    pool = np.tile(np.arange(num_neg), repeats)
    return pool[rng.choice(len(pool), size=num_needed, replace=False)]


def shuffle_text_tokens(ids: np.ndarray, rng: np.random.Generator, shuffle_ratio: float) -> np.ndarray:
    """FlagEmbedding's `shuffle_text` on token ids: with probability `shuffle_ratio`, a passage with more
    than SHUFFLE_MIN_TOKENS content tokens is cut into 3 consecutive chunks (size n//3 + 1, the
    last shorter) whose order is shuffled; `<s>` and `</s>` stay in place.

    Differences from FlagEmbedding: chunks are cut between tokens, not characters (no word is
    split) and are joined without the extra space it inserts; the threshold is in tokens.
    """
    if shuffle_ratio <= 0 or len(ids) - 2 <= SHUFFLE_MIN_TOKENS or rng.random() >= shuffle_ratio:
        return ids
    content = ids[1:-1]
    size = len(content) // SHUFFLE_CHUNKS + 1
    chunks = [content[s:s + size] for s in range(0, len(content), size)]
    order = rng.permutation(len(chunks))
    return np.concatenate([ids[:1]] + [chunks[i] for i in order] + [ids[-1:]])


@dataclass
class Example:
    """One query with its G passages (positive first), before prefixing and truncation."""
    row_id: int
    query: np.ndarray
    passages: list[np.ndarray]
    teacher_scores: list[float] | None
    positives: list[np.ndarray] = field(default_factory=list)   # all the row's positives (false-negative masking)


# borrow(num_needed, rng) -> passages (token ids) from other rows of the same group
Borrow = Callable[[int, np.random.Generator], list[np.ndarray]]


def row_passages(row: dict) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(positives, negatives) of an MDS row: `passages` cut at `passage_offsets`, split at `num_pos`."""
    passages = split_passages(row["passages"], row["passage_offsets"])
    num_pos = int(row["num_pos"])
    return passages[:num_pos], passages[num_pos:]


def draw_example(row: dict, train_group_size: int, rng: np.random.Generator, *, has_teacher_scores: bool,
                 shuffle_ratio: float, borrow: Borrow | None = None) -> Example:
    """Draw the positive, shuffle it (maybe), and draw G−1 negatives for one MDS row."""
    positives, negatives = row_passages(row)
    if not positives:
        raise ValueError(f"row {int(row['row_id'])} ({row.get('source', '?')}) has no positive passage")
    scores_all = np.asarray(row["scores"], dtype=np.float32) if has_teacher_scores else None
    j = int(rng.integers(len(positives)))
    passages = [shuffle_text_tokens(positives[j], rng, shuffle_ratio)]
    scores = [float(scores_all[j])] if has_teacher_scores else None
    needed = train_group_size - 1
    if needed > 0 and negatives:
        idx = sample_negative_indices(len(negatives), needed, rng)
        if has_teacher_scores:
            neg_scores = scores_all[len(positives) + idx]
            order = np.argsort(-neg_scores, kind="stable")      # FlagEmbedding: descending teacher score
            idx, neg_scores = idx[order], neg_scores[order]
            scores += [float(s) for s in neg_scores]
        passages += [negatives[i] for i in idx]
    elif needed > 0:
        if has_teacher_scores:
            raise ValueError(f"row {int(row['row_id'])} ({row.get('source', '?')}) has no negatives, so no teacher "
                             "scores for them; serve its stream without teacher scores")
        borrowed = borrow(needed, rng) if borrow is not None else []
        # A group of a single row has nothing to borrow: repeat the positive (a finite, useless term).
        passages += borrowed if borrowed else [passages[0]] * needed
    if has_teacher_scores and not np.all(np.isfinite(scores)):
        raise ValueError(f"row {int(row['row_id'])} ({row.get('source', '?')}): teacher score missing (NaN) "
                         "in a stream marked has_teacher_scores")
    return Example(int(row["row_id"]), row["query"], passages, scores, positives=positives)


def with_prefix(ids: np.ndarray, prefix: Sequence[int], max_len: int, eos_id: int) -> np.ndarray:
    """`<s>` + prefix + content + `</s>`, truncated to max_len keeping `</s>` (HF truncation=True)."""
    ids = np.asarray(ids, dtype=np.int64)
    if prefix:
        ids = np.concatenate([ids[:1], np.asarray(prefix, dtype=np.int64), ids[1:]])
    if len(ids) > max_len:
        ids = np.concatenate([ids[:max_len - 1], np.array([eos_id], dtype=np.int64)])
    return ids


def content_hash(ids: np.ndarray) -> int:
    """A signed 64-bit hash of a token-id sequence, the same in every process (Python's `hash`
    of bytes is salted per process, and ranks must agree)."""
    digest = hashlib.blake2b(np.asarray(ids, dtype="<i8").tobytes(), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def passage_hashes(examples: Sequence[Example], passages: Sequence[np.ndarray], spec: TokenSpec,
                   passage_max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`(passage_hashes (B·G,), positive_hashes (B, P))` of the passages as the model sees them
    (prefixed, truncated). Row b's positives are its drawn positive column (maybe shuffled) and
    every positive of its row; shorter rows repeat their first hash."""
    column = [content_hash(p) for p in passages]
    group_size = len(passages) // len(examples)
    positives = []
    for b, e in enumerate(examples):
        own = [column[b * group_size]]
        own += [content_hash(with_prefix(p, spec.passage_prefix, passage_max_len, spec.eos_id)) for p in e.positives]
        positives.append(own)
    width = max(len(p) for p in positives)
    positives = [p + [p[0]] * (width - len(p)) for p in positives]
    return torch.tensor(column, dtype=torch.long), torch.tensor(positives, dtype=torch.long)


def collate_examples(examples: Sequence[Example], spec: TokenSpec, *, query_max_len: int, passage_max_len: int,
                     has_teacher_scores: bool, is_parallel: bool,
                     pad_to_multiple_of: int | None = None) -> dict[str, torch.Tensor]:
    """The collated batch of the contract (docs/architecture.md)."""
    if not examples:
        raise ValueError("cannot collate an empty batch")
    group_size = len(examples[0].passages)
    if any(len(e.passages) != group_size for e in examples):
        raise ValueError("examples of one batch have different group sizes")
    queries = [with_prefix(e.query, spec.query_prefix, query_max_len, spec.eos_id) for e in examples]
    passages = [with_prefix(p, spec.passage_prefix, passage_max_len, spec.eos_id)
                for e in examples for p in e.passages]
    query_ids, query_mask = right_pad(queries, spec.pad_id, pad_to_multiple_of)
    passage_ids, passage_mask = right_pad(passages, spec.pad_id, pad_to_multiple_of)
    column_hashes, positive_hashes = passage_hashes(examples, passages, spec, passage_max_len)
    if has_teacher_scores:
        teacher = torch.tensor([e.teacher_scores for e in examples], dtype=torch.float32)
    else:
        teacher = torch.zeros((len(examples), group_size), dtype=torch.float32)
    return {
        "query_input_ids": query_ids,
        "query_attention_mask": query_mask,
        "passage_input_ids": passage_ids,
        "passage_attention_mask": passage_mask,
        "teacher_scores": teacher,
        "has_teacher_scores": torch.tensor(bool(has_teacher_scores)),
        "is_parallel": torch.tensor(bool(is_parallel)),
        "row_ids": torch.tensor([e.row_id for e in examples], dtype=torch.long),
        "passage_hashes": column_hashes,
        "positive_hashes": positive_hashes,
    }


def split_batch(batch: dict, microbatch_size: int) -> list[dict]:
    """Never split: the in-batch contrastive loss needs the whole device batch in one forward."""
    return [batch]


def num_samples_in_batch(batch: dict) -> int:
    """Queries in the device batch (the unit of M3TrainDataset.state_dict)."""
    return int(batch["query_input_ids"].shape[0])


def num_tokens_in_batch(batch: dict) -> int:
    """Non-pad tokens of queries and passages."""
    return int(batch["query_attention_mask"].sum() + batch["passage_attention_mask"].sum())


def make_data_spec(dataloader) -> DataSpec:
    """Composer DataSpec for a DataLoader over M3TrainDataset (batch_size=None)."""
    return DataSpec(dataloader, split_batch=split_batch, get_num_samples_in_batch=num_samples_in_batch,
                    get_num_tokens_in_batch=num_tokens_in_batch)

"""Purpose tags of the seeded random draws: the one registry of them (tests/test_seeds.py keeps them distinct).

A numpy generator that serves one purpose is seeded with `default_rng([seed, TAG, ...])`: the run's
seed, the purpose's tag, then what the draw depends on (epoch, row id, ...). Two purposes with the
same tag would draw related numbers whenever the rest of their entropy lined up, so every tag here
is different from every other. Tags are non-zero and come right after the seed, because
SeedSequence ignores trailing zeros (`[42, 0]` and `[42]` give the same generator).

The sample data draws with Python's `random.Random(f"{seed}:{task}:{TAG}")`; its tags are the
strings below, distinct too.

Seeded draws without a tag, kept as they are because a tag would change what earlier runs drew
(every dropout mask of a training run, the negatives `m3c mine --seed` wrote, bootstrap intervals):
- `callbacks/step_seed.py`: `SeedSequence([rank_zero_seed, rank, step])`, the seed of every step's
  global generators (dropout);
- `retrieval/mine.py`: `default_rng([seed, line_no])`, the draw of a row's mined negatives;
- `retrieval/compare.py`: `default_rng(seed)`, the paired bootstrap.
Their seed lists can coincide with a tagged one: rank 1's step seed at step e comes from
`[seed, 1, e]`, the entropy of the plan's epoch e, and `m3c mine`'s `[42, 1]` is the plan's
`[42, 1, 0]`. Tagging them is left to a change that may alter those outputs.
"""
from __future__ import annotations

# numpy SeedSequence tags: default_rng([seed, TAG, ...]); § = a section of docs/recipe.md
PLAN_STREAM = 1           # data/plan.py: an epoch's row order and step order (§Epoch plan)
ROW_STREAM = 2            # data/dataset.py: one row's draw of positive, negatives and token shuffle (§Collation)
REFRESH_STREAM = 3        # retrieval/refresh.py: a row's draw among its re-mined candidates (§Negative refresh)
SHARD_BLOCK_STREAM = 4    # data/plan.py: the shard-aware plan's shuffles (§Shard-aware plan)
ELASTIC_STREAM = 5        # data/plan.py: the new step order of an elastically resumed epoch
#                           (docs/architecture.md §Preemption and elastic resume); 3 until it was found to be
#                           REFRESH_STREAM's tag too
IVF_TRAIN_STREAM = 6      # retrieval/first_stage.py: the corpus vectors an IVF index's k-means trains on
#                           (seed 0: `m3c eval`/`m3c mine` have no run seed)

NUMPY_TAGS = {"PLAN_STREAM": PLAN_STREAM, "ROW_STREAM": ROW_STREAM, "REFRESH_STREAM": REFRESH_STREAM,
              "SHARD_BLOCK_STREAM": SHARD_BLOCK_STREAM, "ELASTIC_STREAM": ELASTIC_STREAM,
              "IVF_TRAIN_STREAM": IVF_TRAIN_STREAM}

# sample_data/generate.py: random.Random(f"{seed}:{task}:{TAG}")
HOLDOUT_TAG = "holdout"   # which items are held out for evaluation
SUBSAMPLE_TAG = "rows"    # which rows a task keeps under max_rows_per_task

STRING_TAGS = {"HOLDOUT_TAG": HOLDOUT_TAG, "SUBSAMPLE_TAG": SUBSAMPLE_TAG}

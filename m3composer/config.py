"""One typed schema for a training run: YAML + `key=value` overrides -> a validated `TrainConfig`.

`load_config(yaml_path, overrides)` merges the YAML and the command-line overrides onto the
dataclass schema with omegaconf, so a misspelled or unknown key fails at start-up naming the key
(`Key 'max_durration' not in 'TrainerConfig'. Did you mean: 'max_duration'?`), a value of the
wrong type fails naming the key, and a missing required value fails naming it. `validate()` then
checks ranges and cross-field rules, each error naming its key.

Every option of FlagEmbedding's `run.py`/data arguments has a field here with the same name and
meaning. The sections mirror the pipeline: model, data, loss, optimizer, trainer, callbacks,
loggers. Each field states its default, its meaning and (where it is one of a list) its choices
once, with `setting(...)`; docs/configuration.md is generated from them
(`python -m m3composer.config_reference`).
"""
from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from omegaconf import MISSING, OmegaConf

from m3composer.algorithms.self_distill_warmup import SELF_DISTILL_MODES, parse_start
from m3composer.algorithms.sparsity_warmup import SPARSITY_REGULARIZERS
from m3composer.data.negatives import parse_rank_range
from m3composer.data.plan import PLAN_KINDS, TAIL_RULES
from m3composer.distributed import CROSS_DEVICE_HEADS, CROSS_RANK_GRAD_SCALES
from m3composer.model.heads import COLBERT_DIM_HIDDEN, POOLING_METHODS, SPARSE_INITS
from m3composer.model.m3 import INFERENCE_BATCH_SIZE, INFERENCE_PASSAGE_MAX_LEN
from m3composer.model.scores import HEADS, SCORE_NAMES
from m3composer.retrieval.mining import MINE_HEAD, MINE_NEGATIVES, MINE_RANK_RANGE
from m3composer.retrieval.refresh import REFRESH_BATCH_SIZE

AUTO = "auto"  # instruction prefixes / pooling: take what the model folder records
# `loggers:` keys -> Composer logger class (their packages are optional)
LOGGERS = {"mlflow": "MLFlowLogger", "wandb": "WandBLogger", "tensorboard": "TensorboardLogger", "file": "FileLogger"}
# `loggers:` keys -> (module the logger imports, how to install it); checked at start-up so that a
# missing package is one line naming the install, not Composer's ImportError from inside the Trainer.
LOGGER_PACKAGES = {"mlflow": ("mlflow", "pip install 'm3composer[mlflow]'"),
                   "tensorboard": ("tensorboard", "pip install 'm3composer[tensorboard]'"),
                   "wandb": ("wandb", "pip install wandb")}
PRECISIONS = ("auto", "fp32", "amp_bf16", "amp_fp16")
DEVICES = ("auto", "cpu", "gpu")


def setting(default: Any = MISSING, doc: str = "", *, factory: Optional[Callable[[], Any]] = None,
            choices: tuple = ()) -> Any:
    """A schema field with its meaning (and, where it is one of a list, the list `validate` checks):
    each setting's default, meaning and choices are written here once, and docs/configuration.md
    is generated from them (`python -m m3composer.config_reference`)."""
    metadata = {"doc": doc, "choices": tuple(choices)}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def section(cls: type) -> Any:
    """A nested section, always present; its class docstring documents it."""
    return field(default_factory=cls)


@dataclass
class GradientCacheConfig:
    """Gradient cache (GradCache): encode the device batch in chunks and back-propagate the
    full-batch loss chunk by chunk (model/gradcache.py, docs/recipe.md §Gradient cache)."""
    enabled: bool = setting(False, (
        "gradient cache (GradCache): encode the device batch in chunks without a graph, compute the full-batch "
        "loss on the cached head outputs, then re-encode chunk by chunk (same dropout masks) to back-propagate. "
        "Use it when the batch you want (in-batch negatives) does not fit in memory: activation memory becomes "
        "one chunk's. Costs one more encoder forward per step: on e5-small 1.13-1.16× the uncached time with "
        "gradient checkpointing and 1.33-1.38× without it (two runs each) (1.39-1.46× on a 2-layer model over "
        "a 250k vocabulary, where the forward is a larger share of a step; BENCHMARKS.md §Gradient cache) and "
        "memory for the cached outputs (ColBERT vectors `n·L·D`, the `(n, V)` sparse vectors of the loss). "
        "Exact: the same loss and gradients as one big forward for the dropout masks drawn (they differ from "
        "an uncached run's, as the encoder calls have other shapes). Works with DDP (one all-reduce per step), "
        "gradient checkpointing, bf16, self-distillation and resume; refused with `trainer.fsdp`. It bounds "
        "activations to one chunk by itself: turn `model.gradient_checkpointing` off with it when a chunk fits "
        "(cached without checkpointing measured about as fast as uncached with it: e5-small 13.07-13.10 vs "
        "12.28-14.95 s per query group). At 8,192 tokens on 2 CPU cores under 20 GiB it trained 20 query "
        "groups × 9 sequences where neither the uncached step nor FlagEmbedding's split-batch trained one; "
        "at 2,048 under 10 GiB, 128 query groups (the uncached step 4, FlagEmbedding 6)"))
    max_sequences: int = setting(16, (
        "rows (queries and passages together, taken in length order) per chunk; smaller = less memory, "
        "more encoder calls"))
    max_tokens: Optional[int] = setting(32768, (
        "rows × padded length per chunk (long rows get smaller chunks); must hold one sequence "
        "(`data.passage_max_len`); null = rows only. On a CPU at long lengths a chunk's attention matrices "
        "dominate (4 rows of 8,192 tokens: 8.6 GiB), so set it to about one sequence there"))


@dataclass
class ModelConfig:
    """The model folder, its heads and how the encoder runs."""
    name_or_path: str = setting(MISSING, (
        "a local model folder, or `asset:e5-small` / `asset:tiny-xlmr` for the offline assets (built "
        "offline on demand); no hub access"))
    pooling: str = setting(AUTO, (
        "dense pooling: `cls`, `mean`, or `auto` = what the folder's `m3composer.json` records (e5: mean; "
        "a BGE-M3 folder: cls)"), choices=(AUTO, *POOLING_METHODS))
    colbert_dim: int = setting(COLBERT_DIM_HIDDEN, "ColBERT vector size; -1 = the encoder's hidden size (the recipe)")
    gradient_checkpointing: bool = setting(False, "non-reentrant activation checkpointing of the encoder")
    gradient_cache: GradientCacheConfig = section(GradientCacheConfig)
    fix_position_embedding: bool = setting(False, "freeze the position embeddings (FreezePositionEmbeddings)")
    sparse_threshold: float = setting(0.0, (
        "lexical weights below this are dropped at inference: in evaluation during training and in the export, "
        "whose `m3composer.json` records it so that `m3c eval`, `M3Model.encode_texts` and search apply it "
        "(`m3c eval --sparse-threshold` overrides it); training's loss always sees every weight. 0 = keep every "
        "positive weight (docs/recipe.md §Sparsity control)"))
    attn_implementation: Optional[str] = setting("sdpa", "transformers attention kernel; null = the encoder's default")
    trust_remote_code: bool = setting(False, "allow custom model code in the folder (off unless you turn it on)")
    new_sparse_head_init: str = setting("idf", (
        "how the sparse head starts when the model folder has none (any e5, XLM-R or BERT encoder): `idf` "
        "(the head is fitted, by ridge least squares on the base encoder's hidden states, to idf-weighted "
        "overlap over `model.sparse_init_passages` training passages: a shared token is worth about c²·idf², "
        "one logit at average idf, ~0 for tokens in every passage; costs one no-grad encode of the sample "
        "before step 0, 86 s for 3,849 passages with e5-small on 2 CPU ranks; docs/recipe.md §A fresh sparse "
        "head), `lexical_overlap` (weight 0, bias √τ: every shared token is worth one logit, the head starts "
        "as a bag-of-words matcher and learns which tokens matter) or `default` (PyTorch's init, as "
        "FlagEmbedding). Folders with trained heads (BGE-M3) load them and ignore this. Recorded in the "
        "export's `m3composer.json` (`head_init`)"), choices=SPARSE_INITS)
    sparse_init_passages: int = setting(4096, (
        "`idf` init: distinct training passages sampled for the fit, one no-grad encode (the first rows of "
        "every stream in proportion to its rows, with their queries); the idf is counted over them too, so "
        "more passages give better corpus statistics (on the quickstart, 3,849 passages instead of 1,024 "
        "start the sparse head at 0.368 instead of 0.349 and end it at 0.39-0.40, docs/experiments/2026-12-02-every-head-learns.md §Every head learns)"))


@dataclass
class DataConfig:
    """The training data (`m3c convert` output) and how it is batched (docs/recipe.md §Length
    buckets to §shuffle_text)."""
    train_data: str = setting(MISSING, "a `m3c convert` output: local dir or `s3://…`")
    local_cache: Optional[str] = setting(None, "local cache for remote shards (default `run_dir/data-cache`)")
    train_group_size: int = setting(8, "passages per query: 1 positive + G−1 negatives, re-drawn every epoch")
    query_max_len: int = setting(32, "query truncation (tokens, `<s>`/`</s>` included)")
    passage_max_len: int = setting(128, "passage truncation (tokens, `<s>`/`</s>` included)")
    default_batch_size: int = setting(8, (
        "per-device batch for buckets the table does not cover (FlagEmbedding's `per_device_train_batch_size`)"))
    max_tokens_per_device_batch: Optional[int] = setting(None, "token-budget batch sizes per bucket instead of the table")
    batch_size_table: Optional[dict[str, dict[int, int]]] = setting(None, (
        "`{bucket: {G: batch}}`; null = FlagEmbedding's tables for G=1 and G=8 (80 GB GPUs)"))
    small_threshold: int = setting(0, "streams with fewer rows are merged per task (0 = off, FlagEmbedding's default)")
    drop_threshold: int = setting(0, "a merged group with fewer rows is dropped (logged)")
    tail: str = setting("keep_if_ge_2W", (
        "a group's short last batch: kept if ≥ 2·W rows (`keep_if_ge_2W`, FlagEmbedding), or `drop_partial`; "
        "what is left out is logged"), choices=TAIL_RULES)
    query_instruction_for_retrieval: Optional[str] = setting(AUTO, (
        "prefix for queries; `auto` = the model folder's (e5: `query: `), null = none"))
    passage_instruction_for_retrieval: Optional[str] = setting(AUTO, (
        "prefix for passages; `auto` = the model folder's (e5: `passage: `), null = none"))
    shuffle_ratio: float = setting(0.0, "probability of FlagEmbedding's `shuffle_text` on a positive (on token chunks)")
    num_workers: int = setting(0, (
        "DataLoader workers (no persistent workers). With remote (`s3://`) data and prefetch use 1 or more: "
        "batch building then leaves the training thread (loader wait 26 → 7 ms per step on the tiny model, "
        "BENCHMARKS.md §Prefetch)"))
    download_retry: int = setting(2, (
        "Streaming's attempts per shard or stream-index download (the first included; 1 s, 2 s, … back-off "
        "between them); each attempt is itself retried by botocore (`trainer.object_store_max_attempts`). "
        "Raise it for a flaky store; a store that stays down then takes longer to report"))
    download_timeout: float = setting(60.0, "Streaming's seconds per download; raise it for large shards on a slow link")
    prefetch_steps: int = setting(4, (
        "each reader (the rank's process, or each DataLoader worker) downloads the shards of its next K steps "
        "in background threads while the current step trains; the batches are the same as with 0 (off). Use "
        "it for remote data or data copied into `local_cache` (data read in place has nothing to download, so "
        "it is off there); costs K steps' shards of cache and a few threads. Rows borrowed for rows without "
        "negatives are not known ahead and are read in the step"))
    prefetch_workers: int = setting(8, (
        "download threads per reader (process or DataLoader worker; 4 did not keep up with a 50 ms store, "
        "BENCHMARKS.md); raise it for a high-latency store (each request waits for the store, not the CPU)"))
    cache_limit: Optional[str] = setting(None, (
        "bytes or `\"20gb\"`: the node's shard cache stays under it (Streaming's `cache_limit`, "
        "least-recently-used eviction; shards the epoch plan has finished with go first; an evicted shard "
        "needed again is downloaded again). For data larger than a node's disk. Needs a `local_cache` "
        "(defaulted to `run_dir/data-cache` also for local data); Streaming evicts at this limit less one "
        "largest shard per other download thread of the node, so with `data.num_workers` N on R ranks leave "
        "room for about R·N·(prefetch_workers+1) shards. A limit that cannot hold one step's shards fails at "
        "start with the step named. With the default plan a bounded cache re-downloads most shards every "
        "epoch: use `data.plan=shard_blocks` with it"))
    plan: str = setting("rows", (
        "`rows`: FlagEmbedding's batching (each group's rows permuted, cut into batches, all steps shuffled). "
        "`shard_blocks`: each group's shards shuffled and cut into blocks of `plan_block_shards`, a batch drawn "
        "within a block, each group's steps block after block, groups interleaved at random, so a window of "
        "steps reads about two blocks per group: prefetch and a small cache keep up. Same step count, batch "
        "sizes, tail rule and one task per step; in-batch negatives come from the same block (neighbouring "
        "input lines): see docs/recipe.md §Shard-aware plan"), choices=PLAN_KINDS)
    plan_block_shards: int = setting(16, (
        "shards per block of the `shard_blocks` plan; larger = more random batches, more cache per group"))


@dataclass
class SparsityConfig:
    """A regulariser on the lexical head's weights, to make its vectors sparser (docs/recipe.md
    §Sparsity control). Off by default: the recipe has none."""
    regularizer: str = setting("none", (
        "`none`; `flops` (SPLADE's FLOPS: Σ over the vocabulary of (mean over the batch of a text's weight "
        "for the term)², a smooth stand-in for the expected cost of a sparse dot product; it pushes down the "
        "terms many texts share) or `l1` (mean over texts of the sum of their weights). Computed on the "
        "`(n, V)` vectors of the batch's queries and passages (this rank's), added to the total loss and "
        "logged as `loss/train/sparsity`; needs `sparse` in `loss.heads`"), choices=SPARSITY_REGULARIZERS)
    query_weight: float = setting(0.0, "weight of the queries' regulariser (SPLADE used 3e-4 for FLOPS)")
    passage_weight: float = setting(0.0, "weight of the passages' regulariser (SPLADE used 1e-4 for FLOPS)")
    warmup: str = setting("0ba", (
        "both weights ramp up quadratically from 0 to their values over this Composer time (`100ba`, "
        "`0.1dur`), as SPLADE: weight × min(1, t/warmup)², decided from the checkpointed timestamp "
        "(SparsityWarmup); `0ba` = full weight from the first step"))


@dataclass
class MatryoshkaConfig:
    """Matryoshka (MRL) sizes of the dense and ColBERT vectors (docs/recipe.md §Matryoshka): each listed
    size d adds the head's loss on its vectors cut to their first d dims (re-normalised), weighted, to its
    full-size term; the full size is always trained with weight 1. Empty lists: off."""
    dense_dims: list[int] = setting(doc=(
        "extra sizes of the dense vector, each smaller than the encoder's hidden size (e.g. `[192, 96]` for "
        "e5-small's 384); the full size is always included with weight 1. Empty: off"), factory=list)
    dense_weights: list[float] = setting(doc=(
        "the weight of each `dense_dims` size, same length; empty = 1 for each"), factory=list)
    colbert_dims: list[int] = setting(doc=(
        "extra sizes of the ColBERT token vectors, each smaller than `model.colbert_dim` (the hidden size by "
        "default); the full size is always included with weight 1. With `dense_dims` too, both lists have the "
        "same length: the k-th sizes are scored together in the ensemble and self-distillation. Empty: off"),
        factory=list)
    colbert_weights: list[float] = setting(doc=(
        "the weight of each `colbert_dims` size, same length; empty = 1 for each"), factory=list)


@dataclass
class LossConfig:
    """The training loss (docs/recipe.md §Contrastive loss to §False-negative masking)."""
    temperature: float = setting(0.02, "τ of every score")
    heads: list[str] = setting(doc=(
        "the heads trained, any non-empty subset in any order (default all three: the recipe). The contrastive "
        "terms, the ensemble term and self-distillation run over these heads only: the ensemble is the weighted "
        "sum of the chosen heads' scores (it and self-distillation need two or more), the total is the weighted "
        "sum of the terms divided by their number (recipe.md §Choosing the heads). A head not chosen is frozen "
        "(no gradient, no optimizer state, not seen by DDP) and saved as it was; `m3c eval` skips it when it is "
        "a fresh head (the folder had none). It replaces `loss.unified_finetuning` (FlagEmbedding's option), which "
        "is no longer accepted: a config that sets it stops with an error; `false` there is `[dense]` here"),
        factory=lambda: list(HEADS), choices=HEADS)
    use_self_distill: bool = setting(False, "self-knowledge distillation from the ensemble (needs two or more `loss.heads`)")
    self_distill_start_step: str = setting("0ba", (
        "when it switches on: a Composer time (`6000ba`, `1ep`); a bare number = optimizer batches; decided "
        "from the checkpointed timestamp, so resume is exact"))
    self_distill_mode: str = setting("timestamp", (
        "`timestamp` (on iff step ≥ start) or `forward_calls` (FlagEmbedding's strict `>` count; `-1` = always)"),
        choices=SELF_DISTILL_MODES)
    negatives_cross_device: bool = setting(False, "dense negatives gathered from all ranks")
    negatives_cross_device_heads: str = setting("dense", (
        "with `negatives_cross_device`: `dense` (the recipe: only the dense term sees the other ranks' "
        "passages) or `all` (every head's vectors are gathered, so the sparse, ColBERT, ensemble, KD and "
        "self-distillation terms are computed on the whole global batch, as in one process). Costs a gather "
        "of the `(n, V)` lexical weights and the `(n, L, D)` ColBERT vectors per step, and every rank scores "
        "the global batch (docs/recipe.md §Cross-rank negatives)"), choices=CROSS_DEVICE_HEADS)
    cross_rank_grad_scale: str = setting("parity", (
        "`parity`: FlagEmbedding's gradient (dense term 1/W after DDP averaging); `full_batch`: the "
        "one-process full-batch gradient"), choices=CROSS_RANK_GRAD_SCALES)
    knowledge_distillation: bool = setting(False, "`m3_kd_loss` on streams with `pos_scores`/`neg_scores`")
    bidirectional_parallel: bool = setting(True, "add the passage→query direction on `parallel_` streams")
    mask_false_negatives: bool = setting(True, (
        "a passage identical (same token ids) to one of a query's positives is masked out of that query's "
        "softmax in every head, ensemble, self-distillation and KD, across ranks; the count per step is "
        "logged as `loss/train/masked_negatives`; no effect on batches without duplicates (docs/recipe.md "
        "§False-negative masking)"))
    sparsity: SparsityConfig = section(SparsityConfig)
    matryoshka: MatryoshkaConfig = section(MatryoshkaConfig)


@dataclass
class OptimizerConfig:
    """AdamW, the learning-rate schedule and clipping (docs/recipe.md §Optimizer and schedule)."""
    lr: float = setting(1e-5, "AdamW learning rate")
    weight_decay: float = setting(0.0, (
        "AdamW weight decay (not on biases and LayerNorm weights); FlagEmbedding's (Hugging Face's) default, "
        "the recipes use 0.01"))
    betas: list[float] = setting(doc="AdamW betas", factory=lambda: [0.9, 0.999])
    eps: float = setting(1e-8, "AdamW epsilon")
    warmup_ratio: float = setting(0.0, "linear warm-up over this fraction of the run, then linear decay to 0")
    warmup_steps: Optional[int] = setting(None, "warm-up in optimizer steps (wins over the ratio when set)")
    max_grad_norm: Optional[float] = setting(1.0, "gradient clipping by norm; null = off")
    new_head_lr_multiplier: float = setting(10.0, (
        "learning rate of heads the model folder did not have, as a multiple of `optimizer.lr` (fresh heads "
        "start far from where they need to be; a trained BGE-M3 folder's heads keep `lr`; the `idf`-fitted "
        "sparse head trains at it too: 1× was measured no better, docs/recipe.md §A fresh sparse head)"))


@dataclass
class TrainerConfig:
    """Composer's Trainer: duration, precision, devices, checkpoints, console."""
    max_duration: str = setting("1ep", "Composer time: `2ep`, `500ba`")
    precision: str = setting("auto", (
        "`auto`: `amp_bf16` on GPU (scores and losses stay fp32), `fp32` on CPU"), choices=PRECISIONS)
    device: str = setting("auto", "`auto`: a GPU when there is one", choices=DEVICES)
    save_folder: Optional[str] = setting(None, "checkpoints: local path or `s3://…` (`{run_name}` is expanded by Composer)")
    save_interval: str = setting("1ep", "checkpoint cadence")
    save_num_checkpoints_to_keep: int = setting(1, "checkpoint retention (-1: all)")
    autoresume: bool = setting(False, (
        "restart the same command after a crash/kill: continues from the last checkpoint (same data "
        "position, self-distill state and LR); needs `trainer.save_folder`"))
    load_path: Optional[str] = setting(None, "start from a checkpoint")
    trust_checkpoint: bool = setting(False, (
        "load checkpoints with full pickle. Off, a checkpoint is loaded with torch's restricted unpickler "
        "and only the types an m3composer checkpoint holds (m3composer/checkpoints.py); anything else is "
        "refused with one line naming the file and the type. On, a crafted checkpoint runs any code it "
        "holds: only for a file you made yourself with another tool (README §Security)"))
    preemption_checkpoint: bool = setting(True, (
        "SIGTERM/SIGUSR1 on any rank: every rank saves a checkpoint at the next step boundary and exits 0 "
        "(needs `trainer.save_folder`; costs one all-reduce of one integer per step). Off: Composer's default, "
        "exit 143 at once"))
    progress_bar: bool = setting(True, "Composer's progress bar")
    log_to_console: bool = setting(False, "Composer's console logger")
    console_log_interval: str = setting("10ba", "Composer's console logger interval")
    device_train_microbatch_size: Optional[int] = setting(None, (
        "null = the largest per-device batch; a smaller value is refused (the contrastive loss needs the "
        "whole device batch in one forward; for a batch larger than memory, use `model.gradient_cache`)"))
    fsdp: bool = setting(False, (
        "FSDP (FULL_SHARD) through Composer's parallelism config instead of DDP; not with "
        "`model.gradient_cache` (the re-encode from inside backward is not proven exact under FSDP's "
        "sharding hooks, so it is refused)"))
    train_subset_num_batches: Optional[int] = setting(None, (
        "end every epoch after N steps of its plan (Composer's option): shorter epochs for epoch-end work on "
        "large data (`callbacks.negative_refresh` every N steps, DataEpoch, epoch checkpoints); each epoch "
        "draws its own plan, so rows after step N of an epoch are not seen in it. Null: whole epochs"))
    object_store_max_attempts: Optional[int] = setting(None, (
        "botocore's total attempts per S3 request for every client of the run (shard downloads, checkpoint "
        "uploads and autoresume downloads), set as `AWS_MAX_ATTEMPTS`; null = the environment's, else "
        "botocore's 3 (Streaming and Composer choose botocore's `adaptive` mode: exponential back-off with "
        "jitter, client-side slowing on throttling). 5–10 rides out a store failing a third of its requests; "
        "each retry costs a back-off of up to 20 s"))


@dataclass
class NegativeRefreshConfig:
    """Re-mine every training row's hard negatives with the model being trained (`NegativeRefresh`,
    callbacks/negative_refresh.py), at epoch ends, from the training data's own pool (the row's
    stream: task × bucket), served from the next epoch; `{}` turns it on with these defaults. Use it
    on multi-epoch runs whose negatives came from a weaker model (or from nowhere: borrowed); it
    costs one encoding of the whole pool and of every query per refresh (BENCHMARKS.md §Negative
    refresh) and, with `loss.knowledge_distillation`, the teacher scores of every stream from the
    first refresh on (they scored other negatives; docs/recipe.md §Negative refresh). Versions go to
    `run_dir/negatives/v{N}` (npy + JSON), the checkpoint records the one in use. Not with
    `trainer.fsdp`."""
    interval: str = setting("1ep", (
        "refresh after every N-th epoch (whole epochs only; `trainer.train_subset_num_batches` makes epochs "
        "N steps long); never after the last one"))
    head: str = setting(MINE_HEAD, (
        "the ranking head, as `m3c mine --head`: `dense` (faiss over the pool's vectors, gathered onto every "
        "rank), `sparse`, `colbert` or `ensemble` (exact brute force, the pool sharded over ranks and the top-k "
        "lists merged; 0-13 % slower than dense on the measured pool, where the encoder dominates; the ColBERT "
        "max-sim grows with the square of a stream, BENCHMARKS.md §Negative refresh). With "
        "`loss.heads` leaving a head out, that head stays as loaded: rank with it only when the folder has a "
        "trained one"), choices=SCORE_NAMES)
    range: str = setting("%d-%d" % MINE_RANK_RANGE, (
        "as `m3c mine --range`: the ranks of the row's stream pool to draw from, after its own positives and "
        "its query text"))
    negatives: int = setting(MINE_NEGATIVES, "as `m3c mine --negatives`: negatives drawn per row from `range`")
    max_score_ratio: Optional[float] = setting(None, (
        "as `m3c mine`'s positive-aware filter: drop candidates scoring above ratio × the positive's score"))
    margin: Optional[float] = setting(None, (
        "as `m3c mine`'s positive-aware filter: drop candidates scoring above the positive's score minus the "
        "margin (e5's cosines are compressed: prefer a margin, see BENCHMARKS.md §Mining)"))
    batch_size: int = setting(REFRESH_BATCH_SIZE, "encoding batch of a refresh (memory of one encoder forward, no gradient)")


@dataclass
class CallbacksConfig:
    """Export, evaluation, logs and negative refresh during training."""
    export_dir: Optional[str] = setting(None, (
        "the FlagEmbedding-compatible export, written atomically at the end; null = `run_dir/export`"))
    export_interval: Optional[str] = setting(None, "also export every N (`2000ba`) to `export_dir/step-N`")
    speed_window: int = setting(10, "SpeedMonitor window (batches) for samples/s and tokens/s")
    eval_data: Optional[str] = setting(None, "BEIR folder or query/pos JSONL: retrieval evaluation during training")
    eval_interval: Optional[str] = setting(None, "e.g. `50ba`; null = at the end of training only")
    eval_max_queries: Optional[int] = setting(None, "evaluate the first N queries only (null: all)")
    eval_batch_size: int = setting(INFERENCE_BATCH_SIZE, "evaluation encoding batch")
    eval_passage_max_len: int = setting(INFERENCE_PASSAGE_MAX_LEN, "evaluation passage truncation")
    loss_log: Optional[str] = setting(None, (
        "a JSONL file of per-step losses, learning rate and the self-distill switch (rank 0); e.g. "
        "`${run_dir}/losses.jsonl`"))
    negative_refresh: Optional[NegativeRefreshConfig] = setting(None, "null: off; `{}` = on with the defaults")


@dataclass
class TrainConfig:
    """A training run: its name and folder, the seed, and one section per stage of the pipeline."""
    run_name: str = setting(MISSING, "the run's name (checkpoint names, autoresume)")
    run_dir: str = setting("runs/${run_name}", "where the config, plots, export and data cache go")
    seed: int = setting(42, "seeds the plan, the negative draws, the model's RNG")
    model: ModelConfig = section(ModelConfig)
    data: DataConfig = section(DataConfig)
    loss: LossConfig = section(LossConfig)
    optimizer: OptimizerConfig = section(OptimizerConfig)
    trainer: TrainerConfig = section(TrainerConfig)
    callbacks: CallbacksConfig = section(CallbacksConfig)
    loggers: dict[str, Any] = setting(doc=(
        "experiment loggers by name, each with its Composer logger's arguments (e.g. `{mlflow: "
        "{experiment_name: m3}}`, `{wandb: {project: m3}}`): `mlflow`, `tensorboard`, `wandb`, `file` "
        "(docs/operations.md §Experiment tracking). Each sees every metric Composer logs (MLflow writes "
        "asynchronously); `mlflow`/`tensorboard` need their extras (`pip install 'm3composer[mlflow]'`, "
        "`'m3composer[tensorboard]'`), checked at start-up"), factory=dict)


class ConfigError(ValueError):
    """A configuration value is out of range or inconsistent; the message names the key."""


# Keys that were replaced: a YAML or override still setting one fails with what to write instead.
REPLACED_KEYS = {
    "loss.unified_finetuning": (
        "was replaced by loss.heads (recipe.md §Choosing the heads): unified_finetuning=false is "
        "loss.heads=[dense], true is the default loss.heads=[dense,sparse,colbert]; remove the key"),
}


def _check_replaced_keys(layer, where: str) -> None:
    for key, message in REPLACED_KEYS.items():
        if OmegaConf.select(layer, key, default=None, throw_on_missing=False) is not None:
            raise ConfigError(f"{key} ({where}) {message}")


def load_config(yaml_path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Merge `yaml_path` and `key=value` overrides onto the schema; validate; return the dataclass."""
    schema = OmegaConf.structured(TrainConfig)
    layers = [schema]
    if yaml_path is not None:
        layers.append(OmegaConf.load(yaml_path))
        _check_replaced_keys(layers[-1], str(yaml_path))
    if overrides:
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ConfigError(f"overrides must look like key=value, got {bad}")
        layers.append(OmegaConf.from_dotlist(list(overrides)))
        _check_replaced_keys(layers[-1], "override")
    merged = OmegaConf.merge(*layers)
    # Keys that are only missing through an interpolation (run_dir -> run_name) are not listed twice.
    missing = sorted(k for k in OmegaConf.missing_keys(merged) if not _is_interpolation(merged, k))
    if missing:
        raise ConfigError(f"missing required value(s): {', '.join(missing)}")
    OmegaConf.resolve(merged)
    cfg: TrainConfig = OmegaConf.to_object(merged)
    validate(cfg)
    return cfg


def _is_interpolation(cfg, dotted_key: str) -> bool:
    parent, _, leaf = dotted_key.rpartition(".")
    node = OmegaConf.select(cfg, parent) if parent else cfg
    return OmegaConf.is_interpolation(node, leaf)


def to_dict(cfg: TrainConfig) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)


def default_settings() -> dict:
    """The schema's defaults as a nested dict (interpolations unresolved, required values `???`)."""
    return OmegaConf.to_container(OmegaConf.structured(TrainConfig), resolve=False)


def _choices(*names: str) -> str:
    """`a, b or c`: the allowed values in an error message."""
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def _check_choices(section: Any, prefix: str = "") -> None:
    """Every field declared with `choices` holds one of them (sections that are off are skipped)."""
    for f in fields(section):
        value = getattr(section, f.name)
        if is_dataclass(value):
            _check_choices(value, f"{prefix}{f.name}.")
        elif f.metadata.get("choices"):
            choices = f.metadata["choices"]
            if isinstance(value, list):
                bad = [v for v in value if v not in choices]
                _check(not bad, prefix + f.name, f"each must be {_choices(*choices)}, got {bad}")
            else:
                _check(value in choices, prefix + f.name, f"must be {_choices(*choices)}, got {value!r}")


def validate(cfg: TrainConfig) -> None:
    """Ranges and cross-field rules; each failure names the key."""
    m, d, l, o, t = cfg.model, cfg.data, cfg.loss, cfg.optimizer, cfg.trainer
    _check_choices(cfg)
    _check(m.colbert_dim == -1 or m.colbert_dim > 0, "model.colbert_dim", "must be -1 (hidden size) or positive")
    _check(m.sparse_init_passages >= 1, "model.sparse_init_passages", "must be >= 1")
    _check(m.sparse_threshold >= 0 and math.isfinite(m.sparse_threshold), "model.sparse_threshold",
           f"must be a number >= 0, got {m.sparse_threshold}")
    _validate_gradient_cache(cfg)
    _check(d.train_group_size >= 1, "data.train_group_size", "must be >= 1")
    _check(d.query_max_len >= 3, "data.query_max_len", "must be >= 3 (<s>, a token, </s>)")
    _check(d.passage_max_len >= 3, "data.passage_max_len", "must be >= 3 (<s>, a token, </s>)")
    _check(d.default_batch_size >= 1, "data.default_batch_size", "must be >= 1")
    _check(d.max_tokens_per_device_batch is None or d.max_tokens_per_device_batch > 0,
           "data.max_tokens_per_device_batch", "must be positive or null")
    _check(d.small_threshold >= 0, "data.small_threshold", "must be >= 0")
    _check(d.drop_threshold >= 0, "data.drop_threshold", "must be >= 0")
    _check(0.0 <= d.shuffle_ratio <= 1.0, "data.shuffle_ratio", "must be in [0, 1]")
    _check(d.num_workers >= 0, "data.num_workers", "must be >= 0")
    _check(d.download_retry >= 1, "data.download_retry", "must be >= 1 (attempts, the first included)")
    _check(d.download_timeout > 0, "data.download_timeout", "must be > 0 seconds")
    _check(t.object_store_max_attempts is None or t.object_store_max_attempts >= 1,
           "trainer.object_store_max_attempts", "must be >= 1 or null")
    _check(d.prefetch_steps >= 0, "data.prefetch_steps", "must be >= 0")
    _check(d.prefetch_workers >= 1, "data.prefetch_workers", "must be >= 1")
    _check(d.plan_block_shards >= 1, "data.plan_block_shards", "must be >= 1")
    if d.cache_limit is not None:
        from streaming.base.util import bytes_to_int
        try:
            _check(bytes_to_int(d.cache_limit) > 0, "data.cache_limit", "must be positive")
        except ValueError as err:
            raise ConfigError(f"data.cache_limit: {err}") from err
    _check(l.temperature > 0 and math.isfinite(l.temperature), "loss.temperature", "must be a positive number")
    _check(len(l.heads) >= 1, "loss.heads", f"must name at least one head of {_choices(*HEADS)}")
    _check(len(set(l.heads)) == len(l.heads), "loss.heads", f"names a head twice: {list(l.heads)}")
    _check(not l.use_self_distill or len(l.heads) >= 2, "loss.use_self_distill",
           "needs two or more loss.heads (their ensemble is the self-distillation teacher)")
    try:
        parse_start(l.self_distill_start_step)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"loss.self_distill_start_step: not a Composer time ({e})") from e
    _check(l.negatives_cross_device_heads == "dense" or l.negatives_cross_device,
           "loss.negatives_cross_device_heads", "all needs loss.negatives_cross_device=true")
    _check(not l.negatives_cross_device or l.negatives_cross_device_heads == "all" or "dense" in l.heads,
           "loss.negatives_cross_device", "gathers the dense head's negatives only "
           "(loss.negatives_cross_device_heads=dense), and loss.heads does not train dense: set "
           "loss.negatives_cross_device_heads=all or loss.negatives_cross_device=false")
    _validate_sparsity(cfg)
    _validate_matryoshka(cfg)
    _check(o.lr > 0, "optimizer.lr", "must be positive")
    _check(o.weight_decay >= 0, "optimizer.weight_decay", "must be >= 0")
    _check(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), "optimizer.betas", "must be two numbers in [0, 1)")
    _check(0.0 <= o.warmup_ratio < 1.0, "optimizer.warmup_ratio", "must be in [0, 1)")
    _check(o.warmup_steps is None or o.warmup_steps >= 0, "optimizer.warmup_steps", "must be >= 0")
    _check(o.max_grad_norm is None or o.max_grad_norm > 0, "optimizer.max_grad_norm", "must be positive or null")
    _check(o.new_head_lr_multiplier > 0, "optimizer.new_head_lr_multiplier", "must be positive")
    _check(t.device_train_microbatch_size is None or t.device_train_microbatch_size >= 1,
           "trainer.device_train_microbatch_size", "must be >= 1 or null (never 'auto': it splits the contrastive batch)")
    _check(not t.autoresume or t.save_folder is not None, "trainer.autoresume", "needs trainer.save_folder")
    _check(t.save_num_checkpoints_to_keep >= -1, "trainer.save_num_checkpoints_to_keep", "must be >= -1")
    _check(t.train_subset_num_batches is None or t.train_subset_num_batches >= 1,
           "trainer.train_subset_num_batches", "must be >= 1 or null (whole epochs)")
    for key in ("max_duration", "save_interval", "console_log_interval"):
        _check_time(getattr(t, key), f"trainer.{key}")
    for key in ("export_interval", "eval_interval"):
        if getattr(cfg.callbacks, key):
            _check_time(getattr(cfg.callbacks, key), f"callbacks.{key}")
    _check(cfg.callbacks.eval_batch_size >= 1, "callbacks.eval_batch_size", "must be >= 1")
    if cfg.callbacks.negative_refresh is not None:
        _validate_negative_refresh(cfg)
    unknown_loggers = set(cfg.loggers) - set(LOGGERS)
    _check(not unknown_loggers, "loggers", f"unknown logger(s) {sorted(unknown_loggers)}; use {_choices(*LOGGERS)}")
    for name in cfg.loggers:
        missing = logger_package_missing(name)
        _check(missing is None, f"loggers.{name}", missing or "")


def logger_package_missing(name: str) -> Optional[str]:
    """None when logger `name`'s optional package is importable, else what to install."""
    if name not in LOGGER_PACKAGES:
        return None
    module, install = LOGGER_PACKAGES[name]
    if importlib.util.find_spec(module) is not None:
        return None
    return f"needs the {module} package, which is not installed: {install}"


def _validate_gradient_cache(cfg: TrainConfig) -> None:
    cache, d = cfg.model.gradient_cache, cfg.data
    _check(cache.max_sequences >= 1, "model.gradient_cache.max_sequences", "must be >= 1")
    _check(cache.max_tokens is None or cache.max_tokens >= 1, "model.gradient_cache.max_tokens", "must be >= 1 or null")
    if cache.enabled:
        longest = max(d.query_max_len, d.passage_max_len)
        _check(cache.max_tokens is None or cache.max_tokens >= longest, "model.gradient_cache.max_tokens",
               f"{cache.max_tokens} is smaller than one sequence (up to {longest} tokens: "
               "data.query_max_len / data.passage_max_len); raise it or set null")
        # FSDP frees and re-gathers shards around each forward; the replay runs the encoder again from
        # inside backward, which FSDP's hooks do not expect, so exactness is not guaranteed.
        _check(not cfg.trainer.fsdp, "model.gradient_cache.enabled",
               "is not supported with trainer.fsdp=true (use DDP)")


def _validate_sparsity(cfg: TrainConfig) -> None:
    s, key = cfg.loss.sparsity, "loss.sparsity"
    for name in ("query_weight", "passage_weight"):
        value = getattr(s, name)
        _check(value >= 0 and math.isfinite(value), f"{key}.{name}", f"must be a number >= 0, got {value}")
    _check_time(s.warmup, f"{key}.warmup")
    if s.regularizer != "none":
        _check("sparse" in cfg.loss.heads, f"{key}.regularizer",
               f"{s.regularizer} regularises the lexical weights: it needs sparse in loss.heads "
               f"(got {list(cfg.loss.heads)})")
        _check(s.query_weight > 0 or s.passage_weight > 0, f"{key}.regularizer",
               f"{s.regularizer} needs loss.sparsity.query_weight or passage_weight > 0")


def _validate_matryoshka(cfg: TrainConfig) -> None:
    """Each size positive and listed once, each weight positive, one weight per size; a head's sizes
    only when it is trained. (Each size below the head's vector size is checked when the model is
    built: `ComposerM3` knows the hidden size and `model.colbert_dim`.)"""
    mrl = cfg.loss.matryoshka
    for head in ("dense", "colbert"):
        dims, weights = getattr(mrl, f"{head}_dims"), getattr(mrl, f"{head}_weights")
        key = f"loss.matryoshka.{head}_dims"
        _check(all(d > 0 for d in dims), key, f"each size must be positive, got {list(dims)}")
        _check(len(set(dims)) == len(dims), key, f"lists a size twice: {list(dims)}")
        _check(not dims or head in cfg.loss.heads, key, f"{head} is not in loss.heads {list(cfg.loss.heads)}")
        _check(not weights or len(weights) == len(dims), f"loss.matryoshka.{head}_weights",
               f"needs one weight per size of {key} ({len(dims)}), got {len(weights)}")
        _check(all(w > 0 and math.isfinite(w) for w in weights), f"loss.matryoshka.{head}_weights",
               f"each weight must be a positive number, got {list(weights)}")
    _check(not (mrl.dense_dims and mrl.colbert_dims) or len(mrl.dense_dims) == len(mrl.colbert_dims),
           "loss.matryoshka.colbert_dims", f"needs as many sizes as loss.matryoshka.dense_dims "
           f"({len(mrl.dense_dims)}, the k-th of each are scored together), got {len(mrl.colbert_dims)}")


def _validate_negative_refresh(cfg: TrainConfig) -> None:
    r, key = cfg.callbacks.negative_refresh, "callbacks.negative_refresh"
    _check_time(r.interval, f"{key}.interval")
    _check(refresh_interval_epochs(r.interval) >= 1, f"{key}.interval",
           f"must be a whole number of epochs like 1ep (refreshes happen at epoch ends), got {r.interval!r}")
    try:
        parse_rank_range(r.range)
    except ValueError as e:
        raise ConfigError(f"{key}.range: {e}") from e
    _check(r.negatives >= 1, f"{key}.negatives", "must be >= 1")
    _check(r.max_score_ratio is None or r.max_score_ratio > 0, f"{key}.max_score_ratio", "must be positive or null")
    _check(r.batch_size >= 1, f"{key}.batch_size", "must be >= 1")
    # FSDP shards the weights: encoding outside its forward would see the shards.
    _check(not cfg.trainer.fsdp, key, "is not supported with trainer.fsdp=true (use DDP)")


def refresh_interval_epochs(interval: str) -> int:
    """`"2ep"` -> 2; 0 for a time that is not whole epochs."""
    from composer.core import Time, TimeUnit
    t = Time.from_timestring(interval)
    return int(t.value) if t.unit == TimeUnit.EPOCH else 0


def _check_time(value: str, key: str) -> None:
    from composer.core import Time
    try:
        Time.from_timestring(value)
    except ValueError as e:
        raise ConfigError(f"{key}: {value!r} is not a Composer time string like '2ep' or '100ba' ({e})") from e

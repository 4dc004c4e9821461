"""One typed schema for a training run: YAML + `key=value` overrides -> a validated `TrainConfig`.

`load_config(yaml_path, overrides)` merges the YAML and the command-line overrides onto the
dataclass schema with omegaconf, so a misspelled or unknown key fails at start-up naming the key
(`Key 'max_durration' not in 'TrainerConfig'. Did you mean: 'max_duration'?`), a value of the
wrong type fails naming the key, and a missing required value fails naming it. `validate()` then
checks ranges and cross-field rules, each error naming its key.

Every option of FlagEmbedding's `run.py`/data arguments has a field here with the same name and
meaning (see the table in README.md). The sections mirror the pipeline: model, data, loss,
optimizer, trainer, callbacks, loggers.
"""
from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import MISSING, OmegaConf

from m3composer.algorithms.self_distill_warmup import SELF_DISTILL_MODES, parse_start
from m3composer.data.negatives import parse_rank_range
from m3composer.model.scores import SCORE_NAMES as REFRESH_HEADS   # NegativeRefresh ranks with any score
from m3composer.data.plan import PLAN_KINDS, TAIL_RULES
from m3composer.distributed import CROSS_DEVICE_HEADS, CROSS_RANK_GRAD_SCALES
from m3composer.model.heads import POOLING_METHODS, SPARSE_INITS

AUTO = "auto"  # instruction prefixes / pooling: take what the model folder records
# `loggers:` keys -> Composer logger class (their packages are optional)
LOGGERS = {"mlflow": "MLFlowLogger", "wandb": "WandBLogger", "tensorboard": "TensorboardLogger", "file": "FileLogger"}
# `loggers:` keys -> (module the logger imports, how to install it); checked at start-up so that a
# missing package is one line naming the install, not Composer's ImportError from inside the Trainer.
LOGGER_PACKAGES = {"mlflow": ("mlflow", "pip install 'm3composer[mlflow]'"),
                   "tensorboard": ("tensorboard", "pip install 'm3composer[tensorboard]'"),
                   "wandb": ("wandb", "pip install wandb")}
PRECISIONS = ("auto", "fp32", "amp_bf16", "amp_fp16")


@dataclass
class GradientCacheConfig:
    # Encode the device batch in chunks and back-propagate the full-batch loss chunk by chunk.
    enabled: bool = False
    max_sequences: int = 16             # rows (queries and passages) per chunk
    max_tokens: Optional[int] = 32768   # rows x padded length per chunk; null: rows only


@dataclass
class ModelConfig:
    # A model folder, or `asset:e5-small` / `asset:tiny-xlmr` for the offline assets (built on demand).
    name_or_path: str = MISSING
    pooling: str = AUTO                 # auto (from the folder's m3composer.json) | cls | mean
    colbert_dim: int = -1               # -1: the encoder's hidden size (the recipe)
    gradient_checkpointing: bool = False
    gradient_cache: GradientCacheConfig = field(default_factory=GradientCacheConfig)
    fix_position_embedding: bool = False
    attn_implementation: Optional[str] = "sdpa"   # null: the encoder's default
    trust_remote_code: bool = False
    # Heads a folder does not have (any encoder that is not a trained BGE-M3) start as: the sparse
    # head fitted to idf-weighted overlap on a sample of the training data (idf), as plain lexical
    # overlap (weight 0, bias √τ) or PyTorch's default (recipe.md §A fresh sparse head).
    new_sparse_head_init: str = "idf"
    sparse_init_passages: int = 4096    # idf: training passages sampled for the fit (one no-grad encode)


@dataclass
class DataConfig:
    train_data: str = MISSING           # a converted dir (`m3c convert` output): local path or s3://...
    local_cache: Optional[str] = None   # where remote shards are cached; default <run_dir>/data-cache
    train_group_size: int = 8           # 1 positive + G-1 negatives per query
    query_max_len: int = 32
    passage_max_len: int = 128
    default_batch_size: int = 8         # per device, outside the table (FlagEmbedding's per_device_train_batch_size)
    max_tokens_per_device_batch: Optional[int] = None   # token-budget batch sizes instead of the table
    batch_size_table: Optional[dict[str, dict[int, int]]] = None  # null: FlagEmbedding's tables for G=1 and G=8
    small_threshold: int = 0            # streams with fewer rows are merged (0 = off, FlagEmbedding's default)
    drop_threshold: int = 0             # a merged group with fewer rows is dropped
    tail: str = "keep_if_ge_2W"         # keep_if_ge_2W (FlagEmbedding) | drop_partial
    query_instruction_for_retrieval: Optional[str] = AUTO    # auto: from the model folder; null: none
    passage_instruction_for_retrieval: Optional[str] = AUTO
    shuffle_ratio: float = 0.0
    num_workers: int = 0
    download_retry: int = 2             # Streaming: attempts per shard/index download (each retried by botocore too)
    download_timeout: float = 60.0      # Streaming: seconds one download may take
    prefetch_steps: int = 4             # each reader downloads the shards of its next K steps (0 = off)
    prefetch_workers: int = 8           # download threads per reader (process or DataLoader worker)
    cache_limit: Optional[str] = None   # bytes or "20gb": the node's shard cache stays under it (LRU eviction)
    plan: str = "rows"                  # rows (FlagEmbedding's) | shard_blocks: batches drawn within blocks of shards
    plan_block_shards: int = 16         # shards per block of the shard_blocks plan


@dataclass
class LossConfig:
    temperature: float = 0.02
    unified_finetuning: bool = True
    use_self_distill: bool = False
    self_distill_start_step: str = "0ba"   # Composer time; a bare number = optimizer batches
    self_distill_mode: str = "timestamp"   # timestamp | forward_calls (FlagEmbedding's strict '>' counting)
    negatives_cross_device: bool = False
    negatives_cross_device_heads: str = "dense"  # dense (the recipe) | all (sparse, ColBERT, ensemble, self-distill too)
    cross_rank_grad_scale: str = "parity"  # parity (FlagEmbedding: dense term 1/W after DDP) | full_batch
    knowledge_distillation: bool = False   # use pos_scores/neg_scores (m3_kd_loss) when a stream has them
    bidirectional_parallel: bool = True    # passage->query term for parallel_ streams
    mask_false_negatives: bool = True      # in-batch passages identical to a query's positive leave its softmax


@dataclass
class OptimizerConfig:
    lr: float = 1e-5
    weight_decay: float = 0.0           # FlagEmbedding's (HF) default; the recipes use 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    warmup_ratio: float = 0.0
    warmup_steps: Optional[int] = None     # overrides warmup_ratio when set
    max_grad_norm: Optional[float] = 1.0   # null: no clipping
    new_head_lr_multiplier: float = 10.0   # lr of heads the model folder did not have = lr × this (README §Quickstart)


@dataclass
class TrainerConfig:
    max_duration: str = "1ep"
    precision: str = "auto"             # auto: amp_bf16 on GPU, fp32 on CPU | fp32 | amp_bf16 | amp_fp16
    device: str = "auto"                # auto | cpu | gpu
    save_folder: Optional[str] = None   # local path or s3://...; {run_name} is expanded by Composer
    save_interval: str = "1ep"
    save_num_checkpoints_to_keep: int = 1
    autoresume: bool = False
    load_path: Optional[str] = None
    # Load checkpoints with full pickle: a crafted checkpoint then runs any code it holds. Off: only
    # the types an m3composer checkpoint holds are loaded (m3composer/checkpoints.py)
    trust_checkpoint: bool = False
    preemption_checkpoint: bool = True  # SIGTERM/SIGUSR1 on any rank: checkpoint at the next step, exit 0 (needs save_folder)
    progress_bar: bool = True
    log_to_console: bool = False
    console_log_interval: str = "10ba"
    device_train_microbatch_size: Optional[int] = None   # null: the largest per-device batch (required)
    fsdp: bool = False                  # Composer FSDP (FULL_SHARD) instead of DDP
    train_subset_num_batches: Optional[int] = None   # end every epoch after N steps of its plan (Composer's); null: whole epochs
    object_store_max_attempts: Optional[int] = None   # botocore total attempts per S3 request (AWS_MAX_ATTEMPTS); null: botocore's (3)


@dataclass
class NegativeRefreshConfig:
    # Re-mine every row's negatives with the model in training (callbacks/negative_refresh.py).
    interval: str = "1ep"               # after every N-th epoch (epochs only)
    head: str = "dense"
    range: str = "10-100"               # ranks to draw from, after the row's positives (m3c mine --range)
    negatives: int = 7
    max_score_ratio: Optional[float] = None   # drop candidates above ratio x the positive's score
    margin: Optional[float] = None            # drop candidates above the positive's score - margin
    batch_size: int = 64                # encoding batch


@dataclass
class CallbacksConfig:
    export_dir: Optional[str] = None    # default <run_dir>/export
    export_interval: Optional[str] = None
    speed_window: int = 10              # SpeedMonitor window (batches) for samples/s and tokens/s
    eval_data: Optional[str] = None     # BEIR folder or query/pos JSONL: retrieval eval during training
    eval_interval: Optional[str] = None # e.g. 50ba; null: at the end of training only
    eval_max_queries: Optional[int] = None
    eval_batch_size: int = 32
    eval_passage_max_len: int = 512
    loss_log: Optional[str] = None      # JSONL of per-step losses, lr, self_distill_on (rank 0); e.g. ${run_dir}/losses.jsonl
    negative_refresh: Optional[NegativeRefreshConfig] = None   # null: off; {} = on with the defaults


@dataclass
class TrainConfig:
    run_name: str = MISSING
    run_dir: str = "runs/${run_name}"
    seed: int = 42
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    callbacks: CallbacksConfig = field(default_factory=CallbacksConfig)
    loggers: dict[str, Any] = field(default_factory=dict)   # e.g. {mlflow: {experiment_name: m3}}, {wandb: {project: m3}}


class ConfigError(ValueError):
    """A configuration value is out of range or inconsistent; the message names the key."""


def load_config(yaml_path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Merge `yaml_path` and `key=value` overrides onto the schema; validate; return the dataclass."""
    schema = OmegaConf.structured(TrainConfig)
    layers = [schema]
    if yaml_path is not None:
        layers.append(OmegaConf.load(yaml_path))
    if overrides:
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ConfigError(f"overrides must look like key=value, got {bad}")
        layers.append(OmegaConf.from_dotlist(list(overrides)))
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


def _choices(*names: str) -> str:
    """`a, b or c`: the allowed values in an error message."""
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def validate(cfg: TrainConfig) -> None:
    """Ranges and cross-field rules; each failure names the key."""
    m, d, l, o, t = cfg.model, cfg.data, cfg.loss, cfg.optimizer, cfg.trainer
    _check(m.pooling in (AUTO, *POOLING_METHODS), "model.pooling", f"must be {_choices(AUTO, *POOLING_METHODS)}, got {m.pooling!r}")
    _check(m.colbert_dim == -1 or m.colbert_dim > 0, "model.colbert_dim", "must be -1 (hidden size) or positive")
    _check(m.sparse_init_passages >= 1, "model.sparse_init_passages", "must be >= 1")
    _check(m.new_sparse_head_init in SPARSE_INITS, "model.new_sparse_head_init",
           f"must be {_choices(*SPARSE_INITS)}, got {m.new_sparse_head_init!r}")
    _validate_gradient_cache(cfg)
    _check(d.train_group_size >= 1, "data.train_group_size", "must be >= 1")
    _check(d.query_max_len >= 3, "data.query_max_len", "must be >= 3 (<s>, a token, </s>)")
    _check(d.passage_max_len >= 3, "data.passage_max_len", "must be >= 3 (<s>, a token, </s>)")
    _check(d.default_batch_size >= 1, "data.default_batch_size", "must be >= 1")
    _check(d.max_tokens_per_device_batch is None or d.max_tokens_per_device_batch > 0,
           "data.max_tokens_per_device_batch", "must be positive or null")
    _check(d.small_threshold >= 0, "data.small_threshold", "must be >= 0")
    _check(d.drop_threshold >= 0, "data.drop_threshold", "must be >= 0")
    _check(d.tail in TAIL_RULES, "data.tail", f"must be {_choices(*TAIL_RULES)}, got {d.tail!r}")
    _check(0.0 <= d.shuffle_ratio <= 1.0, "data.shuffle_ratio", "must be in [0, 1]")
    _check(d.num_workers >= 0, "data.num_workers", "must be >= 0")
    _check(d.download_retry >= 1, "data.download_retry", "must be >= 1 (attempts, the first included)")
    _check(d.download_timeout > 0, "data.download_timeout", "must be > 0 seconds")
    _check(t.object_store_max_attempts is None or t.object_store_max_attempts >= 1,
           "trainer.object_store_max_attempts", "must be >= 1 or null")
    _check(d.prefetch_steps >= 0, "data.prefetch_steps", "must be >= 0")
    _check(d.prefetch_workers >= 1, "data.prefetch_workers", "must be >= 1")
    _check(d.plan in PLAN_KINDS, "data.plan", f"must be {_choices(*PLAN_KINDS)}, got {d.plan!r}")
    _check(d.plan_block_shards >= 1, "data.plan_block_shards", "must be >= 1")
    if d.cache_limit is not None:
        from streaming.base.util import bytes_to_int
        try:
            _check(bytes_to_int(d.cache_limit) > 0, "data.cache_limit", "must be positive")
        except ValueError as err:
            raise ConfigError(f"data.cache_limit: {err}") from err
    _check(l.temperature > 0 and math.isfinite(l.temperature), "loss.temperature", "must be a positive number")
    _check(not l.use_self_distill or l.unified_finetuning, "loss.use_self_distill",
           "needs loss.unified_finetuning=true (the ensemble is the self-distillation teacher)")
    _check(l.self_distill_mode in SELF_DISTILL_MODES, "loss.self_distill_mode", f"must be {_choices(*SELF_DISTILL_MODES)}")
    try:
        parse_start(l.self_distill_start_step)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"loss.self_distill_start_step: not a Composer time ({e})") from e
    _check(l.negatives_cross_device_heads in CROSS_DEVICE_HEADS, "loss.negatives_cross_device_heads",
           f"must be {_choices(*CROSS_DEVICE_HEADS)}")
    _check(l.negatives_cross_device_heads == "dense" or (l.negatives_cross_device and l.unified_finetuning),
           "loss.negatives_cross_device_heads", "all needs loss.negatives_cross_device=true and loss.unified_finetuning=true")
    _check(l.cross_rank_grad_scale in CROSS_RANK_GRAD_SCALES, "loss.cross_rank_grad_scale",
           f"must be {_choices(*CROSS_RANK_GRAD_SCALES)}")
    _check(o.lr > 0, "optimizer.lr", "must be positive")
    _check(o.weight_decay >= 0, "optimizer.weight_decay", "must be >= 0")
    _check(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), "optimizer.betas", "must be two numbers in [0, 1)")
    _check(0.0 <= o.warmup_ratio < 1.0, "optimizer.warmup_ratio", "must be in [0, 1)")
    _check(o.warmup_steps is None or o.warmup_steps >= 0, "optimizer.warmup_steps", "must be >= 0")
    _check(o.max_grad_norm is None or o.max_grad_norm > 0, "optimizer.max_grad_norm", "must be positive or null")
    _check(o.new_head_lr_multiplier > 0, "optimizer.new_head_lr_multiplier", "must be positive")
    _check(t.precision in PRECISIONS, "trainer.precision", f"must be {_choices(*PRECISIONS)}")
    _check(t.device in ("auto", "cpu", "gpu"), "trainer.device", "must be auto, cpu or gpu")
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


def _validate_negative_refresh(cfg: TrainConfig) -> None:
    r, key = cfg.callbacks.negative_refresh, "callbacks.negative_refresh"
    _check_time(r.interval, f"{key}.interval")
    _check(refresh_interval_epochs(r.interval) >= 1, f"{key}.interval",
           f"must be a whole number of epochs like 1ep (refreshes happen at epoch ends), got {r.interval!r}")
    _check(r.head in REFRESH_HEADS, f"{key}.head", f"must be {_choices(*REFRESH_HEADS)}, got {r.head!r}")
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

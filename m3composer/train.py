"""Build everything a training run needs from a `TrainConfig` and run `Trainer.fit`.

This is the one place that wires the pipeline together: config -> model, data, optimizer,
algorithms, callbacks, loggers -> Composer `Trainer`. `scripts/train.py` only parses the command
line and calls `main`. Launch with `composer -n N scripts/train.py yamls/<recipe>.yaml key=value`
(N ranks; gloo on CPU, nccl on GPU) or `python scripts/train.py ...` for one process.
"""
from __future__ import annotations

import atexit
import json
import logging
import os
import sys
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Optional

import torch
from composer import Trainer
from composer.algorithms import GradientClipping
from composer.callbacks import LRMonitor, MemoryMonitor, SpeedMonitor
from composer.devices import DeviceCPU, DeviceGPU
from composer.optim import LinearWithWarmupScheduler
from composer.utils import dist, reproducibility
from torch.utils.data import DataLoader

from m3composer import checkpoints, distributed, optim
from m3composer.algorithms import FreezePositionEmbeddings, SelfDistillWarmup, SparsityWarmup
from m3composer.callbacks.data_epoch import DataEpoch
from m3composer.callbacks.export import ExportModel, export_model
from m3composer.callbacks.model_card import training_facts
from m3composer.callbacks.preemption import Preemption, preempted
from m3composer.callbacks.step_seed import StepSeed
from m3composer.config import (AUTO, LOGGER_PACKAGES, LOGGERS, ConfigError, LossConfig, NegativeRefreshConfig,
                               TrainConfig, default_settings, load_config, refresh_interval_epochs, to_dict)
from m3composer.data.collate import make_data_spec
from m3composer.data.dataset import M3TrainDataset
from m3composer.data.index import is_remote
from m3composer.data.negatives import parse_rank_range
from m3composer.model.composer_model import ComposerM3, SparsityRegularizer
from m3composer.model.folder_config import FOLDER_CONFIG_FILE, M3FolderConfig
from m3composer.model.gradcache import GradientCacheBudget
from m3composer.model.heads import init_fresh_sparse_head, needs_sparse_fit
from m3composer.model.m3 import M3Model
from m3composer.model.sparse_fit import fit_sparse_head_to_idf

log = logging.getLogger("m3composer.train")

# `loss` keys that the self-distillation Algorithm reads (build_algorithms); ComposerM3 takes the others
# (`loss.sparsity` as a SparsityRegularizer, its warm-up SparsityWarmup's).
SELF_DISTILL_SCHEDULE = ("self_distill_start_step", "self_distill_mode")


# ---------------------------------------------------------------------------------------- model
def resolve_model_path(name_or_path: str) -> Path:
    """`asset:e5-small` -> the asset folder (built once per node); else the local folder."""
    from m3composer.assets.build import resolve_model_dir
    try:
        return resolve_model_dir(name_or_path, log=log.info)
    except (ValueError, FileNotFoundError) as err:
        raise ConfigError(f"model.name_or_path: {err}") from err


@dataclass(frozen=True)
class ModelDefaults:
    """The `auto` settings resolved against the model folder: what the run really uses."""
    pooling: str
    query_instruction_for_retrieval: Optional[str]
    passage_instruction_for_retrieval: Optional[str]


def model_aware_defaults(cfg: TrainConfig, model_dir: Path) -> ModelDefaults:
    """`auto` pooling and instructions -> what the model folder records (m3composer.json).

    An e5 folder records mean pooling with `query: `/`passage: `; a BGE-M3 folder (no file)
    gets CLS pooling and no instruction. Explicit values in the config win.
    """
    recorded = M3FolderConfig.from_folder(model_dir)
    d = cfg.data

    def pick(value, from_folder):
        return from_folder if value == AUTO else value

    return ModelDefaults(
        pooling=pick(cfg.model.pooling, recorded.pooling),
        query_instruction_for_retrieval=pick(d.query_instruction_for_retrieval, recorded.query_instruction),
        passage_instruction_for_retrieval=pick(d.passage_instruction_for_retrieval, recorded.passage_instruction))


def build_model(cfg: TrainConfig, model_dir: Path, model_defaults: ModelDefaults) -> ComposerM3:
    encoder_kwargs = {}
    if cfg.model.attn_implementation:
        encoder_kwargs["attn_implementation"] = cfg.model.attn_implementation
    if cfg.model.trust_remote_code:
        encoder_kwargs["trust_remote_code"] = True
    m3 = M3Model.from_pretrained(model_dir, pooling=model_defaults.pooling, colbert_dim=cfg.model.colbert_dim,
                                 **encoder_kwargs)
    # The export records what training used, so evaluation defaults to the same prefixes.
    m3.query_instruction = model_defaults.query_instruction_for_retrieval
    m3.passage_instruction = model_defaults.passage_instruction_for_retrieval
    m3.sparse_threshold = cfg.model.sparse_threshold     # applied at eval, recorded in the export
    if fresh_heads_to_train(cfg, m3):
        init_new_heads(cfg, m3)
    m3.train()
    try:
        return ComposerM3(m3, **composer_model_settings(cfg))
    except ValueError as err:
        # a Matryoshka size the model's vectors do not have: known only now (hidden size, colbert_dim)
        if str(err).startswith("loss.matryoshka."):
            raise ConfigError(str(err)) from err
        raise


def composer_model_settings(cfg: TrainConfig) -> dict:
    """ComposerM3's settings: the `loss` section (less the self-distillation schedule, which is
    SelfDistillWarmup's), the group size every batch is checked against, and how the encoder runs."""
    cache = cfg.model.gradient_cache
    return {**loss_settings(cfg.loss), "train_group_size": cfg.data.train_group_size,
            "gradient_checkpointing": cfg.model.gradient_checkpointing,
            "gradient_cache": GradientCacheBudget(cache.max_sequences, cache.max_tokens) if cache.enabled else None}


def loss_settings(loss: LossConfig) -> dict:
    """The `loss` keys ComposerM3 takes, by name."""
    settings = {key: value for key, value in asdict(loss).items() if key not in SELF_DISTILL_SCHEDULE}
    s = loss.sparsity
    settings["sparsity"] = (None if s.regularizer == "none"
                            else SparsityRegularizer(s.regularizer, s.query_weight, s.passage_weight))
    return settings


# ----------------------------------------------------------------------------------------- data
def build_dataset(cfg: TrainConfig, tokenizer, model_defaults: ModelDefaults) -> M3TrainDataset:
    d = cfg.data
    local = d.local_cache
    if local is None and (is_remote(d.train_data) or d.cache_limit is not None):   # eviction needs a cache apart
        local = os.path.join(cfg.run_dir, "data-cache")
    return M3TrainDataset(
        d.train_data, local_cache=local, tokenizer=tokenizer, train_group_size=d.train_group_size,
        default_batch_size=d.default_batch_size, batch_size_table=d.batch_size_table,
        max_tokens_per_device_batch=d.max_tokens_per_device_batch, query_max_len=d.query_max_len,
        passage_max_len=d.passage_max_len, small_threshold=d.small_threshold, drop_threshold=d.drop_threshold,
        tail=d.tail, seed=cfg.seed, query_instruction_for_retrieval=model_defaults.query_instruction_for_retrieval,
        passage_instruction_for_retrieval=model_defaults.passage_instruction_for_retrieval, shuffle_ratio=d.shuffle_ratio,
        download_retry=d.download_retry, download_timeout=d.download_timeout,
        prefetch_steps=d.prefetch_steps, prefetch_workers=d.prefetch_workers, cache_limit=d.cache_limit,
        plan=d.plan, plan_block_shards=d.plan_block_shards,
        negatives_dir=negatives_dir(cfg))


def negatives_dir(cfg: TrainConfig) -> Optional[str]:
    """Where NegativeRefresh writes its versions (None when it is off)."""
    return os.path.join(cfg.run_dir, "negatives") if cfg.callbacks.negative_refresh is not None else None


def apply_object_store_settings(cfg: TrainConfig) -> None:
    """botocore's retry count for every S3 client of this run (shard downloads, checkpoint uploads
    and downloads). Streaming and Composer build their clients themselves, with botocore's
    `adaptive` retry mode but no attempt count, so botocore takes it from AWS_MAX_ATTEMPTS; the
    environment reaches the clients created later in this process and in its workers."""
    attempts = cfg.trainer.object_store_max_attempts
    if attempts is not None:
        os.environ["AWS_MAX_ATTEMPTS"] = str(attempts)


# ------------------------------------------------------------------------------ optimisation
def fresh_heads_to_train(cfg: TrainConfig, m3: M3Model) -> tuple[str, ...]:
    """The fresh heads (never trained: `M3Model.fresh_heads`) that `loss.heads` trains. A fresh head
    left out is not initialised nor fitted: it is saved as it is and evaluation skips it."""
    return tuple(h for h in m3.fresh_heads if h in cfg.loss.heads)


def init_new_heads(cfg: TrainConfig, m3: M3Model) -> None:
    """Initialise the fresh heads this run trains as `model.new_sparse_head_init` says
    (model/heads.py), and record how in `m3.head_init` (saved in the export's m3composer.json);
    an `idf` head is fitted by `fit_new_sparse_head` once the training data is open."""
    heads = fresh_heads_to_train(cfg, m3)
    if "sparse" in heads:
        init_fresh_sparse_head(m3.sparse_linear, cfg.model.new_sparse_head_init,
                               m3.score_temperature(cfg.loss.temperature))
    how = {"sparse": cfg.model.new_sparse_head_init, "colbert": "default"}
    m3.head_init = {**(m3.head_init or {}), **{h: how[h] for h in heads},
                    "new_head_lr_multiplier": cfg.optimizer.new_head_lr_multiplier}


def fit_new_sparse_head(cfg: TrainConfig, m3: M3Model, dataset: M3TrainDataset, on_gpu: bool) -> Optional[dict]:
    """`model.new_sparse_head_init: idf` on a fresh head: fit it to idf-weighted overlap on a sample
    of the training data (model/sparse_fit.py); the fit's facts go into `head_init`. Every rank fits
    the same rows, encoding 1/W of them; on a GPU node on this rank's GPU. None when nothing was fitted."""
    if "sparse" not in fresh_heads_to_train(cfg, m3) or not needs_sparse_fit(cfg.model.new_sparse_head_init):
        return None
    passages, queries = dataset.head_fit_sample(cfg.model.sparse_init_passages)
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    m3.to(device)
    try:
        facts = fit_sparse_head_to_idf(m3, passages, queries, temperature=m3.score_temperature(cfg.loss.temperature),
                                       pad_id=dataset.token_spec.pad_id)
    finally:
        m3.to("cpu")
    m3.head_init = {**m3.head_init, "sparse_fit": facts}
    if dist.get_global_rank() == 0:
        log.info("fresh sparse head fitted to idf on %d passages and %d queries of the training data: "
                 "r2 %.3f, scale %.4f", facts["passages"], facts["queries"], facts["r2"], facts["scale"])
    return facts


def build_optimizer(cfg: TrainConfig, model: torch.nn.Module) -> torch.optim.AdamW:
    """AdamW as the recipe's optimizer policy says (m3composer/optim.py), with the `optimizer` section."""
    o = cfg.optimizer
    return optim.adamw(model, lr=o.lr, weight_decay=o.weight_decay, betas=tuple(o.betas), eps=o.eps,
                       new_head_lr_multiplier=o.new_head_lr_multiplier)


def build_scheduler(cfg: TrainConfig) -> LinearWithWarmupScheduler:
    """Linear warm-up then linear decay to 0 (HF's default schedule, as FlagEmbedding; Composer applies
    it one step behind HF, docs/recipe.md §Learning-rate lag)."""
    o = cfg.optimizer
    t_warmup = f"{o.warmup_steps}ba" if o.warmup_steps is not None else f"{o.warmup_ratio}dur"
    return LinearWithWarmupScheduler(t_warmup=t_warmup, alpha_f=0.0)


# ------------------------------------------------------------------- algorithms and callbacks
def build_algorithms(cfg: TrainConfig) -> list:
    algorithms = []
    if cfg.loss.use_self_distill:
        algorithms.append(SelfDistillWarmup(cfg.loss.self_distill_start_step, mode=cfg.loss.self_distill_mode))
    if cfg.loss.sparsity.regularizer != "none":
        algorithms.append(SparsityWarmup(cfg.loss.sparsity.warmup))
    if cfg.model.fix_position_embedding:
        algorithms.append(FreezePositionEmbeddings())
    if cfg.optimizer.max_grad_norm is not None:
        algorithms.append(GradientClipping(clipping_type="norm", clipping_threshold=cfg.optimizer.max_grad_norm))
    return algorithms


def card_facts(cfg: TrainConfig, dataset: M3TrainDataset) -> dict:
    """What the export's model card says about the run beyond the state (callbacks/model_card.py)."""
    return training_facts(run_name=cfg.run_name, base_model=cfg.model.name_or_path, train_data=cfg.data.train_data,
                          streams=dataset.streams, settings=to_dict(cfg), defaults=default_settings(),
                          eval_data=cfg.callbacks.eval_data)


def build_callbacks(cfg: TrainConfig, on_gpu: bool, model_defaults: ModelDefaults, run_facts: Optional[dict] = None) -> list:
    from m3composer.callbacks.plots import Plots
    c = cfg.callbacks
    # StepSeed: dropout masks as a function of (seed, rank, step), so a mid-epoch resume is exact.
    callbacks = [StepSeed(), DataEpoch(cfg.trainer.train_subset_num_batches), SpeedMonitor(window_size=c.speed_window), LRMonitor(), Plots(cfg.run_dir)]
    if c.negative_refresh is not None:
        from m3composer.callbacks.negative_refresh import NegativeRefresh
        callbacks.append(NegativeRefresh(negatives_dir(cfg), **negative_refresh_settings(c.negative_refresh, cfg.seed)))
    if c.loss_log:
        from m3composer.callbacks.loss_log import LossLog
        callbacks.append(LossLog(c.loss_log))
    if set(cfg.loss.heads) - {"dense"}:      # a head with weights of its own to watch
        from m3composer.callbacks.head_diagnostics import HeadDiagnostics
        callbacks.append(HeadDiagnostics(cfg.optimizer.max_grad_norm))
    if on_gpu:
        callbacks.append(MemoryMonitor())
    if c.eval_data:
        from m3composer.callbacks.retrieval_eval import RetrievalEval
        callbacks.append(RetrievalEval(
            c.eval_data, interval=c.eval_interval, at_fit_end=True, max_queries=c.eval_max_queries,
            query_instruction=model_defaults.query_instruction_for_retrieval or "",
            passage_instruction=model_defaults.passage_instruction_for_retrieval or "",
            batch_size=c.eval_batch_size, query_max_len=cfg.data.query_max_len,
            passage_max_len=c.eval_passage_max_len))
    # Last, so that an export's model card sees the evaluation of its own step (RetrievalEval runs first).
    callbacks.append(ExportModel(c.export_dir or os.path.join(cfg.run_dir, "export"), c.export_interval, run_facts))
    if cfg.trainer.preemption_checkpoint and cfg.trainer.save_folder is not None:
        # After every other callback (ExportModel too), so their BATCH_END still sees the run's own max_duration.
        callbacks.append(Preemption())
    return callbacks


def negative_refresh_settings(refresh: NegativeRefreshConfig, seed: int) -> dict:
    """NegativeRefresh's settings from the `callbacks.negative_refresh` section and the run's seed."""
    return {"interval_epochs": refresh_interval_epochs(refresh.interval), "head": refresh.head,
            "rank_range": parse_rank_range(refresh.range), "negatives": refresh.negatives,
            "max_score_ratio": refresh.max_score_ratio, "margin": refresh.margin, "batch_size": refresh.batch_size,
            "seed": seed}


def build_loggers(cfg: TrainConfig) -> list:
    """Experiment loggers chosen in YAML only (`loggers: {mlflow: {...}}`); their packages are optional
    (`validate` has checked they are installed)."""
    from composer import loggers as composer_loggers
    loggers = []
    for name, kwargs in cfg.loggers.items():
        kwargs = dict(kwargs or {})
        try:
            cls = getattr(composer_loggers, LOGGERS[name])
            if name == "mlflow":
                from m3composer.callbacks.mlflow_logger import M3MLFlowLogger, tracking_store_problem
                problem = tracking_store_problem(kwargs.get("tracking_uri"))
                if problem:
                    raise ConfigError(f"loggers.mlflow.tracking_uri: {problem}")
                cls = M3MLFlowLogger    # metric names MLflow accepts (ndcg@10 -> ndcg_at_10)
            loggers.append(cls(**kwargs))
        except TypeError as err:     # a misspelled argument: name the key, not Composer's __init__
            raise ConfigError(f"loggers.{name}: {err}") from err
        except ImportError as err:   # installed but does not import (e.g. a version clash)
            cause = err.__cause__ or err
            install = LOGGER_PACKAGES.get(name, (name, "pip install -e ."))[1]
            raise ConfigError(f"loggers.{name}: {type(cause).__name__}: {cause} (reinstall: {install})") from err
    return loggers


# -------------------------------------------------------------------------------------- trainer
def set_cpu_threads() -> int:
    """Share the cores among the ranks of this node unless OMP_NUM_THREADS says otherwise.

    torch defaults every process to all cores, so N CPU ranks on one node oversubscribe N-fold
    (BENCHMARKS.md §Measurements behind code comments).
    """
    if "OMP_NUM_THREADS" not in os.environ:
        local_world = max(1, dist.get_local_world_size())
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    return torch.get_num_threads()


def build_trainer(cfg: TrainConfig) -> Trainer:
    on_gpu = cfg.trainer.device == "gpu" or (cfg.trainer.device == "auto" and torch.cuda.is_available())
    device = DeviceGPU() if on_gpu else DeviceCPU()
    if not on_gpu:
        log.info("CPU threads per rank: %d", set_cpu_threads())
    # One process group for the whole run, opened before the dataset (which reads rank/world size).
    dist.initialize_dist(device)
    distributed.shutdown_at_exit()   # a group left open is destroyed before interpreter finalisation
    reproducibility.seed_all(cfg.seed)
    precision = cfg.trainer.precision
    if precision == "auto":
        precision = "amp_bf16" if on_gpu else "fp32"
    if precision != "fp32" and not on_gpu:
        raise ConfigError(f"trainer.precision: {precision} needs a GPU; CPU runs are fp32")

    apply_object_store_settings(cfg)
    model_dir = resolve_model_path(cfg.model.name_or_path)
    model_defaults = model_aware_defaults(cfg, model_dir)
    if dist.get_global_rank() == 0:
        log.info("model %s: pooling=%s query_instruction=%r passage_instruction=%r (auto = from %s)",
                 model_dir, model_defaults.pooling, model_defaults.query_instruction_for_retrieval,
                 model_defaults.passage_instruction_for_retrieval,
                 model_dir / FOLDER_CONFIG_FILE)
    model = build_model(cfg, model_dir, model_defaults)
    dataset = build_dataset(cfg, model.model.tokenizer, model_defaults)
    microbatch = cfg.trainer.device_train_microbatch_size or dataset.max_per_device_batch_size
    if microbatch < dataset.max_per_device_batch_size:
        raise ConfigError(
            f"trainer.device_train_microbatch_size={microbatch} is below the largest per-device batch "
            f"({dataset.max_per_device_batch_size}): the in-batch contrastive loss needs the whole device batch "
            "in one forward (model.gradient_cache.enabled=true trains a batch larger than memory allows)")
    fit_new_sparse_head(cfg, model.model, dataset, on_gpu)       # after every check: it encodes passages
    if dist.get_global_rank() == 0:
        log.info("per-device batch sizes: %s; %d steps per epoch on %d rank(s)", dataset.per_device_batch_sizes,
                 len(dataset), dist.get_world_size())
    dataloader = DataLoader(dataset, batch_size=None, num_workers=cfg.data.num_workers,
                            pin_memory=on_gpu, persistent_workers=False)
    optimizer = build_optimizer(cfg, model)
    t = cfg.trainer
    callbacks = build_callbacks(cfg, on_gpu, model_defaults, card_facts(cfg, dataset))
    preemption = next((c for c in callbacks if isinstance(c, Preemption)), None)
    if t.preemption_checkpoint and preemption is None and dist.get_global_rank() == 0:
        log.warning("trainer.save_folder is not set: SIGTERM/SIGUSR1 stop the run without a checkpoint")
    parallelism = {"fsdp": {"sharding_strategy": "FULL_SHARD", "use_orig_params": True}} if t.fsdp else None
    checkpoints.use_safe_loading(checkpoints.LoadPolicy(
        trust=t.trust_checkpoint, earlier=checkpoints.earlier_checkpoints_note(t.save_folder, t.save_num_checkpoints_to_keep)))
    return Trainer(
        run_name=cfg.run_name, model=model, train_dataloader=make_data_spec(dataloader),
        optimizers=optimizer, schedulers=build_scheduler(cfg), step_schedulers_every_batch=True,
        max_duration=t.max_duration, device=device, precision=precision, seed=cfg.seed,
        device_train_microbatch_size=microbatch, parallelism_config=parallelism,
        algorithms=build_algorithms(cfg), callbacks=callbacks,
        loggers=build_loggers(cfg), progress_bar=t.progress_bar, log_to_console=t.log_to_console,
        console_log_interval=t.console_log_interval, save_folder=t.save_folder,
        save_interval=preemption.save_interval(t.save_interval) if preemption else t.save_interval,
        # Overwrite even under autoresume: a run killed while writing checkpoint N leaves a partial
        # ep*-baN file (and, on S3, maybe an uploaded one) newer than `latest`, and without overwrite
        # the restart refuses to start (FileExistsError at FIT_START) or to re-upload checkpoint N.
        save_num_checkpoints_to_keep=t.save_num_checkpoints_to_keep, save_overwrite=True,
        autoresume=t.autoresume, load_path=t.load_path,
        train_subset_num_batches=t.train_subset_num_batches or -1)


def main(argv: list[str] | None = None) -> Trainer:
    """`scripts/train.py RECIPE.yaml [key=value ...]`: load, validate, build, fit."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip() + "\n\nusage: scripts/train.py RECIPE.yaml [key=value ...]")
        raise SystemExit(0 if argv else 2)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    cfg = load_config(argv[0], argv[1:])
    if dist.get_global_rank() == 0:
        Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
        (Path(cfg.run_dir) / "config.json").write_text(json.dumps(to_dict(cfg), indent=2) + "\n")
    trainer = build_trainer(cfg)
    with closed_at_end(trainer):
        fit(trainer, cfg)
    return trainer


@contextmanager
def closed_at_end(trainer: Trainer) -> Iterator[Trainer]:
    """Close the trainer's callbacks and loggers on every rank, after success or an error (then
    without Trainer.close's barrier: another rank may be gone), then destroy the process group the
    one safe way (docs/recipe.md §Process-group teardown)."""
    ok = False
    try:
        yield trainer
        ok = True
    finally:
        try:
            trainer.close() if ok else trainer.engine.close()
            # Composer's atexit hook of a closed engine holds its state (model, dataset, Streaming's
            # shared memory and file descriptors) until the process exits; a process that trains
            # again and again (a notebook, the test suite) would run out of descriptors
            atexit.unregister(trainer.engine._close)
        finally:
            distributed.shutdown(ok=ok)


def fit(trainer: Trainer, cfg: TrainConfig) -> None:
    """Train to `max_duration`, or only re-export a run that autoresume found complete."""
    if trainer.state.timestamp >= trainer.state.max_duration:
        # Autoresume found the final checkpoint (the run was killed after it, e.g. while uploading):
        # Composer's fit() would raise. Re-export (the kill may have come before the export) and stop.
        log.info("%s is already complete at %s: nothing to train; exporting again", cfg.run_name,
                 trainer.state.max_duration)
        for callback in trainer.state.callbacks:
            if isinstance(callback, ExportModel):
                export_model(trainer.state, callback.export_dir, run_facts=callback.run_facts)
        return
    trainer.fit()
    if preempted(trainer.state):
        log.info("%s stopped by a preemption signal at step %d with a checkpoint in %s: run the same command "
                 "to resume", cfg.run_name, int(trainer.state.timestamp.batch), cfg.trainer.save_folder)

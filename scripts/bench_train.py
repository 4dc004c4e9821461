"""Time a training run through the normal trainer and report where the step time goes.

    python scripts/bench_train.py [--json OUT.json] [--profile DIR] RECIPE.yaml key=value ...
    composer -n 2 scripts/bench_train.py [--json OUT.json] RECIPE.yaml key=value ...

The run is built exactly as `scripts/train.py` builds it (`m3composer.train.load_config` +
`build_trainer`); this script only appends one passive callback (`BenchTimer`) before `fit()`.
It measures, per rank, then combines over ranks on rank 0:

* loop time: Composer's own accumulated batch wall clock (`state.timestamp.total_wct`, the
  figure Composer's SpeedMonitor reports as `wall_clock/train`). It starts after FIT_START and
  covers every step, the first one included, and the dataloader fetches between steps; it
  excludes start-up, model and data loading, and the fit-end export. This is the same span as
  Hugging Face's `train_runtime`, which the FlagEmbedding peer reports.
* samples/s: query groups (1 query + G passages) trained per second, all ranks together
  (global batch × steps / loop time).
* data-loader time: with `data.num_workers=0` the batch is built on the training thread, so the
  wait is the time `M3TrainDataset.batch` takes (read rows, draw groups, pad), timed around that
  method; with workers it is the `next()` on the DataLoader. Both as a share of the mean step
  period (BATCH_END to BATCH_END). Also reported: BEFORE_DATALOADER to AFTER_DATALOADER, which
  adds Composer's own per-step work there (an all_reduce of an "iteration finished" flag, event
  dispatch, counting samples and tokens), and BATCH_END to AFTER_DATALOADER.
* padding fraction: pad tokens / all tokens of the padded query and passage tensors (the collated
  batch, padded to the longest row), and the padding the encoder really runs on after
  length grouping (`M3Model.encode_many`: length-sorted chunks, each padded to its own longest).
* loss per step (`total`, averaged over ranks like Composer's log), the peak RSS of each rank.
* model FLOPs per step and the achieved FLOP/s (`train_flops`: encoder matmuls + attention on the
  shapes the encoder really ran, ×3 for forward+backward, ×4 with gradient checkpointing, plus the
  ColBERT max-sim), all ranks together: on a GPU, divide by the peak to get the utilisation the
  BENCHMARKS.md estimate assumes (40 %).

`--profile DIR` records a torch.profiler trace of steps 3-7 on rank 0 and prints the operator
table (self CPU time), to see what bounds a step.

Output: one `BENCH_TRAIN {json}` line on rank 0, and the same JSON in `--json` when given.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist


def _peak_rss_mib() -> float:
    # ru_maxrss is in KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def encoder_calls(model, query_mask, passage_mask) -> list[tuple[int, int]]:
    """(rows, width) of every encoder call for this batch, following `M3Model.encode_many`."""
    import torch
    import torch.nn.functional as F
    from m3composer.model.inference import unwrap_m3

    m3 = unwrap_m3(model)

    def calls(mask, chunks):
        if chunks is None:
            return [tuple(mask.shape)]
        lengths = mask.sum(dim=1)
        return [(len(c), int(lengths[torch.as_tensor(c)].max())) for c in chunks]

    width = max(query_mask.shape[1], passage_mask.shape[1])
    joint = torch.cat([F.pad(query_mask, (0, width - query_mask.shape[1])),
                       F.pad(passage_mask, (0, width - passage_mask.shape[1]))])
    chunks = m3._length_chunks(joint)
    if chunks is None or len(chunks) <= 1:
        return [c for m in (query_mask, passage_mask) for c in calls(m, m3._length_chunks(m))]
    return calls(joint, chunks)


def train_flops(model, query_mask, passage_mask, calls: list[tuple[int, int]]) -> float:
    """Model FLOPs of one training step on this rank (the estimate BENCHMARKS.md uses for GPUs).

    Encoder: per call of `rows` × `width` tokens, forward = rows·width·(2·P + 4·layers·H·width)
    (P = the encoder's matmul weights, embeddings excluded; 4·layers·H·width = QKᵀ and AV); a
    training step is 3 forwards (forward + backward), 4 with gradient checkpointing. ColBERT max-sim:
    3 × 2·(B·Lq)·(B·G·Lp)·D on the padded tensors. The sparse and dense scores are negligible.
    """
    from m3composer.model.inference import unwrap_m3

    m3 = unwrap_m3(model)
    cfg = m3.encoder.config
    if not hasattr(m3, "_bench_matmul_params"):
        m3._bench_matmul_params = sum(p.numel() for n, p in m3.encoder.named_parameters()
                                      if p.dim() == 2 and "embeddings" not in n)
    P, layers, hidden = m3._bench_matmul_params, cfg.num_hidden_layers, cfg.hidden_size
    passes = 4 if getattr(m3.encoder, "is_gradient_checkpointing", False) else 3
    encoder = sum(r * w * (2 * P + 4 * layers * hidden * w) for r, w in calls) * passes
    colbert = 3 * 2 * query_mask.numel() * passage_mask.numel() * m3.colbert_linear.out_features
    return float(encoder + colbert)


class BenchTimer(Callback):
    """Passive timing of the train loop: per-step periods, data-loader waits, padding, losses."""

    def __init__(self, profile_dir: str | None = None, profile_steps: tuple[int, int] = (3, 8)):
        self.t_fit_start = None
        self.before_dl = None
        self.last_batch_end = None
        self.dl_wait: list[float] = []          # BEFORE_DATALOADER -> AFTER_DATALOADER
        self.batch_build: list[float] = []      # M3TrainDataset.batch (num_workers=0)
        self.end_to_batch: list[float] = []     # BATCH_END -> AFTER_DATALOADER (from step 2 on)
        self.step_period: list[float] = []      # BATCH_END -> BATCH_END (from step 2 on)
        self.first_step_s = None
        self.losses: list[float] = []
        self.pad = {"query_tokens": 0, "query_pad": 0, "passage_tokens": 0, "passage_pad": 0,
                    "encoder_tokens": 0}
        self.queries = 0
        self.flops = 0.0
        self.total_wct_s = None
        self.profile_dir = profile_dir
        self.profile_steps = profile_steps
        self._prof = None

    def time_batch_building(self, dataset) -> None:
        """Wrap `dataset.batch` (same process only: num_workers=0) to time building each batch."""
        build = dataset.batch

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return build(*args, **kwargs)
            finally:
                self.batch_build.append(time.perf_counter() - t0)
        dataset.batch = timed

    def fit_start(self, state: State, logger: Logger) -> None:
        self.t_fit_start = time.perf_counter()

    def before_dataloader(self, state: State, logger: Logger) -> None:
        self.before_dl = time.perf_counter()

    def after_dataloader(self, state: State, logger: Logger) -> None:
        now = time.perf_counter()
        if self.before_dl is not None:
            self.dl_wait.append(now - self.before_dl)
        if self.last_batch_end is not None:
            self.end_to_batch.append(now - self.last_batch_end)
        batch = state.batch
        qm, pm = batch["query_attention_mask"], batch["passage_attention_mask"]
        self.pad["query_tokens"] += qm.numel()
        self.pad["query_pad"] += qm.numel() - int(qm.sum())
        self.pad["passage_tokens"] += pm.numel()
        self.pad["passage_pad"] += pm.numel() - int(pm.sum())
        calls = encoder_calls(state.model, qm, pm)
        self.pad["encoder_tokens"] += sum(r * w for r, w in calls)
        self.flops += train_flops(state.model, qm, pm, calls)
        self.queries += int(qm.shape[0])
        step = int(state.timestamp.batch)
        if self.profile_dir and dist.get_global_rank() == 0 and step == self.profile_steps[0]:
            import torch.profiler
            self._prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                                record_shapes=True)
            self._prof.__enter__()

    def batch_end(self, state: State, logger: Logger) -> None:
        now = time.perf_counter()
        if self.last_batch_end is None:
            self.first_step_s = now - self.t_fit_start
        else:
            self.step_period.append(now - self.last_batch_end)
        self.last_batch_end = now
        loss = state.total_loss_dict.get("loss/train/total")
        if loss is not None:
            self.losses.append(float(loss))
        if self._prof is not None and int(state.timestamp.batch) >= self.profile_steps[1]:
            self._prof.__exit__(None, None, None)
            out = Path(self.profile_dir)
            out.mkdir(parents=True, exist_ok=True)
            table = self._prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40)
            (out / "ops.txt").write_text(table + "\n")
            table_total = self._prof.key_averages().table(sort_by="cpu_time_total", row_limit=60)
            (out / "ops_total.txt").write_text(table_total + "\n")
            self._prof.export_chrome_trace(str(out / "trace.json"))
            print(table, file=sys.stderr)
            self._prof = None

    def fit_end(self, state: State, logger: Logger) -> None:
        self.total_wct_s = state.timestamp.total_wct.total_seconds()
        self.loop_to_last_batch_s = self.last_batch_end - self.t_fit_start

    def summary(self) -> dict:
        return {"steps": len(self.losses), "queries": self.queries, "total_wct_s": self.total_wct_s,
                "loop_to_last_batch_s": self.loop_to_last_batch_s, "first_step_s": self.first_step_s,
                "step_period": self.step_period, "dl_wait": self.dl_wait, "batch_build": self.batch_build, "end_to_batch": self.end_to_batch,
                "losses": self.losses, "pad": self.pad, "flops": self.flops, "peak_rss_mib": _peak_rss_mib()}


def combine(per_rank: list[dict], extra: dict) -> dict:
    """Rank summaries -> one report (figures over all ranks; step times from the slowest rank)."""
    r0 = per_rank[0]
    steps = r0["steps"]
    queries = sum(r["queries"] for r in per_rank)
    loop_s = max(r["total_wct_s"] for r in per_rank)
    # steady-state period: median of BATCH_END->BATCH_END after the first step, per rank, take max
    med_period = max(statistics.median(r["step_period"]) for r in per_rank) if steps > 1 else None
    # data-loader waits exclude the first fetch (the first shard read, once per run)
    waits = [statistics.mean(r["dl_wait"][1:]) for r in per_rank if len(r["dl_wait"]) > 1]
    builds = [statistics.mean(r["batch_build"][1:]) for r in per_rank if len(r["batch_build"]) > 1]
    # the loader's share: batch building on the training thread (workers=0), else the next() wait
    loader = builds if builds else waits
    overhead = [statistics.mean(r["end_to_batch"]) for r in per_rank if r["end_to_batch"]]
    mean_period = [statistics.mean(r["step_period"]) for r in per_rank if r["step_period"]]
    pad = {k: sum(r["pad"][k] for r in per_rank) for k in per_rank[0]["pad"]}
    losses = [statistics.mean(vals) for vals in zip(*(r["losses"] for r in per_rank))]
    report = {
        **extra,
        "world_size": len(per_rank), "steps": steps, "queries": queries,
        "loop_s": round(loop_s, 3),
        "samples_per_s": round(queries / loop_s, 3),
        "first_step_s": round(max(r["first_step_s"] for r in per_rank), 3),
        "median_step_s": None if med_period is None else round(med_period, 4),
        "dataloader_wait_ms": round(1000 * max(loader), 3) if loader else None,
        "dataloader_wait_pct": round(100 * max(w / p for w, p in zip(loader, mean_period)), 2) if loader else None,
        "before_to_after_dataloader_ms": round(1000 * max(waits), 3) if waits else None,
        "batch_end_to_next_batch_ms": round(1000 * max(overhead), 3) if overhead else None,
        "padding_fraction": round((pad["query_pad"] + pad["passage_pad"])
                                  / max(1, pad["query_tokens"] + pad["passage_tokens"]), 4),
        "encoder_padding_fraction": round(1 - (pad["query_tokens"] - pad["query_pad"] + pad["passage_tokens"]
                                               - pad["passage_pad"]) / max(1, pad["encoder_tokens"]), 4),
        "query_padding_fraction": round(pad["query_pad"] / max(1, pad["query_tokens"]), 4),
        "passage_padding_fraction": round(pad["passage_pad"] / max(1, pad["passage_tokens"]), 4),
        "model_tflop_per_step": round(sum(r["flops"] for r in per_rank) / max(1, steps) / 1e12, 4),
        "achieved_tflops": round(sum(r["flops"] for r in per_rank) / loop_s / 1e12, 4),
        "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
        "losses": [round(x, 5) for x in losses],
        "peak_rss_mib_per_rank": [round(r["peak_rss_mib"], 1) for r in per_rank],
        "step_periods_rank0_ms": [round(1000 * x, 1) for x in r0["step_period"]],
    }
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", help="write the report here (rank 0)")
    ap.add_argument("--profile", help="torch.profiler table and trace of steps 3-7 into this folder (rank 0)")
    ap.add_argument("recipe", help="recipe YAML")
    ap.add_argument("overrides", nargs="*", help="key=value overrides, as scripts/train.py")
    args = ap.parse_args(argv)

    import logging
    import torch
    from m3composer.train import build_trainer, closed_at_end, load_config

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    t_process = time.perf_counter()
    cfg = load_config(args.recipe, args.overrides)
    trainer = build_trainer(cfg)
    timer = BenchTimer(profile_dir=args.profile)
    trainer.state.callbacks.append(timer)
    if cfg.data.num_workers == 0:
        timer.time_batch_building(trainer.state.train_dataloader.dataset)
    t_built = time.perf_counter()
    with closed_at_end(trainer):
        trainer.fit()
        t_fit = time.perf_counter()
        mine = timer.summary()
        mine["build_s"] = t_built - t_process
        mine["fit_call_s"] = t_fit - t_built
        per_rank = dist.all_gather_object(mine)
        if dist.get_global_rank() == 0:
            extra = {"threads_per_rank": torch.get_num_threads(), "num_workers": cfg.data.num_workers,
                     "build_s": round(max(r["build_s"] for r in per_rank), 3),
                     "fit_call_s": round(max(r["fit_call_s"] for r in per_rank), 3)}
            report = combine(per_rank, extra)
            text = json.dumps(report)
            print("BENCH_TRAIN " + text, flush=True)
            if args.json:
                tmp = f"{args.json}.tmp-{os.getpid()}"
                Path(tmp).write_text(text + "\n")
                os.replace(tmp, args.json)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    raise SystemExit(main())

"""What Matryoshka and the sparsity regulariser add to a quickstart training step (issue 32: at most 5 %).

    python scripts/bench_serving_budget.py [--steps 12] [--repeats 3] [--nproc 2] [--work DIR] [--json OUT]

Each variant trains `--steps` steps through `scripts/bench_train.py` (the normal trainer; launched
with `composer -n NPROC`) on the sample data, with the settings of yamls/bench-serving-budget.yaml
(the quickstart's step):

    base       the recipe's three heads, self-distillation on from step 0
    mrl        + loss.matryoshka dense and ColBERT at --dim (96 of e5-small's 384)
    sparsity   + loss.sparsity FLOPS on queries and passages (weight 1e-3, no warm-up)
    both       mrl + sparsity

The variants run interleaved (base, mrl, sparsity, both, base, …), `--repeats` times, with the same
seed, so every variant trains on the same batches in the same order: step i of one variant is paired
with step i of base in the same repeat. Reported per variant: the median step (rank 0's
BATCH_END→BATCH_END periods, first step excluded) over all repeats, and the median over steps and
repeats of the paired ratio to base's same step. Timings need an idle machine.

`--smoke`: base and both on the tiny asset model, a few synthetic rows, 2 steps, 1 repeat, 1 process (the
suite's check).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "yamls" / "bench-serving-budget.yaml"
VARIANTS = ("base", "mrl", "sparsity", "both")


def variant_overrides(variant: str, dim: int) -> list[str]:
    mrl = [f"loss.matryoshka.dense_dims=[{dim}]", f"loss.matryoshka.colbert_dims=[{dim}]"]
    sparsity = ["loss.sparsity.regularizer=flops", "loss.sparsity.query_weight=1e-3",
                "loss.sparsity.passage_weight=1e-3"]
    return {"base": [], "mrl": mrl, "sparsity": sparsity, "both": mrl + sparsity}[variant]


def sample_mds(work: Path) -> Path:
    """The quickstart's sample data (`m3c sample-data` + `m3c convert`) under `work`, made once."""
    mds = work / "mds"
    if not (mds / "m3_index.json").exists():
        m3c = [sys.executable, "-m", "m3composer.cli"]
        subprocess.run(m3c + ["sample-data", str(work / "sample"), "--overwrite"], check=True, cwd=REPO)
        subprocess.run(m3c + ["convert", str(work / "sample" / "train"), "--out", str(mds), "--overwrite",
                              "--no-progress"], check=True, cwd=REPO)
    return mds


def run_variant(work: Path, mds: Path, variant: str, repeat: int, args) -> dict:
    run_dir = work / f"{variant}-{repeat}"
    out = run_dir / "bench.json"
    overrides = [f"run_name=bench-{variant}-{repeat}", f"run_dir={run_dir}", f"data.train_data={mds}",
                 f"trainer.max_duration={args.steps}ba", *args.model_overrides,
                 *variant_overrides(variant, args.dim)]
    launch = ([str(Path(sys.executable).parent / "composer"), "-n", str(args.nproc)] if args.nproc > 1
              else [sys.executable])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    started = time.perf_counter()
    done = subprocess.run(launch + [str(REPO / "scripts" / "bench_train.py"), "--json", str(out), str(RECIPE),
                                    *overrides], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=args.timeout)
    if done.returncode != 0 or not out.exists():
        raise SystemExit(f"{variant} repeat {repeat}: exit {done.returncode}\n{done.stderr[-4000:]}")
    report = json.loads(out.read_text())
    print(f"{variant:<9} repeat {repeat}: median step {report['median_step_s']:.3f} s, loop {report['loop_s']:.1f} s "
          f"({time.perf_counter() - started:.0f} s with start-up)", flush=True)
    return report


def summarise(reports: dict[str, list[dict]]) -> dict:
    """Per variant: median step over repeats, and the median paired ratio to base (same repeat, same step)."""
    summary = {}
    for variant, runs in reports.items():
        periods = [p for r in runs for p in r["step_periods_rank0_ms"]]
        ratios = [v / b for r, base in zip(runs, reports["base"])
                  for v, b in zip(r["step_periods_rank0_ms"], base["step_periods_rank0_ms"])]
        summary[variant] = {"median_step_ms": round(statistics.median(periods), 1),
                            "ratio_to_base": round(statistics.median(ratios), 4),
                            "ratio_quartiles": [round(q, 4) for q in statistics.quantiles(ratios, n=4)]
                            if len(ratios) > 1 else None,
                            "steps_paired": len(ratios)}
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--nproc", type=int, default=2, help="processes per run (the quickstart: 2)")
    ap.add_argument("--dim", type=int, default=96, help="the Matryoshka size of dense and ColBERT")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--work", type=Path, default=Path("/tmp/m3c-bench-serving-budget"))
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per run")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--smoke", action="store_true", help="tiny model, synthetic rows, 2 steps, 1 repeat, 1 process")
    args = ap.parse_args(argv)
    args.model_overrides = []
    variants = [v for v in args.variants.split(",") if v]
    if "base" not in variants or set(variants) - set(VARIANTS):
        ap.error(f"--variants: a comma list of {', '.join(VARIANTS)} that includes base")
    args.work.mkdir(parents=True, exist_ok=True)
    if args.smoke:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from bench_vs_flagembedding import SMOKE_MODEL, prepare_smoke
        args.steps, args.repeats, args.nproc, args.dim = 2, 1, 1, 8
        variants = ["base", "both"]
        args.model_overrides = [f"model.name_or_path={SMOKE_MODEL}", "model.pooling=cls",
                                "data.query_instruction_for_retrieval=null", "data.passage_instruction_for_retrieval=null",
                                "model.sparse_init_passages=16"]
        mds = prepare_smoke(args.work)
    else:
        mds = sample_mds(args.work)
    reports: dict[str, list[dict]] = {v: [] for v in variants}
    for repeat in range(args.repeats):
        for variant in variants:
            reports[variant].append(run_variant(args.work, mds, variant, repeat, args))
    summary = summarise(reports)
    print(f"\n| variant | median step (ms) | paired ratio to base | quartiles |\n|---|---|---|---|")
    for variant, s in summary.items():
        q = s["ratio_quartiles"]
        print(f"| {variant} | {s['median_step_ms']:.1f} | {s['ratio_to_base']:.4f} | "
              f"{'-' if q is None else f'{q[0]:.4f}-{q[2]:.4f}'} |")
    result = {"steps": args.steps, "repeats": args.repeats, "nproc": args.nproc, "dim": args.dim,
              "summary": summary, "runs": {v: [{k: r[k] for k in ("median_step_s", "loop_s", "step_periods_rank0_ms",
                                                                   "losses")} for r in runs]
                                           for v, runs in reports.items()}}
    print(json.dumps(result["summary"], indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The GPU check: the real recipe on a lent GPU machine's own stack, one step after another.

    bash scripts/gpu_check.sh [OUT]            # installs gpu_kit/ (scripts/gpu_kit.py), then runs this
    python scripts/gpu_check.py --out OUT [--cpu] [--budget-s 420]

Steps (each named in OUT/result.json, which is rewritten after every step; the first that fails
stops the check and is named there as `failed_step`, with its error; OUT/log.txt has the console,
OUT/logs.tar.gz one log per command):

1. `environment`: versions, the GPU, its bf16 peak.
2. `assets`: unpack gpu_kit/assets.tar.gz (tokenizer, sample data); rebuild the tiny test model from
   its seed (m3composer/assets/tiny.py); build a randomly initialised model of BGE-M3's shape
   (scripts/bench_memory.py `bge_m3_shape_config`: 24 layers, hidden 1024, the 250,002 vocabulary).
3. `convert`: `m3c convert` of the sample data.
4. For the tiny model, then the BGE-M3-shaped one: `train:*` through the `composer` launcher on one
   device (yamls/gpu-check.yaml: bf16 autocast, gradient checkpointing, the gradient cache, the
   unified loss with self-distillation, the idf fit of the fresh sparse head, a checkpoint, the
   export; every loss term finite), `eval:*` (`m3c eval` of the export on the GPU), `reload:*` (the
   export through `M3Model.from_pretrained` and through transformers' `AutoModel`: the same dense
   vectors).
5. `throughput`: the BGE-M3-shaped model at two bucket lengths, uncached and cached: samples/s,
   tokens/s, TFLOP/s, MFU against the card's bf16 peak, peak GPU memory (bench_memory.throughput).
6. `largest_8192`: the largest uncached and cached batch (query groups of 8 passages) at 8,192
   tokens, searched in one process (out-of-memory is caught) within a time budget.
7. `bf16_vs_fp32`: one step's loss terms under bf16 autocast against fp32, same weights, same batch,
   dropout off: every term within BF16_TOLERANCE.

`--cpu` is the proof run on a machine without a GPU (scripts/gpu_proof.sh): the same steps, shortened
(2 of the 24 layers, fewer steps, short lengths, fp32 training, CPU bf16 autocast for step 7).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KIT = REPO / "gpu_kit"
# |bf16 − fp32| allowed per loss term: bf16 keeps 8 bits of mantissa (relative rounding ~4e-3 per
# operation); through 24 layers and a softmax over the group, terms of order ln(G) agree to a few 1e-2.
BF16_TOLERANCE = {"abs": 0.05, "rel": 0.03}


class StepFailed(Exception):
    pass


class Check:
    def __init__(self, out: Path, cpu: bool):
        self.out, self.cpu = out, cpu
        self.result = {"ok": None, "cpu_proof": cpu, "steps": [], "failed_step": None}
        self.started = time.time()

    def save(self) -> None:
        tmp = self.out / "result.json.partial"
        tmp.write_text(json.dumps(self.result, indent=2, default=str))
        os.replace(tmp, self.out / "result.json")

    def step(self, name: str, fn, *args, **kwargs):
        print(f"\n=== [{time.strftime('%H:%M:%S')} +{time.time() - self.started:.0f}s] {name} ===", flush=True)
        t0 = time.time()
        try:
            value = fn(*args, **kwargs)
        except Exception as err:       # the failing step is named, with its error, then the check stops
            traceback.print_exc()
            self.result["steps"].append({"name": name, "ok": False, "seconds": round(time.time() - t0, 1),
                                         "error": f"{type(err).__name__}: {err}"[-2000:]})
            self.result.update(ok=False, failed_step=name)
            self.save()
            raise StepFailed(name) from err
        self.result["steps"].append({"name": name, "ok": True, "seconds": round(time.time() - t0, 1)})
        if value is not None:
            self.result[name] = value
        self.save()
        print(json.dumps(value, default=str)[:2000] if value is not None else "ok", flush=True)
        return value


def run(cmd: list[str], log_name: str, out: Path, timeout: float) -> None:
    """A command with its output in OUT/logs/<log_name>.log (and its tail in the error when it fails)."""
    log = out / "logs" / f"{log_name}.log"
    print("$ " + " ".join(map(str, cmd)), flush=True)
    with open(log, "w") as f:
        proc = subprocess.run([str(c) for c in cmd], stdout=f, stderr=subprocess.STDOUT, cwd=REPO, timeout=timeout)
    if proc.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"exit code {proc.returncode}: {' '.join(map(str, cmd))}\n--- {log} (tail) ---\n{tail}")


def environment(cpu: bool) -> dict:
    import torch
    import transformers

    import composer
    import streaming
    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "transformers": transformers.__version__, "composer": composer.__version__,
            "streaming": streaming.__version__, "numpy": __import__("numpy").__version__,
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    if not cpu and not torch.cuda.is_available():
        raise RuntimeError("no CUDA GPU (run with --cpu for the proof run on a CPU)")
    if info["gpu"]:
        from bench_memory import BF16_PEAK_TFLOPS
        info["bf16_peak_tflops"] = next((v for k, v in BF16_PEAK_TFLOPS.items() if k in info["gpu"]), None)
        info["gpu_memory_gib"] = torch.cuda.get_device_properties(0).total_memory / 2 ** 30
    return info


def assets(work: Path, shape: str) -> dict:
    import torch
    from transformers import AutoTokenizer, XLMRobertaModel

    from bench_memory import bge_m3_shape_config
    from m3composer.assets.tiny import build_tiny
    from m3composer.model.folder_config import M3FolderConfig
    with tarfile.open(KIT / "assets.tar.gz") as tar:
        tar.extractall(work, filter="data")
    tiny = build_tiny(work / "tiny", work / "tokenizer")
    big = work / "bge-m3-shape"
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):     # a GPU initialises 568M weights fast
        encoder = XLMRobertaModel(bge_m3_shape_config(shape), add_pooling_layer=False)
    encoder.save_pretrained(big, safe_serialization=True)
    AutoTokenizer.from_pretrained(work / "tokenizer").save_pretrained(big)
    M3FolderConfig(pooling="cls", normalize=True, query_instruction=None, passage_instruction=None).save(big)
    return {"tiny": str(tiny), "bge_m3_shape": str(big), "bge_m3_shape_layers": encoder.config.num_hidden_layers,
            "bge_m3_shape_params_m": round(sum(p.numel() for p in encoder.parameters()) / 1e6, 1)}


def train(name: str, model_dir: Path, work: Path, out: Path, steps: int, extra: list[str], timeout: float) -> dict:
    run_dir = work / f"run-{name}"
    shutil.rmtree(run_dir, ignore_errors=True)
    run([sys.executable, "-m", "composer.cli.launcher", "-n", "1", "scripts/train.py", "yamls/gpu-check.yaml",
         f"run_dir={run_dir}", f"model.name_or_path={model_dir}", f"data.train_data={work / 'mds'}",
         f"trainer.max_duration={steps}ba", f"trainer.save_interval={steps}ba", *extra], f"train-{name}", out, timeout)
    lines = [json.loads(x) for x in (run_dir / "losses.jsonl").read_text().splitlines() if x.strip()]
    steps_logged = [x for x in lines if "event" not in x]
    if len(steps_logged) != steps:
        raise RuntimeError(f"{len(steps_logged)} steps logged, expected {steps}")
    terms = {k: [x[k] for x in steps_logged if k in x] for k in steps_logged[-1] if k.startswith("loss/train/")}
    bad = {k: v for k, v in terms.items() if not all(math.isfinite(t) for t in v)}
    if bad:
        raise RuntimeError(f"loss terms not finite: {bad}")
    for head in ("dense", "sparse", "colbert", "ensemble", "self_distill"):
        if not any(t != 0 for t in terms.get(f"loss/train/{head}", [0])):
            raise RuntimeError(f"the {head} term is never non-zero: {terms.get(f'loss/train/{head}')}")
    export = run_dir / "export"
    card = json.loads((export / "m3composer.json").read_text())
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").glob("*") if p.is_file())
    return {"export": str(export), "first": {k: v[0] for k, v in terms.items()},
            "last": {k: v[-1] for k, v in terms.items()}, "checkpoints": checkpoints,
            "export_files": sorted(p.name for p in export.iterdir()), "card_keys": sorted(card)}


def evaluate(name: str, export: str, work: Path, out: Path, timeout: float) -> dict:
    target = out / "logs" / f"eval-{name}.json"
    run([sys.executable, "-m", "m3composer.cli", "eval", export, work / "sample" / "eval", "--device", "auto",
         "--passage-max-len", "192", "--output", target], f"eval-{name}", out, timeout)
    results = json.loads(target.read_text())
    return {h: results[h]["ndcg@10"] for h in ("dense", "sparse", "colbert", "ensemble") if h in results} | {
        "seconds": results["seconds"], "num_docs": results["num_docs"]}


def reload(export: str) -> dict:
    import torch
    from transformers import AutoModel, AutoTokenizer

    from m3composer.model.m3 import M3Model
    device = "cuda" if torch.cuda.is_available() else "cpu"
    texts = ["what does the gradient cache do?", "It encodes the batch in chunks without a graph."]
    m3 = M3Model.from_pretrained(export).to(device)
    ours = m3.encode_texts(texts, return_sparse=True, return_colbert_vecs=True)
    tokenizer = AutoTokenizer.from_pretrained(export)
    plain = AutoModel.from_pretrained(export).to(device).eval()
    with torch.inference_mode():
        batch = tokenizer(texts, padding=True, return_tensors="pt").to(device)
        cls = torch.nn.functional.normalize(plain(**batch).last_hidden_state[:, 0].float(), dim=-1).cpu().numpy()
    diff = float(abs(cls - ours["dense_vecs"]).max())
    if diff > 1e-3:
        raise RuntimeError(f"AutoModel's CLS vectors differ from M3Model's dense vectors by {diff}")
    return {"dense_max_abs_diff_vs_automodel": diff, "lexical_terms": [len(x) for x in ours["lexical_weights"]],
            "colbert_tokens": [int(v.shape[0]) for v in ours["colbert_vecs"]]}


def throughput(shape: str, buckets: str, steps: int) -> list[dict]:
    import bench_memory
    args = argparse.Namespace(model=shape, throughput=buckets, steps=steps, group_size=8, threads=os.cpu_count(),
                              no_checkpointing=False, cache_sequences=64, cache_tokens=65536, length=None)
    rows = bench_memory.throughput(args)
    for row in rows:
        row["tokens_per_s"] = row["samples_per_s"] * (bench_memory.QUERY_LEN + args.group_size * row["length"])
    return rows


def search_largest(fits, max_batch: int, budget_s: float) -> dict:
    """The largest batch for which `fits(batch)` is true: double from 1 until it is false (or
    `max_batch`), then bisect between the last success and the first failure, while `budget_s`
    seconds last. `complete` says whether the search ended before its budget did."""
    started, good, bad = time.time(), 0, None
    batch = 1
    while batch <= max_batch and time.time() - started < budget_s:
        if not fits(batch):
            bad = batch
            break
        good, batch = batch, batch * 2
    while bad is not None and bad - good > 1 and time.time() - started < budget_s:
        mid = (good + bad) // 2
        good, bad = (mid, bad) if fits(mid) else (good, mid)
    complete = (bad is not None and bad - good <= 1) or good * 2 > max_batch
    return {"largest_batch": good, "first_failed": bad, "complete": complete,
            "seconds": round(time.time() - started, 1)}


def largest_batch(shape: str, length: int, budget_s: float, max_batch: int) -> list[dict]:
    """Uncached then cached, the largest batch of query groups that trains one step
    (`search_largest`); a step out of GPU memory is caught and its memory freed."""
    import torch

    import bench_memory
    results = []
    for cached in (False, True):
        args = argparse.Namespace(model=shape, length=length, group_size=8, cache_sequences=8, cache_tokens=65536,
                                  no_checkpointing=False)
        model, optimizer, device = bench_memory.build_composer_model(args, cached)
        trials = []

        def fits(batch: int) -> bool:
            data = bench_memory.make_batch(batch, args.group_size, length, model.model.vocab_size, device)
            t0 = time.time()
            try:
                bench_memory.train_steps(model, optimizer, data, 1)
                ok = True
            except torch.OutOfMemoryError:
                ok = False
            optimizer.zero_grad(set_to_none=True)
            del data
            if device.type == "cuda":
                torch.cuda.empty_cache()
            trials.append({"batch": batch, "ok": ok, "seconds": round(time.time() - t0, 1)})
            print(json.dumps({"cached": cached, **trials[-1]}), flush=True)
            return ok

        found = search_largest(fits, max_batch, budget_s)
        results.append({"cached": cached, "length": length, "group_size": args.group_size, **found, "trials": trials})
        del model, optimizer
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results


def bf16_vs_fp32(shape: str, length: int, batch: int) -> dict:
    """The loss terms of one forward under bf16 autocast and in fp32: same weights, same batch,
    dropout off (eval mode), self-distillation on."""
    import torch

    import bench_memory
    args = argparse.Namespace(model=shape, length=length, group_size=8, cache_sequences=16, cache_tokens=65536,
                              no_checkpointing=False)
    model, _, device = bench_memory.build_composer_model(args, cached=False)
    model.eval()
    data = bench_memory.make_batch(batch, args.group_size, length, model.model.vocab_size, device)
    terms = {}
    for precision in ("fp32", "bf16"):
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = model.loss(model(data), data)
        terms[precision] = {k: float(v) for k, v in out.items()}
    worst = {}
    for k, ref in terms["fp32"].items():
        diff = abs(terms["bf16"][k] - ref)
        worst[k] = diff
        if diff > BF16_TOLERANCE["abs"] + BF16_TOLERANCE["rel"] * abs(ref):
            raise RuntimeError(f"loss term {k}: bf16 {terms['bf16'][k]:.5f} vs fp32 {ref:.5f} "
                               f"(tolerance {BF16_TOLERANCE})")
    return {"device": device.type, "length": length, "batch": batch, "fp32": terms["fp32"], "bf16": terms["bf16"],
            "abs_diff": worst, "tolerance": BF16_TOLERANCE}


def pack_logs(out: Path) -> None:
    """OUT/logs/ (one log per command, the eval JSON) as OUT/logs.tar.gz: the device tool brings
    back at most 8 files."""
    with tarfile.open(out / "logs.tar.gz", "w:gz") as tar:
        tar.add(out / "logs", arcname="logs")
    shutil.rmtree(out / "logs")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(REPO / "gpu_check_out"))
    p.add_argument("--cpu", action="store_true", help="the proof run without a GPU: every step, shortened")
    p.add_argument("--work", default=None, help="scratch folder (default OUT/work, removed at the end)")
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    (out / "logs").mkdir(parents=True, exist_ok=True)
    work = Path(args.work).resolve() if args.work else out / "work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    check = Check(out, args.cpu)
    if args.cpu:   # shortened: 2 of the 24 layers, few steps, short buckets; fp32 training (CPU runs are fp32)
        shape, steps, big_steps, buckets, big_len, budget, bf16 = "bge-m3-shape:2", 4, 3, "64:2,128:1", 128, 30, (128, 2)
        train_extra = ["model.sparse_init_passages=128"]
    else:
        shape, steps, big_steps, buckets, big_len, budget, bf16 = "bge-m3-shape", 8, 12, "512:32,2048:8", 8192, 75, (512, 8)
        train_extra = []
    timeout = 900
    try:
        check.step("environment", environment, args.cpu)
        check.step("assets", assets, work, shape)
        check.step("convert", run, [sys.executable, "-m", "m3composer.cli", "convert", work / "sample" / "train",
                                    "--out", work / "mds", "--tokenizer", work / "tiny", "--no-progress"],
                   "convert", out, timeout)
        for name, model_dir, n in (("tiny", work / "tiny", steps), ("bge-m3-shape", work / "bge-m3-shape", big_steps)):
            trained = check.step(f"train:{name}", train, name, model_dir, work, out, n, train_extra, timeout)
            check.step(f"eval:{name}", evaluate, name, trained["export"], work, out, timeout)
            check.step(f"reload:{name}", reload, trained["export"])
            shutil.rmtree(work / f"run-{name}" / "checkpoints", ignore_errors=True)
        check.step("throughput", throughput, shape, buckets, 3 if args.cpu else 5)
        check.step("largest_8192", largest_batch, shape, big_len, budget, 2 if args.cpu else 256)
        check.step("bf16_vs_fp32", bf16_vs_fp32, shape, *bf16)
    except StepFailed as failed:
        print(f"\ngpu check: FAILED at step {failed} (see {out / 'result.json'})", flush=True)
        return 1
    finally:
        with contextlib.suppress(OSError):
            shutil.rmtree(work)
        pack_logs(out)
    check.result.update(ok=True, seconds=round(time.time() - check.started, 1))
    check.save()
    print(f"\ngpu check: every step passed in {check.result['seconds']:.0f} s ({out / 'result.json'})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

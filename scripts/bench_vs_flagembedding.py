"""m3composer against FlagEmbedding's own M3 trainer on the same model, data, settings and machine.

    python scripts/bench_vs_flagembedding.py [--work DIR] [--peer-venv DIR] [--repeats 2]
                                             [--configs tiny-1,tiny-2,big-1,big-2] [--long-passage 128,2048]
    python scripts/bench_vs_flagembedding.py --smoke [--work DIR]

It needs the *peer harness*, a folder outside this repository (`--peer-dir`, default
`../shared/peer` beside the checkout) that holds `setup.sh` (builds FlagEmbedding's virtualenv),
`make_tiny_model.py`, `make_data.py` and `run_peer.sh` (runs FlagEmbedding's M3 trainer and
prints samples/s and losses). BENCHMARKS.md §Versus FlagEmbedding describes the method and results.

What it does (issue 10):
1. builds the peer's models and data with the harness's `make_tiny_model.py` and `make_data.py`
   in the peer's virtualenv (tiny: 2 layers, hidden 64, vocabulary 8000; big: 6 layers, hidden 384),
   so both trainers read the same model folder and the same JSONL; converts that JSONL with
   `m3c convert` (our tokens are then the peer tokenizer's tokens);
2. for every configuration, runs FlagEmbedding through the harness's `run_peer.sh` and m3composer
   through `scripts/bench_train.py` (the normal `build_trainer` + `fit`, one passive timing
   callback), one after the other, swapping which goes first in every repeat, so both see the
   same machine state;
3. prints and writes (`WORK/results.json`, `WORK/results.md`) samples/s, the ratio, loss at the
   first and last step (and the whole curves), peak RSS, loop time and process wall time.

Settings common to both (ours: `yamls/bench-vs-flagembedding.yaml`, this benchmark's own, so a change
to a recipe does not change it): G=4, query 64 / passage 128 tokens, per-device batch 8, unified loss +
self-distillation from step 0, lr 1e-5, warm-up 0.1, seed 42, fp32, CLS pooling (the peer folder has
no m3composer.json), the same thread count per process (cores / processes). 2 processes: gloo,
cross-rank negatives (`negatives_cross_device`) for the dense head only, as FlagEmbedding gathers.
Steps: tiny 100, big 24 (the harness's defaults).

`--smoke` runs only m3composer's half of the smallest configuration (tiny, 1 process, 1 step, one
repeat) on the tiny asset model (`asset:tiny-xlmr`) and a few synthetic rows, without the peer
harness or FlagEmbedding's virtualenv: it shows in seconds that the benchmark still runs (the
test suite runs it).

Counting, the same for both:
* samples/s = query groups (1 query + G passages) trained per second, all processes together.
* loop time: FlagEmbedding's `train_runtime` (Hugging Face Trainer: the training loop, first step
  included; not start-up, model/data loading or saving). Ours: Composer's accumulated batch wall
  clock (`state.timestamp.total_wct`, SpeedMonitor's `wall_clock/train`), the same span.
* process wall: the whole command, launcher to exit.
* peak RSS: this script samples the RSS of every process of the run (launcher included) every
  0.1 s with psutil; `peak_rss_gib` is the peak of their sum, `peak_proc_gib` the largest single
  process.

Long-passage rows (`--long-passage L1,L2`): a 2-layer hidden-64 model over the real 250,002-token
XLM-R vocabulary (the e5-small asset's tokenizer, position table 8194) and passages of L tokens,
batch 8 × G4, 1 process, 3 steps. FlagEmbedding's sparse head builds an (n, L, V) float tensor;
both runs are capped at `--mem-cap-gib` of address space, so an allocation beyond it fails inside
the process instead of calling the kernel's out-of-memory killer on a shared machine.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
DEFAULT_PEER_DIR = REPO.parent / "shared" / "peer"
BIN = Path(sys.executable).parent
GIB = 1024 ** 3

# The settings the two trainers share (this benchmark's own YAML, not a recipe's)
RECIPE = REPO / "yamls" / "bench-vs-flagembedding.yaml"
STEPS = {"tiny": 100, "big": 24}
SMOKE_MODEL = "asset:tiny-xlmr"
SMOKE_STEPS = 1


# ------------------------------------------------------------------------------- process runner
class Run:
    """A subprocess whose process tree's RSS is sampled until it exits."""

    def __init__(self, cmd: list[str], env: dict, log_path: Path, cwd: Path | None = None,
                 mem_cap_bytes: int | None = None):
        self.cmd, self.env, self.log_path, self.cwd, self.mem_cap = cmd, env, log_path, cwd, mem_cap_bytes
        self.peak_total = 0
        self.peak_single = 0

    def _limit(self):
        if self.mem_cap:
            import resource
            resource.setrlimit(resource.RLIMIT_AS, (self.mem_cap, self.mem_cap))
        os.setsid()   # own process group: the whole tree can be stopped on timeout

    def _sample(self, proc: subprocess.Popen, stop: threading.Event) -> None:
        root = psutil.Process(proc.pid)
        while not stop.is_set():
            try:
                procs = [root] + root.children(recursive=True)
                rss = []
                for p in procs:
                    try:
                        rss.append(p.memory_info().rss)
                    except psutil.Error:
                        pass
                self.peak_total = max(self.peak_total, sum(rss))
                self.peak_single = max(self.peak_single, max(rss, default=0))
            except psutil.Error:
                pass
            stop.wait(0.1)

    def run(self, timeout: float) -> tuple[int, float, str]:
        t0 = time.perf_counter()
        with open(self.log_path, "w") as log:
            proc = subprocess.Popen(self.cmd, env=self.env, cwd=self.cwd, stdout=log, stderr=subprocess.STDOUT,
                                    preexec_fn=self._limit)
            stop = threading.Event()
            sampler = threading.Thread(target=self._sample, args=(proc, stop), daemon=True)
            sampler.start()
            try:
                rc = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
                rc = proc.wait()
            stop.set()
            sampler.join()
        return rc, time.perf_counter() - t0, self.log_path.read_text(errors="replace")


def thread_env(threads: int) -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONUNBUFFERED="1")
    return env


# ------------------------------------------------------------------------------------ preparing
def prepare(work: Path, peer_dir: Path, peer_python: Path, models: set[str]) -> None:
    """Peer models + data (peer venv), then our MDS conversion of the same JSONL."""
    work.mkdir(parents=True, exist_ok=True)
    specs = {"tiny": [], "big": ["--layers", "6", "--hidden", "384", "--heads", "12", "--intermediate", "1536"]}
    for name in sorted(models):
        if not (work / name / "model.safetensors").exists():
            print(f"[prepare] {name} model (make_tiny_model.py)", flush=True)
            subprocess.run([str(peer_python), str(peer_dir / "make_tiny_model.py"), str(work / name), *specs[name]],
                           check=True, stdout=subprocess.DEVNULL)
    if not (work / "data" / "peer_data_info.txt").exists():
        print("[prepare] data (make_data.py)", flush=True)
        subprocess.run([str(peer_python), str(peer_dir / "make_data.py"), str(work / "data"), "--tokenizer",
                        str(work / "tiny")], check=True, stdout=subprocess.DEVNULL)
    if not (work / "mds" / "m3_index.json").exists():
        print("[prepare] m3c convert", flush=True)
        subprocess.run([sys.executable, "-m", "m3composer.cli", "convert", str(work / "data"), "--out",
                        str(work / "mds"), "--tokenizer", str(work / "tiny"), "--no-progress", "--overwrite"],
                       check=True, stdout=subprocess.DEVNULL, cwd=REPO)


def prepare_smoke(work: Path, rows: int = 24) -> Path:
    """`--smoke`'s data: a few synthetic rows (1 query, 1 positive, 3 negatives; bench_data.py's),
    converted with the tiny asset's tokenizer. Returns the converted folder."""
    mds = work / "smoke" / "mds"
    if not (mds / "m3_index.json").exists():
        for folder in (str(REPO), str(REPO / "scripts")):      # appended: nothing of the caller's is shadowed
            if folder not in sys.path:
                sys.path.append(folder)
        from bench_data import synthetic_jsonl
        from m3composer.assets.build import resolve_model_dir
        from m3composer.cli import main as m3c

        jsonl = synthetic_jsonl(work / "smoke" / "jsonl", rows)
        if m3c(["convert", str(jsonl), "--out", str(mds), "--tokenizer", str(resolve_model_dir(SMOKE_MODEL)),
                "--no-progress", "--overwrite"]) != 0:
            raise SystemExit(f"m3c convert of {jsonl} failed")
    return mds


def prepare_long(work: Path, passage_len: int) -> tuple[Path, Path, Path]:
    """A 2-layer hidden-64 XLM-R over the real 250,002-token vocabulary, and JSONL whose every
    passage is longer than `passage_len` tokens; converted for us. Returns (model, jsonl dir, mds)."""
    from transformers import AutoTokenizer, XLMRobertaConfig, XLMRobertaModel
    import torch
    sys.path.insert(0, str(REPO))
    from m3composer.assets.build import resolve_model_dir

    model_dir = work / "tiny-v250k"
    if not (model_dir / "model.safetensors").exists():
        e5 = Path(resolve_model_dir("asset:e5-small"))
        tmp = work / "tiny-v250k.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "sentencepiece.bpe.model"):
            if (e5 / f).exists():
                shutil.copy(e5 / f, tmp / f)
        torch.manual_seed(0)
        config = XLMRobertaConfig(vocab_size=250002, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=256, max_position_embeddings=8194, type_vocab_size=1,
                                  pad_token_id=1, bos_token_id=0, eos_token_id=2)
        XLMRobertaModel(config, add_pooling_layer=False).save_pretrained(tmp, safe_serialization=True)
        os.replace(tmp, model_dir)
    data_dir = work / f"long-{passage_len}" / "data" / "longdoc"
    mds = work / f"long-{passage_len}" / "mds"
    if not (mds / "m3_index.json").exists():
        tok = AutoTokenizer.from_pretrained(model_dir)
        texts = []
        for path in sorted((work / "data" / "pydoc").glob("*.jsonl")):
            for line in path.read_text().splitlines():
                row = json.loads(line)
                texts += row["pos"] + row["neg"]
        # long passages: consecutive docstrings glued until they pass passage_len tokens
        passages, cur = [], []
        for t in texts:
            cur.append(t)
            if len(cur) % 8 == 0 and len(tok(" ".join(cur))["input_ids"]) > passage_len + 8:
                passages.append(" ".join(cur))
                cur = []
            if len(passages) >= 48:
                break
        rows = []
        for i in range(24):
            rows.append({"query": texts[i * 3][:120], "pos": [passages[i]],
                         "neg": [passages[(i + k) % len(passages)] for k in (24 - i % 3, 25, 26)]})
        data_dir.mkdir(parents=True, exist_ok=True)
        # one file, one length bucket (from the name): every batch of both trainers holds 8 of these rows
        (data_dir / "longdoc_len-0-100000.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        subprocess.run([sys.executable, "-m", "m3composer.cli", "convert", str(data_dir), "--out", str(mds),
                        "--tokenizer", str(model_dir), "--no-progress", "--overwrite"], check=True,
                       stdout=subprocess.DEVNULL, cwd=REPO)
    return model_dir, data_dir, mds


# ---------------------------------------------------------------------------------------- runs
def run_peer(args, work: Path, model_dir: Path, data_dir: Path, nproc: int, steps: int, tag: str,
             extra: list[str] = (), mem_cap: int | None = None) -> dict:
    out = work / "runs" / f"peer-{tag}"
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    env = thread_env(max(1, (os.cpu_count() or 1) // nproc))
    env.update(PEER_VENV=str(args.peer_venv), NPROC=str(nproc), BATCH="8")
    cmd = ["bash", str(args.peer_dir / "run_peer.sh"), str(model_dir), str(data_dir), str(out), str(steps), *extra]
    run = Run(cmd, env, out.parent / f"peer-{tag}.log", mem_cap_bytes=mem_cap)
    rc, wall, text = run.run(args.timeout)
    result = {"trainer": "FlagEmbedding", "rc": rc, "process_wall_s": round(wall, 2),
              "peak_rss_gib": round(run.peak_total / GIB, 3), "peak_proc_gib": round(run.peak_single / GIB, 3)}
    res_path = out / "peer_result.json"
    if rc == 0 and res_path.exists():
        r = json.loads(res_path.read_text())
        result.update(samples_per_s=r["samples_per_s"], loop_s=r["wall_s"], steps=r["steps"], losses=r["losses"],
                      first_loss=r["losses"][0], last_loss=r["losses"][-1])
    else:
        result["error"] = _error_line(text)
    return result


def run_ours(args, work: Path, model_dir: Path, mds: Path, nproc: int, steps: int, tag: str,
             extra: list[str] = (), mem_cap: int | None = None) -> dict:
    out = work / "runs" / f"ours-{tag}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    env = thread_env(max(1, (os.cpu_count() or 1) // nproc))
    overrides = [f"run_name=bench-{tag}", f"run_dir={out}", f"model.name_or_path={model_dir}",
                 f"data.train_data={mds}", f"trainer.max_duration={steps}ba", f"callbacks.export_dir={out}/export",
                 f"loss.negatives_cross_device={'true' if nproc > 1 else 'false'}", *extra, *args.ours_override]
    script = [str(REPO / "scripts" / "bench_train.py"), "--json", str(out / "bench.json"), str(RECIPE), *overrides]
    cmd = [sys.executable, *script] if nproc == 1 else [str(BIN / "composer"), "-n", str(nproc), *script]
    run = Run(cmd, env, out.parent / f"ours-{tag}.log", cwd=REPO, mem_cap_bytes=mem_cap)
    rc, wall, text = run.run(args.timeout)
    result = {"trainer": "m3composer", "rc": rc, "process_wall_s": round(wall, 2),
              "peak_rss_gib": round(run.peak_total / GIB, 3), "peak_proc_gib": round(run.peak_single / GIB, 3)}
    if rc == 0 and (out / "bench.json").exists():
        r = json.loads((out / "bench.json").read_text())
        result.update(samples_per_s=r["samples_per_s"], loop_s=r["loop_s"], steps=r["steps"], losses=r["losses"],
                      first_loss=r["first_loss"], last_loss=r["last_loss"],
                      dataloader_wait_pct=r["dataloader_wait_pct"], padding_fraction=r["padding_fraction"],
                      median_step_s=r["median_step_s"])
    else:
        result["error"] = _error_line(text)
    return result


def _error_line(text: str) -> str:
    """The most telling line of a failed run's log (the exception, or an out-of-memory message)."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for pat in (r"can't allocate memory|out of memory|MemoryError|Killed", r"Error|error:|Exception"):
        hits = [ln for ln in lines if re.search(pat, ln)]
        if hits:
            return hits[-1][:300]
    return lines[-1][:300] if lines else "no output"


def load_avg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


# ------------------------------------------------------------------------------------ reporting
def summarise(results: list[dict]) -> list[dict]:
    rows = []
    for config in dict.fromkeys(r["config"] for r in results):
        peer = [r for r in results if r["config"] == config and r["trainer"] == "FlagEmbedding"]
        ours = [r for r in results if r["config"] == config and r["trainer"] == "m3composer"]

        def mean(rs, key):
            vals = [r[key] for r in rs if r.get(key) is not None]
            return round(statistics.mean(vals), 3) if vals else None
        row = {"config": config}
        for name, rs in (("peer", peer), ("ours", ours)):
            row[f"{name}_samples_per_s"] = mean(rs, "samples_per_s")
            row[f"{name}_runs"] = [r.get("samples_per_s") for r in rs]
            for key in ("loop_s", "process_wall_s", "peak_rss_gib", "peak_proc_gib", "first_loss", "last_loss"):
                row[f"{name}_{key}"] = mean(rs, key)
            row[f"{name}_errors"] = sorted({r["error"] for r in rs if r.get("error")})
        row["ours_padding_fraction"] = mean(ours, "padding_fraction")
        row["ours_dataloader_wait_pct"] = mean(ours, "dataloader_wait_pct")
        if row["peer_samples_per_s"] and row["ours_samples_per_s"]:
            row["ratio"] = round(row["ours_samples_per_s"] / row["peer_samples_per_s"], 2)
        rows.append(row)
    return rows


def curve(losses: list[float], window: int) -> str:
    """Mean loss per window of steps: the curve's shape in a few numbers."""
    return " ".join(f"{statistics.mean(losses[i:i + window]):.2f}" for i in range(0, len(losses), window))


def markdown(rows: list[dict], results: list[dict], header: str) -> str:
    out = [header, "",
           "| config | FlagEmbedding samples/s (runs) | m3composer samples/s (runs) | ratio | loss first→last FE | "
           "loss first→last ours | peak RSS FE / ours (GiB, all processes) | loop s FE / ours | process wall s FE / ours |",
           "|---|---|---|---:|---|---|---|---|---|"]
    f = lambda x, d=2: "–" if x is None else f"{x:.{d}f}"   # noqa: E731
    for r in rows:
        runs = lambda k: ", ".join("fail" if v is None else f"{v:.2f}" for v in r[k])   # noqa: E731
        out.append(f"| {r['config']} | **{f(r['peer_samples_per_s'])}** ({runs('peer_runs')}) | "
                   f"**{f(r['ours_samples_per_s'])}** ({runs('ours_runs')}) | **{f(r.get('ratio'))}×** | "
                   f"{f(r['peer_first_loss'], 3)} → {f(r['peer_last_loss'], 3)} | "
                   f"{f(r['ours_first_loss'], 3)} → {f(r['ours_last_loss'], 3)} | "
                   f"{f(r['peer_peak_rss_gib'])} / {f(r['ours_peak_rss_gib'])} | "
                   f"{f(r['peer_loop_s'], 1)} / {f(r['ours_loop_s'], 1)} | "
                   f"{f(r['peer_process_wall_s'], 1)} / {f(r['ours_process_wall_s'], 1)} |")
    out += ["", "Loss curves (first repeat; mean loss per window of steps):", ""]
    for config in dict.fromkeys(r["config"] for r in results):
        for trainer in ("FlagEmbedding", "m3composer"):
            rs = [r for r in results if r["config"] == config and r["trainer"] == trainer and r.get("losses")]
            if rs:
                losses = rs[0]["losses"]
                window = 10 if len(losses) >= 50 else 4
                out.append(f"* {config} {trainer} ({window}-step windows): {curve(losses, window)}")
    extra = [r for r in results if r["trainer"].endswith("gradient checkpointing")]
    if extra:
        out += ["", "m3composer with `model.gradient_checkpointing=true` on the long-passage rows:", ""]
        out += [f"* {r['config']}: samples/s {r.get('samples_per_s')}, peak RSS {r['peak_rss_gib']:.2f} GiB "
                f"(largest process {r['peak_proc_gib']:.2f} GiB), loss {r.get('first_loss')} → {r.get('last_loss')}"
                + (f", failed: `{r['error']}`" if r.get("error") else "") for r in extra]
    errors = [(r["config"], r["trainer"], r["error"]) for r in results if r.get("error")]
    if errors:
        out += ["", "Failed runs:", ""] + [f"* {c} {t}: `{e}`" for c, t, e in errors]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/m3c-vs-fe"), help="models, data, runs, results")
    ap.add_argument("--peer-dir", type=Path, default=DEFAULT_PEER_DIR, help="the peer harness (../shared/peer)")
    ap.add_argument("--peer-venv", type=Path, default=Path(os.environ.get("PEER_VENV", "/tmp/peer-venv")),
                    help="FlagEmbedding's virtualenv (the peer's setup.sh)")
    ap.add_argument("--configs", default="tiny-1,tiny-2,big-1,big-2", help="MODEL-NPROC list")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--steps-tiny", type=int, default=STEPS["tiny"])
    ap.add_argument("--steps-big", type=int, default=STEPS["big"])
    ap.add_argument("--long-passage", default="", help="comma list of passage lengths for the 250k-vocabulary rows")
    ap.add_argument("--mem-cap-gib", type=float, default=20.0, help="address-space cap of the long-passage runs")
    ap.add_argument("--ours-override", action="append", default=[], help="extra key=value for our runs (A/B tests)")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per run")
    ap.add_argument("--smoke", action="store_true",
                    help=f"only m3composer's half of tiny-1 ({SMOKE_STEPS} step, 1 repeat) on {SMOKE_MODEL} and "
                         "synthetic rows (no peer harness needed; replaces --configs, --repeats, --long-passage)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.configs, args.repeats, args.long_passage, args.steps_tiny = "tiny-1", 1, "", SMOKE_STEPS
    configs = [c.split("-") for c in args.configs.split(",") if c]
    if args.smoke:
        sides, models, mds = ("ours",), {"tiny": SMOKE_MODEL}, prepare_smoke(args.work)
    else:
        peer_python = args.peer_venv / "bin" / "python"
        if not peer_python.exists():
            ap.error(f"no FlagEmbedding virtualenv at {args.peer_venv}: run {args.peer_dir}/setup.sh "
                     "(or pass --peer-venv)")
        prepare(args.work, args.peer_dir, peer_python,
                {m for m, _ in configs} | ({"tiny"} if args.long_passage else set()))
        sides, models, mds = ("peer", "ours"), {m: args.work / m for m in STEPS}, args.work / "mds"
    steps = {"tiny": args.steps_tiny, "big": args.steps_big}
    header = (f"Machine: {os.cpu_count()} cores, {psutil.virtual_memory().total / GIB:.0f} GiB RAM; "
              f"started {time.strftime('%Y-%m-%d %H:%M')}, load average {load_avg()}")
    print(header, flush=True)
    results = []
    for rep in range(args.repeats):
        for model, nproc in configs:
            nproc = int(nproc)
            config = f"{model} {nproc}p"
            order = sides if (rep % 2 == 0) else sides[::-1]
            for who in order:
                tag = f"{model}-{nproc}p-r{rep}"
                load = load_avg()
                if who == "peer":
                    r = run_peer(args, args.work, args.work / model, args.work / "data", nproc, steps[model], tag)
                else:
                    r = run_ours(args, args.work, models[model], mds, nproc, steps[model], tag)
                r.update(config=config, repeat=rep, load_before=load)
                results.append(r)
                print(f"[{config} r{rep}] {r['trainer']:13s} samples/s={r.get('samples_per_s')} loop_s={r.get('loop_s')} "
                      f"wall_s={r['process_wall_s']} peak_rss={r['peak_rss_gib']}GiB "
                      f"loss {r.get('first_loss')}->{r.get('last_loss')} load {load} {r.get('error', '')}", flush=True)
    for length in [int(x) for x in args.long_passage.split(",") if x]:
        model_dir, data_dir, mds = prepare_long(args.work, length)
        cap = int(args.mem_cap_gib * GIB)
        config = f"long p{length} v250k 1p"
        extra_ours = [f"data.passage_max_len={length}"]
        extra_peer = ["--passage_max_len", str(length)]
        # ours twice: as the other rows, then with gradient checkpointing (the recipe's memory setting)
        for who in ("peer", "ours", "ours+ckpt"):
            tag = f"long{length}-{who}"
            if who == "peer":
                r = run_peer(args, args.work, model_dir, data_dir, 1, 3, tag, extra_peer, mem_cap=cap)
            elif who == "ours":
                r = run_ours(args, args.work, model_dir, mds, 1, 3, tag, extra_ours, mem_cap=cap)
            else:
                r = run_ours(args, args.work, model_dir, mds, 1, 3, tag,
                             extra_ours + ["model.gradient_checkpointing=true"], mem_cap=cap)
                r["trainer"] = "m3composer + gradient checkpointing"
            r.update(config=config, repeat=0, load_before=load_avg())
            results.append(r)
            print(f"[{config}] {r['trainer']:13s} samples/s={r.get('samples_per_s')} peak_rss={r['peak_rss_gib']}GiB "
                  f"peak_proc={r['peak_proc_gib']}GiB rc={r['rc']} {r.get('error', '')}", flush=True)
    rows = summarise(results)
    text = markdown(rows, results, header + f"; finished {time.strftime('%H:%M')}, load average {load_avg()}")
    print("\n" + text)
    (args.work / "results.json").write_text(json.dumps({"rows": rows, "runs": results}, indent=1) + "\n")
    (args.work / "results.md").write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

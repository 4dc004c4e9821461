"""Largest per-device batch that trains, with and without the gradient cache; seconds per query group.

    python scripts/bench_memory.py [--lengths 2048,8192] [--models tiny-v250k,e5-small] [--group-size 8]
                                   [--steps 3] [--mem-cap-gib 20] [--max-batch 512] [--threads 1]
                                   [--cache-sequences 16] [--cache-tokens 32768] [--time-batch 2]
                                   [--out results.json] [--skip-search] [--no-checkpointing] [--phases]
                                   [--batches 1,20] [--settings uncached,cached]
    python scripts/bench_memory.py --throughput 128:64,512:32 --models e5-small [--steps 5] ...
    python scripts/bench_memory.py --peer ../shared/peer [--peer-sub-batch 1] [--peer-batches 4,6,8] [--lengths 2048] ...

Every trial is a fresh process (`--trial`) capped at `--mem-cap-gib` of address space
(`RLIMIT_AS`), so that a batch too big fails as an allocation error inside the process instead of
waking the kernel's out-of-memory killer. A trial builds the model, a batch of B queries (32 tokens)
× G passages of exactly L tokens (random ids over the model's vocabulary, real-token lengths, no
padding), and runs `--steps` training steps (ComposerM3 forward + loss + backward + AdamW step, fp32
on CPU; bf16 autocast on a GPU), unified loss with self-distillation, gradient checkpointing on (`--no-checkpointing`: off in both).
The search doubles B from 1 until a trial fails, then bisects; B is the largest that trained.

Models: `tiny-v250k` = 2 layers, hidden 64, over the real 250,002-token vocabulary (random init,
position table 8194, as BENCHMARKS.md's long-passage row); `bge-m3-shape` = BGE-M3's shape (24 layers,
hidden 1024, random init; `bge-m3-shape:N` = N layers); `e5-small` = the offline asset (12 layers,
hidden 384, vocabulary 250,002; above 512 tokens its 512 learned positions are repeated to fill a longer
table, `extend_positions`: time and memory do not depend on what the position vectors hold).

Timing (`--time-batch B`): the same batch trained cached and uncached in one process, one after the
other, alternating, 3 steps each after a warm-up step: seconds per query group (step time / B).
FlagEmbedding (`--peer PEER_DIR`, the harness of ../shared/peer with its venv from `setup.sh`): the
same search, each trial FlagEmbedding's own M3 trainer (`run_peer.sh`, 1 process, `--steps` steps)
with `--sub_batch_size` (`--peer-sub-batch`) and `--gradient_checkpointing`, unified loss with
self-distillation, on the tiny-v250k model saved as a folder (same init, e5-small's tokenizer) and
text rows whose query and passages are longer than 32 / L tokens, so that truncation makes every
sequence exactly 32 / L tokens as in our trials (its split-batch needs equal lengths: sub-batches are
padded on their own and the ColBERT vectors concatenated). Peak RSS from `/usr/bin/time -v`.

Memory breakdown: at the largest cached batch, the sizes of the cached outputs (dense `n·H`, sparse
per-position weights `n·L`, ColBERT `n·(L-1)·D`), of the loss's `(n, V)` sparse vectors (and their
gradient), and the peak RSS, next to the uncached peak.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
QUERY_LEN = 32


def build_model(name: str, max_len: int):
    import torch
    from transformers import XLMRobertaConfig, XLMRobertaModel

    from m3composer.model.m3 import XLMR_SPECIAL_IDS, M3Model
    torch.manual_seed(0)
    if name == "tiny-v250k":
        config = XLMRobertaConfig(vocab_size=250002, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=256, max_position_embeddings=max(8194, max_len + 2),
                                  type_vocab_size=1, pad_token_id=1, bos_token_id=0, eos_token_id=2)
        encoder = XLMRobertaModel(config, add_pooling_layer=False)
        return M3Model.from_encoder(encoder, special_token_ids=dict(XLMR_SPECIAL_IDS))
    if name.split(":")[0] == "bge-m3-shape":
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):   # 568M weights initialise fast there
            encoder = XLMRobertaModel(bge_m3_shape_config(name, max_len), add_pooling_layer=False)
        return M3Model.from_encoder(encoder, special_token_ids=dict(XLMR_SPECIAL_IDS))
    from m3composer.assets.build import resolve_model_dir
    m3 = M3Model.from_pretrained(resolve_model_dir("asset:e5-small"), attn_implementation="sdpa")
    extend_positions(m3.encoder, max_len)
    return m3


def bge_m3_shape_config(name: str = "bge-m3-shape", max_len: int = 8192):
    """BGE-M3's own shape (XLM-R large: 24 layers, hidden 1024, 16 heads, the 250,002 vocabulary, 8,194
    positions), randomly initialised: throughput and memory do not need trained weights.
    `bge-m3-shape:N` keeps everything but the depth (N layers), for a CPU proof of the same code."""
    from transformers import XLMRobertaConfig
    layers = int(name.split(":")[1]) if ":" in name else 24
    return XLMRobertaConfig(vocab_size=250002, hidden_size=1024, num_hidden_layers=layers, num_attention_heads=16,
                            intermediate_size=4096, max_position_embeddings=max(8194, max_len + 2),
                            type_vocab_size=1, pad_token_id=1, bos_token_id=0, eos_token_id=2,
                            attn_implementation="sdpa")


def extend_positions(encoder, length: int) -> None:
    """Grow a BERT or XLM-R position table to hold sequences of `length` tokens by repeating its
    learned positions (for XLM-R those after the padding offset), as long-context models are started;
    a no-op when it is large enough. What a step costs in time and memory does not depend on the
    position vectors' values."""
    import torch
    embeddings = encoder.embeddings
    old = embeddings.position_embeddings
    padding_idx = getattr(embeddings, "padding_idx", None)     # XLM-R counts positions from padding_idx + 1
    offset = 0 if padding_idx is None else padding_idx + 1
    size = length + offset
    if old.num_embeddings >= size:
        return
    learned = old.weight.data[offset:]
    table = torch.nn.Embedding(size, old.embedding_dim, padding_idx=old.padding_idx)
    table.weight.data[:offset] = old.weight.data[:offset]
    repeats = -(-(size - offset) // learned.shape[0])
    table.weight.data[offset:] = learned.repeat(repeats, 1)[:size - offset]
    embeddings.position_embeddings = table
    embeddings.register_buffer("position_ids", torch.arange(size).expand((1, -1)), persistent=False)
    embeddings.register_buffer("token_type_ids", torch.zeros((1, size), dtype=torch.long), persistent=False)
    encoder.config.max_position_embeddings = size


def make_batch(batch_size: int, group_size: int, length: int, vocab: int, device):
    import torch
    g = torch.Generator().manual_seed(batch_size * 1000 + length)

    def ids(rows: int, width: int):
        x = torch.randint(4, vocab, (rows, width), generator=g)
        x[:, 0], x[:, -1] = 0, 2
        return x.to(device), torch.ones_like(x).to(device)

    q_ids, q_mask = ids(batch_size, QUERY_LEN)
    p_ids, p_mask = ids(batch_size * group_size, length)
    return {"query_input_ids": q_ids, "query_attention_mask": q_mask, "passage_input_ids": p_ids,
            "passage_attention_mask": p_mask, "teacher_scores": torch.zeros(batch_size, group_size),
            "has_teacher_scores": torch.tensor(False), "is_parallel": torch.tensor(False),
            "row_ids": torch.arange(batch_size)}


def build_composer_model(args, cached: bool):
    import torch

    from m3composer.config import LossConfig
    from m3composer.model.composer_model import ComposerM3
    from m3composer.model.gradcache import GradientCacheBudget
    from m3composer.train import loss_settings
    m3 = build_model(args.model, args.length)
    budget = GradientCacheBudget(args.cache_sequences, args.cache_tokens) if cached else None
    model = ComposerM3(m3, **loss_settings(LossConfig(use_self_distill=True)), gradient_checkpointing=not args.no_checkpointing,
                       gradient_cache=budget, train_group_size=args.group_size).train()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    return model, optimizer, device


class PhaseMemory:
    """Peak resident memory per phase of a step, sampled from /proc/self/statm every `every` seconds
    in a thread (`--phases`): where the memory of a step goes, measured rather than computed."""

    def __init__(self, every: float = 0.01):
        import threading
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.name, self.peaks, self.starts, self.order = "start", {}, {}, []
        self.lock, self.stop = threading.Lock(), threading.Event()
        self.thread = threading.Thread(target=self._sample, args=(every,), daemon=True)
        self.thread.start()

    def rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def _sample(self, every: float) -> None:
        while not self.stop.wait(every):
            self.note()

    def note(self) -> None:
        rss = self.rss()
        with self.lock:
            self.peaks[self.name] = max(self.peaks.get(self.name, 0), rss)

    def enter(self, name: str) -> str:
        """Start phase `name` (the previous one ends); returns the previous name."""
        rss = self.rss()
        with self.lock:
            self.peaks[self.name] = max(self.peaks.get(self.name, 0), rss)
            previous, self.name = self.name, name
            if name not in self.starts:
                self.starts[name] = rss
                self.order.append(name)
            self.peaks[name] = max(self.peaks.get(name, 0), rss)
        return previous

    def wrap(self, owner, method: str, name: str) -> None:
        """Run `owner.method` as phase `name`, going back to the caller's phase after it."""
        inner = getattr(owner, method)

        def wrapped(*a, **k):
            previous = self.enter(name)
            try:
                return inner(*a, **k)
            finally:
                self.enter(previous)
        setattr(owner, method, wrapped)

    def report(self) -> list[dict]:
        self.stop.set()
        self.thread.join()
        gib = lambda b: round(b / 2 ** 30, 3)
        return [{"phase": n, "rss_at_start_gib": gib(self.starts[n]), "peak_rss_gib": gib(self.peaks[n])}
                for n in self.order]


def train_steps(model, optimizer, batch, steps: int, phases: Optional[PhaseMemory] = None) -> list[float]:
    import torch
    device_type = batch["query_input_ids"].device.type
    times = []
    mark = phases.enter if phases is not None else (lambda name: None)
    for _ in range(steps):
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=device_type == "cuda"):
            mark("forward (encode)")
            outputs = model(batch)
            mark("loss forward")
            loss = model.loss(outputs, batch)["total"]
        mark("backward")
        loss.backward()
        mark("optimizer step")
        optimizer.step()
        mark("between steps")
        if device_type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20   # Linux: KiB


def trial(args) -> dict:
    """One process: train `--steps` steps at batch `--batch`; print a JSON line."""
    import torch
    torch.set_num_threads(args.threads)
    phases = None
    if args.phases:
        from m3composer.model import gradcache
        phases = PhaseMemory()
        phases.enter("model, optimizer and batch")
        phases.wrap(gradcache._ChunkedEncoding, "encode_without_graph", "cache pass 1: encode without graph")
        phases.wrap(gradcache._ChunkedEncoding, "replay", "cache pass 3: replay chunks with graph + backward")
    model, optimizer, device = build_composer_model(args, args.cached)
    batch = make_batch(args.batch, args.group_size, args.length, model.model.vocab_size, device)
    times = train_steps(model, optimizer, batch, args.steps, phases)
    out = {"ok": True, "step_s": times, "peak_rss_gib": peak_rss_gib()}
    if phases is not None:
        out["phases"] = phases.report()
    if device.type == "cuda":
        out["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
    if args.cached:
        n = args.batch * (1 + args.group_size)
        hidden, colbert_dim = model.model.encoder.config.hidden_size, model.model.colbert_linear.out_features
        rows_width = args.batch * QUERY_LEN + args.batch * args.group_size * args.length
        out["cached_outputs_gib"] = 4 * (n * hidden + rows_width + (rows_width - n) * colbert_dim) / 2 ** 30
        out["sparse_vocab_gib"] = 4 * n * model.model.vocab_size / 2 ** 30
    return out


def timing(args) -> dict:
    """Cached and uncached on the same batch in one process, alternating: seconds per query group."""
    import torch
    torch.set_num_threads(args.threads)
    runs = {flag: build_composer_model(args, flag) for flag in (False, True)}
    batch = make_batch(args.batch, args.group_size, args.length, runs[False][0].model.vocab_size, runs[False][2])
    per_group = {False: [], True: []}
    for flag in (False, True):
        train_steps(runs[flag][0], runs[flag][1], batch, 1)               # warm-up
    for repeat in range(3):
        for flag in ((False, True) if repeat % 2 == 0 else (True, False)):
            per_group[flag] += [t / args.batch for t in train_steps(runs[flag][0], runs[flag][1], batch, 1)]
    uncached, cached = (sorted(per_group[f])[1] for f in (False, True))   # median of 3
    return {"ok": True, "uncached_s_per_group": uncached, "cached_s_per_group": cached, "ratio": cached / uncached}


# Dense bf16 peak (TFLOP/s) of common GPUs, by a part of their name; others: BF16_PEAK_TFLOPS.
BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "L4": 121.0,
                    "4090": 165.0}


def step_flops(model, batch: int, group_size: int, length: int, cached: bool, checkpointing: bool) -> float:
    """Encoder FLOPs one training step executes: a forward costs 2·params per token (embedding tables
    left out) plus attention 4·layers·H·L per token; a step is 3 forwards' worth (forward + a backward
    of 2), one more with gradient checkpointing (the recomputed forward) and one more with the cache (its
    no-graph forward). The ColBERT max-sim and the sparse scores are left out."""
    cfg = model.model.encoder.config
    params = sum(p.numel() for n, p in model.model.encoder.named_parameters() if "embeddings" not in n)
    tokens = batch * (QUERY_LEN + group_size * length)
    attn = 4 * cfg.num_hidden_layers * cfg.hidden_size * (batch * QUERY_LEN ** 2 + batch * group_size * length ** 2)
    return (2 * params * tokens + attn) * (3 + checkpointing + cached)


def throughput(args) -> list[dict]:
    """`--throughput LENGTH:BATCH,...`: per bucket, uncached then cached, in one process: the median
    step of `--steps` timed steps after 2 warm-up steps, samples (query groups) per second, TFLOP/s
    executed (`step_flops`) and its share of the GPU's bf16 peak, and peak memory (GPU when there is
    one, else the process's peak RSS so far)."""
    import torch
    torch.set_num_threads(args.threads)
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    peak = os.environ.get("BF16_PEAK_TFLOPS") or next((v for k, v in BF16_PEAK_TFLOPS.items() if k in name), None)
    rows = []
    for bucket in args.throughput.split(","):
        args.length, batch = (int(x) for x in bucket.split(":"))
        for cached in (False, True):
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            model, optimizer, device = build_composer_model(args, cached)
            data = make_batch(batch, args.group_size, args.length, model.model.vocab_size, device)
            train_steps(model, optimizer, data, 2)
            step = sorted(train_steps(model, optimizer, data, args.steps))[args.steps // 2]
            tflops = step_flops(model, batch, args.group_size, args.length, cached, not args.no_checkpointing) / step / 1e12
            rows.append({"device": name, "model": args.model, "length": args.length, "batch": batch, "cached": cached,
                         "step_s": step, "samples_per_s": batch / step, "tflops": tflops,
                         "tflops_vs_bf16_peak": tflops / float(peak) if peak else None,
                         "peak_memory_gib": (torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda"
                                             else peak_rss_gib())})
            print(json.dumps(rows[-1]), flush=True)
            del model, optimizer, data
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def largest_trained(trials: list[dict]) -> int:
    """The largest batch among `trials` that trained (0 if none did)."""
    return max([t["batch"] for t in trials if t["ok"]], default=0)


def last_error(text: str) -> str:
    """The last line of a failed trial's output that names an error (else its tail), cut to 300."""
    err = [line for line in text.splitlines() if "Error" in line or "error" in line]
    return (err[-1] if err else text[-300:]).strip()[:300]


def run_trial(args, batch: int, cached: bool, mode: str = "--trial") -> dict:
    cmd = [sys.executable, __file__, mode, "--model", args.model, "--length", str(args.length), "--batch", str(batch),
           "--group-size", str(args.group_size), "--steps", str(args.steps), "--threads", str(args.threads),
           *(["--no-checkpointing"] if args.no_checkpointing else []), *(["--phases"] if args.phases else []),
           "--cache-sequences", str(args.cache_sequences),
           "--cache-tokens", str(args.cache_tokens if args.cache_tokens is not None else 0)]
    if cached:
        cmd.append("--cached")
    cap = int(args.mem_cap_gib * 2 ** 30)

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS=str(args.threads))
    start = time.monotonic()
    done = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=limit, env=env, cwd=REPO)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode == 0 and lines:
        result = json.loads(lines[-1])
    else:
        result = {"ok": False, "error": last_error(done.stderr)}
    result.update(batch=batch, cached=cached, wall_s=round(time.monotonic() - start, 1))
    print(json.dumps(result), flush=True)
    return result


def largest_batch(args, cached: Optional[bool], trial_fn=None) -> tuple[int, list[dict]]:
    """Doubling then bisection: the largest B that trains (0 if B=1 fails)."""
    trial_fn = trial_fn or (lambda b: run_trial(args, b, cached))
    trials, good, bad = [], 0, None
    b = 1
    while b <= args.max_batch:
        r = trial_fn(b)
        trials.append(r)
        if not r["ok"]:
            bad = b
            break
        good, b = b, b * 2
    if bad is None:
        return good, trials
    while bad - good > 1:
        mid = (good + bad) // 2
        r = trial_fn(mid)
        trials.append(r)
        good, bad = (mid, bad) if r["ok"] else (good, mid)
    return good, trials


def peer_assets(args, work: Path) -> tuple[Path, Path]:
    """The tiny-v250k model as a FlagEmbedding-loadable folder and a JSONL of equal-length rows."""
    import shutil

    from pydoc_data.topics import topics

    from m3composer.assets.build import resolve_model_dir
    largest = max(int(b) for b in args.peer_batches.split(",")) if args.peer_batches else args.max_batch
    rows = largest * (args.steps + 1)                # every step a batch of its own rows
    model_dir, data_dir = work / f"tiny-v250k-{args.length}", work / f"data-{args.length}-r{rows}"
    if not (model_dir / "config.json").is_file():
        encoder = build_model("tiny-v250k", args.length).encoder
        encoder.save_pretrained(model_dir)
        e5 = Path(resolve_model_dir("asset:e5-small"))
        for name in ("sentencepiece.bpe.model", "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"):
            shutil.copy(e5 / name, model_dir / name)
    if not data_dir.is_dir():
        text = " ".join(" ".join(topics[t].split()) for t in sorted(topics))
        width = 8 * args.length                      # characters: well over L tokens
        data_dir.mkdir(parents=True)
        with open(data_dir / "equal_len-0-99999.jsonl", "w") as out:
            for r in range(rows):
                at = lambda j: (r * 977 + j * 7919) % (len(text) - width)
                passages = [text[at(j):at(j) + width] for j in range(args.group_size)]
                out.write(json.dumps({"query": text[at(99):at(99) + 600], "pos": passages[:1],
                                      "neg": passages[1:]}) + "\n")
    return model_dir, data_dir


def run_peer_trial(args, batch: int, model_dir: Path, data_dir: Path, work: Path) -> dict:
    """FlagEmbedding's trainer at batch `batch` under the address-space cap (`--peer`)."""
    import re
    import shutil

    out = work / f"run-L{args.length}-b{batch}"
    shutil.rmtree(out, ignore_errors=True)
    cmd = ["/usr/bin/time", "-v", "bash", str(Path(args.peer) / "run_peer.sh"), str(model_dir), str(data_dir),
           str(out), str(args.steps), "--train_group_size", str(args.group_size), "--query_max_len", str(QUERY_LEN),
           "--passage_max_len", str(args.length), "--sub_batch_size", str(args.peer_sub_batch),
           "--gradient_checkpointing", "True"]
    cap = int(args.mem_cap_gib * 2 ** 30)
    env = dict(os.environ, BATCH=str(batch), THREADS=str(args.threads))
    start = time.monotonic()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env,
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (cap, cap)))
    peak = re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr)
    result = {"ok": done.returncode == 0 and (out / "peer_result.json").is_file(), "batch": batch, "cached": "peer",
              "peak_rss_gib": int(peak.group(1)) / 2 ** 20 if peak else None,
              "wall_s": round(time.monotonic() - start, 1)}
    if result["ok"]:
        peer = json.loads((out / "peer_result.json").read_text())
        result["train_s_per_step"] = peer["wall_s"] / max(1, peer["steps"])
    else:
        log = (out / "peer_train.log").read_text() if (out / "peer_train.log").is_file() else done.stdout
        result["error"] = last_error(log)
    shutil.rmtree(out, ignore_errors=True)
    print(json.dumps(result), flush=True)
    return result


def largest_peer_batch(args) -> tuple[int, list[dict]]:
    """The search (or, with `--peer-batches`, just those batches) over FlagEmbedding trials."""
    work = Path(args.out).with_suffix("") if args.out else Path("/tmp/bench-memory-peer")
    work.mkdir(parents=True, exist_ok=True)
    model_dir, data_dir = peer_assets(args, work)
    if args.peer_batches:
        trials = [run_peer_trial(args, int(b), model_dir, data_dir, work) for b in args.peer_batches.split(",")]
        return largest_trained(trials), trials
    return largest_batch(args, cached=None, trial_fn=lambda b: run_peer_trial(args, b, model_dir, data_dir, work))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--trial", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--timing", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", default="tiny-v250k", help=argparse.SUPPRESS)
    p.add_argument("--length", type=int, default=2048, help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--cached", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--phases", action="store_true",
                   help="record each trial's peak RSS per phase of a step (sampled every 10 ms)")
    p.add_argument("--models", default="tiny-v250k,e5-small")
    p.add_argument("--lengths", default="2048,8192")
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--mem-cap-gib", type=float, default=20.0)
    p.add_argument("--max-batch", type=int, default=512)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cache-sequences", type=int, default=16)
    p.add_argument("--cache-tokens", type=int, default=32768, help="0 = rows only")
    p.add_argument("--time-batch", type=int, default=2, help="batch of the side-by-side timing; 0 = skip")
    p.add_argument("--skip-search", action="store_true", help="only the timing")
    p.add_argument("--no-checkpointing", action="store_true",
                   help="gradient checkpointing off in both settings (default on: the strongest uncached setting)")
    p.add_argument("--batches", default=None,
                   help="run these batches (e.g. 1,20) instead of the search; largest_batch = the largest that trained")
    p.add_argument("--settings", default="uncached,cached", help="which of uncached,cached to search or run")
    p.add_argument("--throughput", default=None, metavar="LENGTH:BATCH,...",
                   help="instead of the search: samples/s, TFLOP/s and peak memory per bucket, uncached and cached, "
                        "for the first of --models (scripts/gpu_check.sh)")
    p.add_argument("--peer", default=None, metavar="PEER_DIR",
                   help="search FlagEmbedding's largest batch instead (../shared/peer; module doc)")
    p.add_argument("--peer-sub-batch", type=int, default=1, help="FlagEmbedding's --sub_batch_size (default 1)")
    p.add_argument("--peer-batches", default=None, help="with --peer: run these batches (e.g. 4,6,8), no search")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    args.cache_tokens = args.cache_tokens or None
    if args.trial or args.timing:
        print(json.dumps(trial(args) if args.trial else timing(args)), flush=True)
        return 0
    if args.throughput:
        args.model = args.models.split(",")[0]
        rows = throughput(args)
        if args.out:
            Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")
        return 0
    results = []
    if args.peer:
        for length in [int(x) for x in args.lengths.split(",")]:
            args.length = length
            best, trials = largest_peer_batch(args)
            results.append({"model": "tiny-v250k", "length": length, "trainer": "FlagEmbedding",
                            "sub_batch_size": args.peer_sub_batch, "mem_cap_gib": args.mem_cap_gib,
                            "largest_batch": best, "trials": trials})
            print(json.dumps({k: v for k, v in results[-1].items() if k != "trials"}), flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
        return 0
    for model in args.models.split(","):
        for length in [int(x) for x in args.lengths.split(",")]:
            args.model, args.length = model, length
            row = {"model": model, "length": length, "group_size": args.group_size, "steps": args.steps,
                   "mem_cap_gib": args.mem_cap_gib}
            if args.time_batch:
                row["timing"] = run_trial(args, args.time_batch, False, mode="--timing")
            if not args.skip_search:
                for cached in [setting == "cached" for setting in args.settings.split(",")]:
                    if args.batches:
                        trials = [run_trial(args, int(b), cached) for b in args.batches.split(",")]
                        best = largest_trained(trials)
                    else:
                        best, trials = largest_batch(args, cached)
                    row["cached" if cached else "uncached"] = {"largest_batch": best, "trials": trials}
            results.append(row)
            print(json.dumps({k: v for k, v in row.items() if k not in ("cached", "uncached")}), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Largest per-device batch that trains, with and without the gradient cache; seconds per query group.

    python scripts/bench_memory.py [--lengths 2048,8192] [--models tiny-v250k,e5-small] [--group-size 8]
                                   [--steps 3] [--mem-cap-gib 20] [--max-batch 512] [--threads 1]
                                   [--cache-sequences 16] [--cache-tokens 32768] [--time-batch 2]
                                   [--out results.json] [--skip-search] [--no-checkpointing]
    python scripts/bench_memory.py --peer ../shared/peer [--peer-sub-batch 1] [--peer-batches 4,6,8] [--lengths 2048] ...

Every trial is a fresh process (`--trial`) capped at `--mem-cap-gib` of address space
(`RLIMIT_AS`), so that a batch too big fails as an allocation error inside the process instead of
waking the kernel's out-of-memory killer. A trial builds the model, a batch of B queries (32 tokens)
× G passages of exactly L tokens (random ids over the model's vocabulary, real-token lengths, no
padding), and runs `--steps` training steps (ComposerM3 forward + loss + backward + AdamW step, fp32
on CPU; bf16 autocast on a GPU), unified loss with self-distillation, gradient checkpointing on (`--no-checkpointing`: off in both).
The search doubles B from 1 until a trial fails, then bisects; B is the largest that trained.

Models: `tiny-v250k` = 2 layers, hidden 64, over the real 250,002-token vocabulary (random init,
position table 8194, as BENCHMARKS.md's long-passage row); `e5-small` = the offline asset (12 layers,
hidden 384, position table 514: lengths above 512 are skipped for it unless the folder allows them).

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
    from m3composer.assets.build import resolve_model_dir
    return M3Model.from_pretrained(resolve_model_dir("asset:e5-small"), attn_implementation="sdpa")


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

    from m3composer.model.composer_model import ComposerM3
    from m3composer.model.gradcache import GradientCacheBudget
    m3 = build_model(args.model, args.length)
    budget = GradientCacheBudget(args.cache_sequences, args.cache_tokens) if cached else None
    model = ComposerM3(m3, use_self_distill=True, gradient_checkpointing=not args.no_checkpointing, gradient_cache=budget,
                       train_group_size=args.group_size).train()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    return model, optimizer, device


def train_steps(model, optimizer, batch, steps: int) -> list[float]:
    import torch
    device_type = batch["query_input_ids"].device.type
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=device_type == "cuda"):
            outputs = model(batch)
            loss = model.loss(outputs, batch)["total"]
        loss.backward()
        optimizer.step()
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
    model, optimizer, device = build_composer_model(args, args.cached)
    batch = make_batch(args.batch, args.group_size, args.length, model.model.vocab_size, device)
    times = train_steps(model, optimizer, batch, args.steps)
    out = {"ok": True, "step_s": times, "peak_rss_gib": peak_rss_gib()}
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


def last_error(text: str) -> str:
    """The last line of a failed trial's output that names an error (else its tail), cut to 300."""
    err = [line for line in text.splitlines() if "Error" in line or "error" in line]
    return (err[-1] if err else text[-300:]).strip()[:300]


def run_trial(args, batch: int, cached: bool, mode: str = "--trial") -> dict:
    cmd = [sys.executable, __file__, mode, "--model", args.model, "--length", str(args.length), "--batch", str(batch),
           "--group-size", str(args.group_size), "--steps", str(args.steps), "--threads", str(args.threads),
           *(["--no-checkpointing"] if args.no_checkpointing else []),
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
        return max([t["batch"] for t in trials if t["ok"]], default=0), trials
    return largest_batch(args, cached=None, trial_fn=lambda b: run_peer_trial(args, b, model_dir, data_dir, work))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--trial", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--timing", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", default="tiny-v250k", help=argparse.SUPPRESS)
    p.add_argument("--length", type=int, default=2048, help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--cached", action="store_true", help=argparse.SUPPRESS)
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
            if model == "e5-small" and length > 512:
                print(f"skip e5-small at {length}: its position table has 514 entries", flush=True)
                continue
            args.model, args.length = model, length
            row = {"model": model, "length": length, "group_size": args.group_size, "steps": args.steps,
                   "mem_cap_gib": args.mem_cap_gib}
            if args.time_batch:
                row["timing"] = run_trial(args, args.time_batch, False, mode="--timing")
            if not args.skip_search:
                for cached in (False, True):
                    best, trials = largest_batch(args, cached)
                    row["cached" if cached else "uncached"] = {"largest_batch": best, "trials": trials}
            results.append(row)
            print(json.dumps({k: v for k, v in row.items() if k not in ("cached", "uncached")}), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Evaluation and mining over a corpus of 200,000 passages (issue 33's measured goals), side by side in one run.

    python scripts/bench_corpus.py [--passages 200000] [--queries 1000] [--exact-queries 100]
                                   [--model asset:tiny-xlmr] [--quality-model asset:e5-small]
                                   [--quality-passages 5000] [--quality-queries 100]
                                   [--ranks 1[,2]] [--work runs/bench_corpus] [--smoke]

1. **The corpus**, built offline and deterministically from text the installed packages ship (as
   `m3c sample-data` is, `sample_data/sources.py`): the docstrings of every Python file of the
   standard library and of every package in site-packages (parsed with `ast`, never imported), their
   comments (runs of whole-line `#` comments), the `.rst`/`.md`/`.txt` files of those packages, and
   pydoc's topics. One stream per source (the
   stdlib, pydoc, each top-level site-packages entry); the streams are read round-robin, one file
   at a time, so any size is a mix of every package and not the first packages in alphabetical
   order; a source stops once it gave `--max-share` of the passages (25 %: the oci SDK's generated
   docstrings alone would be 45 % of 200k). A text is cut at blank lines into passages of at most
   `--max-words` words (a longer paragraph into windows), passages under `--min-words` are dropped,
   and duplicates (same words, case-insensitive) are dropped, until `--passages` are kept.
   **Queries** are docstring summaries (and pydoc section titles), as in the sample data: the
   summary is the query and the rest of the docstring, kept as one passage of the corpus, is its
   one relevant passage; the other passages are distractors of the same kind of text, so a query is
   not separable by style. Candidates whose summary is not unique are dropped; `--queries` are
   taken evenly spaced over the candidates. Written as a BEIR folder (`m3c eval`) plus `mine.jsonl`
   (`{"query", "pos"}`, the `m3c mine` input; its `--corpus` is the BEIR folder), under
   `WORK/corpus-N-Q/`, once: a later run with the same settings reuses it (`info.json` records them,
   the sources' counts and the build time).
2. **The phases**, each in its own process (its time and peak RSS are its own; the peak RSS is the
   largest process of the phase, from `os.wait4`), the `m3c` command line where it reports what is
   measured, else the Python API in a child of this script:
   - `encode`: the encoder alone (`search.encode_dense`, what `m3c mine` calls), passages/s;
   - `eval dense exact, N ranks`: `m3c eval --heads dense` over the corpus (a streamed encode plus a
     matmul per batch), with 1 rank and, with `--ranks 1,2`, under `composer -n 2 -m m3composer.cli`;
     the 2-rank row is skipped with the reason when it fails or its output does not record a world
     size (an `m3c eval` that does not shard over ranks would run the whole corpus on each rank);
   - `store build` / `store reuse`: `m3c eval --heads dense,sparse --search rerank --corpus-cache
     DIR` twice: its size on disk (in all, per passage) and the second run's time against the first's;
   - `re-rank`: `m3c eval --search rerank --agreement --corpus-cache DIR` with all heads on the
     first `--exact-queries` queries: the re-rank's time against exact search's and the agreement
     (recall of the exact top-10 among the re-ranked top-10) per head; exact search encodes the
     whole corpus with every head (ColBERT vectors are not stored), whatever the number of queries;
   - `mine`: `mining.mine` with the dense head over the corpus (a child of this script: its summary
     splits encoding from search), passages/s against the encoder's (goal: within 2x);
   - `quality` (`--quality-model`, default e5-small; `none` skips it): the re-rank phase on a subset
     (`--quality-passages` passages including the relevant ones of the first `--quality-queries`
     queries) with a trained model: metrics per head and the agreement at the default K.
3. **The projection** to 8.8 M passages on 8 GPUs, on paper: the measured per-passage costs (store
   bytes, non-zero lexical terms, tokens) with BGE-M3's sizes (1,024 dims), the formulas shown.

The report (Markdown) is printed and written to `WORK/report.md`, the numbers to `WORK/results.json`.
Timings need an idle machine. `--smoke`: 500 passages, 10 queries, passages cut at 64 tokens, the tiny
model everywhere (a 200-passage quality subset), the 1-rank phases in this process: every phase in well
under a minute (the suite's check).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Iterator, Optional

REPO = Path(__file__).resolve().parents[1]
CORPUS_FORMAT = 1
SMOKE = {"passages": 500, "queries": 10, "exact_queries": 5, "quality_passages": 200, "quality_queries": 5,
         "passage_max_len": 64}
# Directories that hold tests, caches or other interpreters' packages, not documentation.
SKIP_DIRS = {"test", "tests", "idle_test", "__pycache__", "site-packages", "dist-packages"}
TEXT_SUFFIXES = (".rst", ".md", ".txt")
# BGE-M3's sizes for the projection: dense and ColBERT vectors of 1,024 dims.
BGE_M3_DIM = 1024
PROJECT_PASSAGES = 8_800_000
PROJECT_GPUS = 8


# --- the corpus -------------------------------------------------------------------------------

def normalise(text: str) -> str:
    return " ".join(text.lower().split())


def chunk_passages(text: str, max_words: int, min_words: int) -> list[str]:
    """`text` cut at blank lines, paragraphs packed into passages of at most `max_words` words (a
    longer paragraph into windows of `max_words`), whitespace flattened; passages under `min_words` dropped."""
    passages: list[list[str]] = []
    current: list[str] = []
    for paragraph in re.split(r"\n\s*\n", text):
        words = paragraph.split()
        if current and len(current) + len(words) > max_words:
            passages.append(current)
            current = []
        while len(words) > max_words:
            passages.append(words[:max_words])
            words = words[max_words:]
        current = current + words
    passages.append(current)
    return [" ".join(words) for words in passages if len(words) >= min_words]


def _walk(root: Path) -> Iterator[Path]:
    """Files under `root` (a folder or one file) in sorted order, SKIP_DIRS and hidden folders left out."""
    if root.is_file():
        yield root
        return
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith(".")
                             and not d.endswith((".dist-info", ".egg-info")))
        for name in sorted(filenames):
            yield Path(dirpath, name)


def comment_blocks(path: Path) -> list[str]:
    """The runs of consecutive whole-line `#` comments of a Python file, `#` removed (a blank
    comment line is a paragraph break). Read by lines, not `tokenize`: a `#` line inside a string
    is rare and is text too."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (UnicodeDecodeError, OSError):
        return []
    blocks, current = [], []
    for line in lines + [""]:
        stripped = line.strip()
        if stripped.startswith("#") and not stripped.startswith("#!"):
            current.append(stripped.lstrip("#").strip())
        elif current:
            blocks.append("\n".join(text if text else "\n" for text in current))
            current = []
    return blocks


def file_texts(path: Path, base: Path, max_words: int, min_words: int) -> Iterator[tuple[str, str, Optional[str]]]:
    """`(title, passage, query or None)` of one file: a Python file's docstrings (a docstring whose
    summary is a query and whose body fits one passage gives `(module, body, summary)`), a text
    file's passages."""
    from m3composer.sample_data.sources import python_docstrings, split_summary

    relative = path.relative_to(base)
    if path.suffix == ".py":
        module = ".".join(relative.with_suffix("").parts).removesuffix(".__init__")
        for _, doc in python_docstrings(path, module):
            summary, body = split_summary(doc)
            body_passages = chunk_passages(body, max_words, min_words)
            if 4 <= len(summary.split()) <= 32 and len(body_passages) == 1:
                yield module, body_passages[0], summary
            else:
                for passage in chunk_passages(doc, max_words, min_words):
                    yield module, passage, None
        for block in comment_blocks(path):
            for passage in chunk_passages(block, max_words, min_words):
                yield module, passage, None
    elif path.suffix in TEXT_SUFFIXES:
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            return
        for passage in chunk_passages(text, max_words, min_words):
            yield str(relative), passage, None


def text_streams(max_words: int, min_words: int) -> list[tuple[str, Iterator[list[tuple[str, str, Optional[str]]]]]]:
    """`(name, iterator of one file's texts at a time)` per source: pydoc's topics, the stdlib, and
    each top-level entry of site-packages (its loose modules together), in sorted order."""
    from m3composer.sample_data.sources import pydoc_sections, stdlib_dir

    def pydoc() -> Iterator[list[tuple[str, str, Optional[str]]]]:
        for item in pydoc_sections():
            passages = chunk_passages(item.passage, max_words, min_words)
            yield ([("", passages[0], item.query)] if len(passages) == 1 else [("", p, None) for p in passages])

    def files(roots: list[Path], base: Path) -> Iterator[list[tuple[str, str, Optional[str]]]]:
        for root in roots:
            for path in _walk(root):
                if path.suffix == ".py" or path.suffix in TEXT_SUFFIXES:
                    yield list(file_texts(path, base, max_words, min_words))

    streams = [("pydoc", pydoc()), ("stdlib", files([stdlib_dir()], stdlib_dir()))]
    for site in sorted({Path(sysconfig.get_paths()[k]) for k in ("purelib", "platlib")}):
        entries = sorted(e for e in site.iterdir() if not e.name.startswith((".", "_"))
                         and not e.name.endswith((".dist-info", ".egg-info", ".pth")))
        modules = [e for e in entries if e.is_file() and e.suffix == ".py"]
        if modules:
            streams.append((f"{site.name}/*.py", files(modules, site)))
        streams += [(e.name, files([e], site)) for e in entries if e.is_dir()]
    return streams


def build_corpus(out: Path, passages: int, queries: int, max_words: int, min_words: int,
                 max_share: float = 1.0) -> dict:
    """Write the BEIR folder and `mine.jsonl` (module doc, 1) into `out`; returns its `info.json`.
    A source stops being read once it gave `max_share` of the passages."""
    started = time.perf_counter()
    cap = max(1, int(max_share * passages))
    kept: list[tuple[str, str]] = []              # (title, text)
    seen: set[bytes] = set()
    candidates: list[tuple[str, int]] = []        # (query, index of its relevant passage)
    per_source: Counter = Counter()
    streams = text_streams(max_words, min_words)
    while streams and len(kept) < passages:
        alive = []
        for name, stream in streams:
            batch = next(stream, None)
            if batch is None:
                continue
            for title, text, query in batch:
                if len(kept) >= passages or per_source[name] >= cap:
                    break
                key = hashlib.blake2b(normalise(text).encode(), digest_size=12).digest()
                if key in seen:
                    continue
                seen.add(key)
                if query is not None:
                    candidates.append((query, len(kept)))
                kept.append((title, text))
                per_source[name] += 1
            if per_source[name] < cap:
                alive.append((name, stream))
            if len(kept) >= passages:
                break
        streams = alive
    if len(kept) < passages:
        raise SystemExit(f"the installed packages give only {len(kept):,} passages (asked for {passages:,})")
    summaries = Counter(normalise(q) for q, _ in candidates)
    unique = [(q, i) for q, i in candidates if summaries[normalise(q)] == 1]
    if len(unique) < queries:
        raise SystemExit(f"only {len(unique):,} queries with one relevant passage (asked for {queries:,})")
    chosen = [unique[i * len(unique) // queries] for i in range(queries)]
    out.mkdir(parents=True)
    (out / "qrels").mkdir()
    with (out / "corpus.jsonl").open("w") as f:
        for i, (title, text) in enumerate(kept):
            f.write(json.dumps({"_id": f"p{i}", "title": title, "text": text}, ensure_ascii=False) + "\n")
    with (out / "queries.jsonl").open("w") as f:
        f.writelines(json.dumps({"_id": f"q{n}", "text": q}, ensure_ascii=False) + "\n" for n, (q, _) in enumerate(chosen))
    with (out / "qrels" / "test.tsv").open("w") as f:
        f.write("query-id\tcorpus-id\tscore\n")
        f.writelines(f"q{n}\tp{i}\t1\n" for n, (_, i) in enumerate(chosen))
    from m3composer.retrieval.beir import doc_text

    with (out / "mine.jsonl").open("w") as f:
        f.writelines(json.dumps({"query": q, "pos": [doc_text(*kept[i])]}, ensure_ascii=False) + "\n" for q, i in chosen)
    return {"format": CORPUS_FORMAT, "passages": passages, "queries": queries, "max_words": max_words,
            "min_words": min_words, "max_share": max_share, "python": platform.python_version(),
            "words": sum(len(t.split()) for _, t in kept), "query_candidates": len(unique),
            "corpus_bytes": (out / "corpus.jsonl").stat().st_size, "per_source": dict(per_source.most_common()),
            "build_s": round(time.perf_counter() - started, 1)}


def ensure_corpus(work: Path, passages: int, queries: int, max_words: int, min_words: int,
                  max_share: float) -> tuple[Path, dict, bool]:
    """`(folder, info, reused)`: the corpus of these settings under `work`, built (in a temporary
    folder, then renamed) when no finished one is there."""
    from m3composer.fsutil import publish_dir

    folder = work / f"corpus-{passages}-{queries}-w{min_words}-{max_words}-s{max_share:g}"
    settings = {"format": CORPUS_FORMAT, "passages": passages, "queries": queries, "max_words": max_words,
                "min_words": min_words, "max_share": max_share, "python": platform.python_version()}
    info_path = folder / "info.json"
    if info_path.exists():
        info = json.loads(info_path.read_text())
        if {k: info.get(k) for k in settings} == settings:
            return folder, info, True
    work.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=work))
    info = build_corpus(building / "c", passages, queries, max_words, min_words, max_share)
    (building / "c" / "info.json").write_text(json.dumps(info, indent=1) + "\n")
    publish_dir(building / "c", folder)
    shutil.rmtree(building, ignore_errors=True)
    return folder, info, False


def subset_corpus(corpus: Path, out: Path, passages: int, queries: int) -> Path:
    """A BEIR folder of the first `queries` queries and a corpus of the first `passages` passages plus
    their relevant ones (corpus order kept), for the quality phase; made once."""
    if (out / "qrels" / "test.tsv").exists():
        return out
    qrels = (corpus / "qrels" / "test.tsv").read_text().splitlines()[1:queries + 1]
    relevant = {line.split("\t")[1] for line in qrels}
    query_ids = {line.split("\t")[0] for line in qrels}
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    (tmp / "qrels").mkdir()
    with (corpus / "corpus.jsonl").open() as src, (tmp / "corpus.jsonl").open("w") as dst:
        for n, line in enumerate(src):
            if n < passages or json.loads(line)["_id"] in relevant:
                dst.write(line)
    with (corpus / "queries.jsonl").open() as src, (tmp / "queries.jsonl").open("w") as dst:
        dst.writelines(line for line in src if json.loads(line)["_id"] in query_ids)
    (tmp / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(f"{line}\n" for line in qrels))
    os.replace(tmp, out)
    return out


# --- the phases -------------------------------------------------------------------------------

def run_phase(name: str, command: tuple[str, list[str]], logs: Path, timeout: float, in_process: bool = False,
              launcher: Optional[list[str]] = None, env: Optional[dict] = None) -> dict:
    """Run one phase; `{"rc", "wall_s", "peak_rss_mb", "log"}` (its stdout and stderr in `log`).

    `command`: `("m3c", argv)` (`m3composer.cli`) or `("self", argv)` (this script's `--child`). In
    its own process (`launcher`, e.g. `composer -n 2 -m`, else `python -m` / `python THIS`), or with
    `in_process` called here (the smoke: no start-up per phase, no peak RSS)."""
    entry, argv = command
    log = logs / f"{re.sub(r'[^a-z0-9]+', '-', name.lower()).strip('-')}.log"
    started = time.perf_counter()
    peak = None
    with log.open("w") as out:
        if in_process and launcher is None:
            out.write(f"(in process) {entry} " + " ".join(argv) + "\n")
            out.flush()
            from contextlib import redirect_stderr, redirect_stdout

            from m3composer.cli import main as m3c_main
            with redirect_stdout(out), redirect_stderr(out):
                try:
                    rc = (m3c_main if entry == "m3c" else main)(argv)
                except SystemExit as stop:
                    rc = stop.code if isinstance(stop.code, int) else 1
        else:
            head = launcher or [sys.executable] + (["-m", "m3composer.cli"] if entry == "m3c" else [str(Path(__file__).resolve())])
            out.write("$ " + " ".join(head + argv) + "\n")
            out.flush()
            child = subprocess.Popen(head + argv, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {}), "PYTHONPATH": os.pathsep.join(
                                         filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))})
            while True:
                pid, status, usage = os.wait4(child.pid, os.WNOHANG)
                if pid:
                    break
                if time.perf_counter() > started + timeout:
                    child.terminate()
                    pid, status, usage = os.wait4(child.pid, 0)
                    break
                time.sleep(0.2)
            rc = os.waitstatus_to_exitcode(status)
            peak = round(usage.ru_maxrss / 1024)      # KiB on Linux: the phase's largest process
    result = {"rc": rc, "wall_s": round(time.perf_counter() - started, 1), "peak_rss_mb": peak, "log": str(log)}
    print(f"[bench_corpus] {name}: exit {rc}, {result['wall_s']} s"
          + ("" if peak is None else f", peak RSS {peak} MB"), flush=True)
    return result


def eval_phase(name: str, model: str, corpus: Path, out: Path, args, extra: list[str], nproc: int = 1) -> dict:
    """`m3c eval MODEL CORPUS` with `extra` flags (under `composer -n nproc` above 1 rank); its JSON under "result"."""
    output = out / f"{re.sub(r'[^a-z0-9]+', '-', name.lower()).strip('-')}.json"
    output.unlink(missing_ok=True)
    flags = ["eval", model, str(corpus), "--batch-size", str(args.batch_size), "--passage-max-len",
             str(args.passage_max_len), "--dims", "none", "--no-progress", "--output", str(output), *extra]
    launcher = env = None
    if nproc > 1:
        launcher = [str(Path(sys.executable).parent / "composer"), "-n", str(nproc), "-m", "m3composer.cli"]
        # one rank per core unless the caller set the threads
        env = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))}
    phase = run_phase(name, ("m3c", flags), out / "logs", args.timeout, args.in_process, launcher, env)
    phase["result"] = json.loads(output.read_text()) if phase["rc"] == 0 and output.exists() else None
    return phase


def child_phase(name: str, kind: str, corpus: Path, out: Path, args, model: str) -> dict:
    """This script as a child (`--child encode|mine`): the Python API where the CLI does not report
    the split of the time; its JSON under "result"."""
    output = out / f"{kind}.json"
    output.unlink(missing_ok=True)
    argv = ["--child", kind, "--child-out", str(output), "--child-corpus", str(corpus), "--model", model,
            "--batch-size", str(args.batch_size), "--passage-max-len", str(args.passage_max_len)]
    phase = run_phase(name, ("self", argv), out / "logs", args.timeout, args.in_process)
    phase["result"] = json.loads(output.read_text()) if phase["rc"] == 0 and output.exists() else None
    return phase


def with_heads(model: str, work: Path, seed: int = 0) -> tuple[str, bool]:
    """`(folder, made)`: `model` itself when its folder has the sparse and ColBERT heads, else a copy
    with seeded random heads under `work/models` (made once), so every head and the ensemble are
    measured, and a store written by one run is the store of the next (a folder without head files
    gets fresh, unseeded heads at every load: another model digest, another store key). The sparse
    bias is set to 0.5, as tests/retrieval/test_rerank.py does, so every token of a passage has a
    weight (a random head zeroes about half), the most non-zero terms a passage can have."""
    from m3composer.assets.build import resolve_model_dir
    from m3composer.model.inference import missing_heads

    folder = resolve_model_dir(model, log=lambda *_: None)
    if not missing_heads(folder):
        return str(folder), False
    target = work / "models" / f"{folder.name}-heads-seed{seed}"
    if not (target / "m3composer.json").exists():
        import torch

        from m3composer.model.m3 import M3Model

        torch.manual_seed(seed)
        m3 = M3Model.from_pretrained(folder)
        with torch.no_grad():
            m3.sparse_linear.bias.fill_(0.5)
        target.parent.mkdir(parents=True, exist_ok=True)
        m3.save_pretrained(target)
    return str(target), True


def run_child(args) -> int:
    """`--child encode`: the encoder alone over the corpus; `--child mine`: `mine()` with the dense head."""
    from m3composer.assets.build import resolve_model_dir
    from m3composer.model.inference import load_model_for_inference
    from m3composer.retrieval.beir import load_corpus_texts

    corpus = Path(args.child_corpus)
    model = load_model_for_inference(resolve_model_dir(args.model), device="auto")
    if args.child == "encode":
        from m3composer.retrieval.search import encode_dense

        texts = load_corpus_texts(corpus)
        started = time.perf_counter()
        vectors = encode_dense(model, texts, model.tokenizer, model.passage_instruction, args.passage_max_len,
                               args.batch_size, progress=False)
        seconds = time.perf_counter() - started
        sample = texts[:5000]      # tokens per passage, for the projection (after the timing)
        ids = model.tokenizer([(model.passage_instruction or "") + t for t in sample], truncation=True,
                              max_length=args.passage_max_len)["input_ids"]
        result = {"passages": len(texts), "seconds": round(seconds, 3), "passages_per_s": round(len(texts) / seconds, 1),
                  "dim": int(vectors.shape[1]), "tokens_per_passage": round(sum(map(len, ids)) / len(ids), 1),
                  "truncated_fraction": round(sum(len(i) >= args.passage_max_len for i in ids) / len(ids), 4)}
    else:
        from m3composer.retrieval.mine import mine

        summary = mine(corpus / "mine.jsonl", Path(args.child_out).with_suffix(".mined.jsonl"), model, corpus=corpus,
                       head="dense", batch_size=args.batch_size, passage_max_len=args.passage_max_len, progress=False)
        result = {k: summary[k] for k in ("rows", "pool", "index", "k", "seconds", "negatives_written")}
    Path(args.child_out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


# --- the report -------------------------------------------------------------------------------

def fmt_s(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:,.1f}"


def rows_of(results: dict) -> list[tuple[str, str, str, str]]:
    """`(phase, result, time (s), peak RSS (MB))` rows of the report, in the order the phases run."""
    rows = []
    phases = results["phases"]

    def add(name: str, text: str, seconds: Optional[float] = None):
        phase = phases.get(name, {})
        rss = phase.get("peak_rss_mb")
        rows.append((name, text, fmt_s(seconds if seconds is not None else phase.get("wall_s")),
                     "-" if rss is None else f"{rss:,}"))

    def done(name: str) -> Optional[dict]:
        """The phase's result; None (with a row saying why) when it failed or was skipped or not run."""
        phase = phases.get(name)
        if phase is not None and phase.get("result") is None:
            add(name, phase.get("skipped") or f"failed (exit {phase['rc']}): see {phase['log']}")
        return None if phase is None else phase.get("result")

    def search_row(name: str, r: dict, note: str = ""):
        agreement = ", ".join(f"{h} {v:.3f}" for h, v in r["agreement"].items())
        quality = ", ".join(f"{h} {r[h]['ndcg@10']:.3f}" for h in ("dense", "sparse", "colbert", "ensemble") if h in r)
        exact = r["search"]["exact_seconds"]
        add(name, f"{r['num_queries']} queries x {r['num_docs']:,} passages, K={r['search']['first_stage_k']} "
                  f"({r['search']['index']}): re-rank {r['seconds']:,.1f} s vs exact {exact:,.1f} s "
                  f"(exact/re-rank {exact / r['seconds']:.2f}x); agreement@10 {agreement}; nDCG@10 {quality}{note}")

    c = results["corpus"]
    rows.append(("corpus", f"{c['passages']:,} passages ({c['words']:,} words, {c['corpus_bytes'] / 2**20:,.0f} MiB of "
                           f"JSONL), {c['queries']:,} queries; {'reused' if results['corpus_reused'] else 'built'}",
                 fmt_s(c["build_s"]), "-"))
    encoder = done("encode")
    if encoder:
        add("encode", f"{encoder['passages_per_s']:,.1f} passages/s (encoder alone, dense, 1 rank; "
                      f"{encoder['tokens_per_passage']} tokens/passage, {encoder['truncated_fraction']:.1%} cut at "
                      f"{results['settings']['passage_max_len']})", encoder["seconds"])
    one = None
    for name in [n for n in phases if n.startswith("eval dense exact")]:
        r = done(name)
        if r:
            pps = r["num_docs"] / r["seconds"]
            add(name, f"{pps:,.1f} passages/s ({r['num_docs']:,} passages, {r['num_queries']} queries, "
                      f"{r['seconds']:,.1f} s in eval)" + ("" if one is None else f"; {pps / one:.2f}x 1 rank"))
            one = one or pps
    build, reuse = done("store build"), done("store reuse")
    if build and reuse:
        store, again = build["corpus_cache"], reuse["corpus_cache"]
        add("store build", f"{store['bytes']:,} bytes on disk, {store['bytes'] / build['num_docs']:,.0f} bytes/passage "
                           f"(dense + lexical weights), written in {store['seconds']:,.1f} s; eval {build['seconds']:,.1f} s")
        add("store reuse", f"{'read, nothing encoded' if again['reused'] else 'NOT reused: encoded again'} in "
                           f"{again['seconds']:,.1f} s; eval {reuse['seconds']:,.1f} s = "
                           f"{reuse['seconds'] / build['seconds']:.2f}x the building eval")
    r = done("re-rank")
    if r:
        search_row("re-rank", r)
    r = done("mine")
    if r:
        s = r["seconds"]
        pps = r["pool"] / s["total"]
        ratio = f"; encoder/mine {encoder['passages_per_s'] / pps:.2f}x (goal <= 2)" if encoder else ""
        add("mine", f"{pps:,.1f} passages/s ({r['rows']} queries, pool {r['pool']:,}, {r['index']}; encode pool "
                    f"{fmt_s(s['encode_pool'])} s, search {s['search_only']:,.2f} s){ratio}", s["total"])
    r = done("quality")
    if r:
        search_row("quality", r, f" [{phases['quality']['model']}]")
    return rows


def projection(results: dict) -> dict:
    """The 8.8 M-passage, 8-GPU numbers from the measured per-passage costs (module doc, 3)."""
    from m3composer.retrieval.first_stage import HNSW_M, DenseIndex

    n, g, d = PROJECT_PASSAGES, PROJECT_GPUS, BGE_M3_DIM
    phases = results["phases"]
    encode = (phases.get("encode") or {}).get("result") or {}
    rerank = (phases.get("re-rank") or {}).get("result") or {}
    nnz = (rerank.get("sparse_cost") or {}).get("nonzero_per_passage")
    tokens = encode.get("tokens_per_passage")
    nlist = DenseIndex().nlist_for(n)
    p = {"passages": n, "gpus": g, "dim": d, "nonzero_per_passage": nnz, "tokens_per_passage": tokens,
         "dense_flat_fp32_bytes": n * d * 4, "dense_flat_fp16_bytes": n * d * 2,
         "dense_hnsw_fp32_bytes": n * (d * 4 + 2 * HNSW_M * 4), "hnsw_m": HNSW_M,
         "dense_ivf_fp32_bytes": n * (d * 4 + 8) + nlist * d * 4, "ivf_nlist": nlist}
    if nnz is not None:
        p["sparse_bytes"] = round(n * (nnz * 8 + 8))
    if tokens is not None:
        p["colbert_fp16_bytes"] = round(n * tokens * d * 2)
    if encode:
        p["cpu_seconds_per_passage"] = encode["seconds"] / encode["passages"]
    if results["settings"].get("gpu_passages_per_s"):
        p["encode_hours_8_gpus"] = n / (g * results["settings"]["gpu_passages_per_s"]) / 3600
    return p


def projection_lines(p: dict, results: dict) -> list[str]:
    gib = 2 ** 30
    n, g, d = p["passages"], p["gpus"], p["dim"]

    def row(what, formula, total):
        return f"| {what} | `{formula}` | " + ("-" if total is None else f"{total / gib:,.1f} GiB | {total / g / gib:,.1f} GiB |")

    nnz, tokens = p["nonzero_per_passage"], p["tokens_per_passage"]
    lines = [f"## Projection to {n / 1e6:.1f} M passages on {g} GPUs (on paper)", "",
             f"N = {n:,} passages, G = {g} GPUs, d = {d} (BGE-M3's dense and ColBERT size). Per-passage costs measured "
             f"here with {results['settings']['model']}: {fmt_s(nnz)} non-zero lexical terms/passage, "
             f"{fmt_s(tokens)} tokens/passage (cut at {results['settings']['passage_max_len']}). "
             "Memory per GPU assumes the index sharded evenly over the G GPUs (faiss shards, or one "
             "`distributed.shard` of the corpus per rank).", "",
             "| what | formula | total | per GPU |", "|---|---|---|---|",
             row("dense, faiss flat fp32", "N·d·4", p["dense_flat_fp32_bytes"]),
             row("dense, flat fp16 (faiss SQfp16)", "N·d·2", p["dense_flat_fp16_bytes"]),
             row(f"dense, HNSW M={p['hnsw_m']} fp32", "N·(d·4 + 2M·4)", p["dense_hnsw_fp32_bytes"]),
             row(f"dense, IVF-flat nlist={p['ivf_nlist']:,} fp32", "N·(d·4 + 8) + nlist·d·4", p["dense_ivf_fp32_bytes"]),
             row("sparse, inverted index / store CSR", "N·(nnz·8 + 8)", p.get("sparse_bytes")),
             row("ColBERT vectors fp16 (not stored: re-rank encodes its candidates)", "N·tokens·d·2",
                 p.get("colbert_fp16_bytes")), ""]
    store = ((results["phases"].get("store build") or {}).get("result") or {}).get("corpus_cache")
    if store:
        per = store["bytes"] / results["corpus"]["passages"]
        dim = (results["phases"].get("encode") or {}).get("result", {}).get("dim")
        lines.append(f"Corpus store measured: {per:,.0f} bytes/passage with a {dim}-dim model "
                     f"(dense {dim}·4 B + CSR lexical weights); for BGE-M3: N·(d·4 + nnz·8 + 8) = "
                     + (f"{n * (d * 4 + nnz * 8 + 8) / gib:,.1f} GiB." if nnz is not None else "-"))
    lines.append(f"Encoding: T = N / (G · R_gpu) with R_gpu BGE-M3's passages/s on one GPU at this passage length "
                 f"(fill in; `--gpu-passages-per-s`). "
                 + (f"With R_gpu = {results['settings']['gpu_passages_per_s']:,}: {p['encode_hours_8_gpus']:.2f} h. "
                    if "encode_hours_8_gpus" in p else "")
                 + (f"This CPU, the measured model, 1 rank: {p['cpu_seconds_per_passage'] * 1e3:,.2f} ms/passage, "
                    f"N·that = {n * p['cpu_seconds_per_passage'] / 3600:,.1f} h." if "cpu_seconds_per_passage" in p else ""))
    lines.append("Search: flat dense costs 2·Q·N·d FLOPs for Q queries (exact); HNSW and IVF trade recall for "
                 "~log N and nprobe/nlist of it (agreement rows above).")
    return lines


def report(results: dict) -> str:
    s = results["settings"]
    lines = [f"# bench_corpus: {results['corpus']['passages']:,} passages, model {s['model']}", "",
             f"Machine: {results['machine']}. Passages cut at {s['passage_max_len']} tokens, batch {s['batch_size']}. "
             f"Each phase is its own process; peak RSS is the phase's largest process. Re-rank vs exact uses "
             f"{s['exact_queries']} queries; exact search encodes the whole corpus with every head whatever the "
             f"number of queries. Heads of {s['model']}: {results['model_heads']}.", "",
             "| phase | result | time (s) | peak RSS (MB) |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows_of(results)]
    lines += [""] + projection_lines(results["projection"], results)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--passages", type=int, default=200_000)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--exact-queries", type=int, default=100, help="queries of the re-rank vs exact phase")
    ap.add_argument("--max-words", type=int, default=128, help="words per passage at most")
    ap.add_argument("--min-words", type=int, default=8, help="shorter passages are dropped")
    ap.add_argument("--max-share", type=float, default=0.25,
                    help="a source (package) gives at most this fraction of the passages (without it, the oci "
                         "SDK's generated docstrings would be 45%% of 200k)")
    ap.add_argument("--model", default="asset:tiny-xlmr", help="the model of the throughput phases")
    ap.add_argument("--quality-model", default="asset:e5-small", help="the quality phase's model ('none': skip)")
    ap.add_argument("--quality-passages", type=int, default=5000)
    ap.add_argument("--quality-queries", type=int, default=100)
    ap.add_argument("--ranks", default="1", help="rank counts of the `eval dense exact` rows, e.g. 1,2")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--passage-max-len", type=int, default=256)
    ap.add_argument("--phases", default="encode,eval,store,rerank,mine,quality",
                    help="which phases to run (the corpus is always made)")
    ap.add_argument("--gpu-passages-per-s", type=float, default=None,
                    help="BGE-M3's measured passages/s on one GPU, for the projection's encoding time")
    ap.add_argument("--work", type=Path, default=REPO / "runs" / "bench_corpus")
    ap.add_argument("--timeout", type=float, default=6 * 3600, help="seconds per phase")
    ap.add_argument("--build-only", action="store_true", help="make the corpus and stop")
    ap.add_argument("--in-process", action="store_true",
                    help="run the 1-rank phases in this process (no start-up per phase, no peak RSS; --smoke does)")
    ap.add_argument("--smoke", action="store_true",
                    help="500 passages, 10 queries, the tiny model everywhere, in process")
    ap.add_argument("--child", choices=("encode", "mine"), help=argparse.SUPPRESS)
    ap.add_argument("--child-out", help=argparse.SUPPRESS)
    ap.add_argument("--child-corpus", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return run_child(args)
    if args.smoke:
        for key, value in SMOKE.items():
            setattr(args, key, value)
        args.model = args.quality_model = "asset:tiny-xlmr"
        args.in_process = True
    ranks = [int(r) for r in args.ranks.split(",") if r.strip()]
    phases_wanted = set(args.phases.split(","))
    started = time.perf_counter()
    corpus, info, reused = ensure_corpus(args.work, args.passages, args.queries, args.max_words, args.min_words,
                                         args.max_share)
    print(f"[bench_corpus] corpus {corpus}: {info['passages']:,} passages, {info['queries']:,} queries, " +
          ("reused" if reused else f"built in {info['build_s']} s"), flush=True)
    if args.build_only:
        print(json.dumps(info, indent=1))
        return 0
    out = args.work / f"run-{corpus.name}"
    shutil.rmtree(out, ignore_errors=True)
    (out / "logs").mkdir(parents=True)
    model, model_heads_made = with_heads(args.model, args.work)
    phases: dict[str, dict] = {}
    if "encode" in phases_wanted:
        phases["encode"] = child_phase("encode", "encode", corpus, out, args, model)
    if "eval" in phases_wanted:
        for nproc in ranks:
            name = f"eval dense exact, {nproc} rank{'s' if nproc > 1 else ''}"
            phase = eval_phase(name, model, corpus, out, args, ["--heads", "dense", "--search", "exact"], nproc)
            if nproc > 1 and phase["result"] is not None and not ({"world_size", "ranks"} & set(phase["result"])):
                phase["skipped"] = (f"skipped: this `m3c eval` records no world size in its output, so it may not "
                                    f"shard over ranks (each rank running the whole corpus); see {phase['log']}")
                phase["result"] = None
            elif nproc > 1 and phase["result"] is None:
                phase["skipped"] = f"skipped: `composer -n {nproc} -m m3composer.cli eval` failed (exit {phase['rc']}); see {phase['log']}"
            phases[name] = phase
    store_dir = out / "store"
    search = ["--search", "rerank", "--corpus-cache", str(store_dir)]
    if "store" in phases_wanted:
        for name in ("store build", "store reuse"):
            phases[name] = eval_phase(name, model, corpus, out, args, ["--heads", "dense,sparse", *search])
    if "rerank" in phases_wanted:
        phases["re-rank"] = eval_phase("re-rank", model, corpus, out, args,
                                       [*search, "--agreement", "--max-queries", str(args.exact_queries)])
    if "mine" in phases_wanted:
        phases["mine"] = child_phase("mine", "mine", corpus, out, args, model)
    if "quality" in phases_wanted and args.quality_model.lower() != "none":
        subset = subset_corpus(corpus, corpus.parent / f"{corpus.name}-subset-{args.quality_passages}-{args.quality_queries}",
                               args.quality_passages, args.quality_queries)
        quality_model, quality_heads_made = with_heads(args.quality_model, args.work)
        phases["quality"] = eval_phase("quality", quality_model, subset, out, args,
                                       ["--search", "rerank", "--agreement"])
        phases["quality"]["model"] = args.quality_model + (" + seeded random sparse/ColBERT heads"
                                                           if quality_heads_made else "")
    store_bytes = dir_bytes(store_dir) if store_dir.exists() else None
    results = {"settings": {k: v for k, v in vars(args).items() if not k.startswith("child") and k != "work"}
               | {"work": str(args.work)},
               "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}",
               "model_dir": model, "model_heads": "seeded random sparse/ColBERT heads added" if model_heads_made
               else "the folder's own", "corpus": info, "corpus_dir": str(corpus), "corpus_reused": reused, "phases": phases,
               "store_bytes_on_disk": store_bytes, "total_s": None}
    results["projection"] = projection(results)
    results["total_s"] = round(time.perf_counter() - started, 1)
    text = report(results)
    print("\n" + text)
    (args.work / "report.md").write_text(text)
    (args.work / "results.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    print(json.dumps({"total_s": results["total_s"], "rows": [r[0] for r in rows_of(results)],
                      "failed": sorted(n for n, p in phases.items() if p.get("result") is None)}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

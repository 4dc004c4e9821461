"""Every scripts/bench_*.py still runs: its m3composer half on its smallest configuration, in seconds.

The figures are not checked (timings on a shared test machine mean nothing); each test checks that the
benchmark runs to its report and that the report has its rows. bench_memory.py has its own tests
(tests/test_bench_memory.py). bench_vs_flagembedding.py's FlagEmbedding half needs the peer harness
and its virtualenv, which the suite does not have: `--smoke` runs its m3composer half only, which is
also bench_train.py end to end (in a child process). The other scripts run in this process, on a few
synthetic rows (bench_data.py's own generator) and the asset models.
"""
from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

# run by `make test-bench` (and CI), not by `make test`: pyproject.toml [tool.pytest.ini_options]
pytestmark = pytest.mark.bench

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts"


def load_script(name: str):
    """scripts/NAME.py as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def printed_json(text: str) -> dict:
    """The indented JSON object a script prints last (after its Markdown table)."""
    lines = text.splitlines()
    return json.loads("\n".join(lines[max(i for i, line in enumerate(lines) if line == "{"):]))


@pytest.fixture(scope="module")
def work(tmp_path_factory, assets) -> Path:
    """bench_vs_flagembedding.py's `--work` folder with its smoke data made: 24 synthetic rows (1 query,
    1 positive, 3 negatives, one length bucket; bench_data.py's generator) in smoke/jsonl, converted with
    the tiny asset's tokenizer in smoke/mds. The other benchmarks' tests read the same rows."""
    work = tmp_path_factory.mktemp("bench")
    load_script("bench_vs_flagembedding").prepare_smoke(work)
    return work


@pytest.fixture(scope="module")
def jsonl(work) -> Path:
    return work / "smoke" / "jsonl"


@pytest.fixture(scope="module")
def mds(work) -> Path:
    return work / "smoke" / "mds"


def test_no_benchmark_reads_a_recipe_yaml():
    """A benchmark states its own settings (a yamls/bench-*.yaml or explicit values), so a change to a
    recipe cannot change or break it."""
    for script in sorted(SCRIPTS.glob("bench_*.py")):
        named = set(re.findall(r"[\w.-]+\.yaml", script.read_text()))
        recipes = {n for n in named if (REPO / "yamls" / n).exists() and not n.startswith("bench-")}
        assert not recipes, f"{script.name} reads the recipe(s) {sorted(recipes)}"
    assert "quickstart" not in (SCRIPTS / "bench_vs_flagembedding.py").read_text()


@pytest.mark.parametrize("nproc", [1, 2])
def test_the_flagembedding_comparisons_settings_load_for_one_and_two_processes(nproc):
    """The config bench_vs_flagembedding.py's runs get: it validates, and gathers the dense head only,
    as FlagEmbedding does, with 2 processes."""
    from m3composer.config import load_config

    bench = load_script("bench_vs_flagembedding")
    cfg = load_config(bench.RECIPE, ["run_name=x", "run_dir=/tmp/x", "data.train_data=/tmp/mds",
                                     f"loss.negatives_cross_device={'true' if nproc > 1 else 'false'}"])
    assert cfg.loss.negatives_cross_device == (nproc > 1)
    assert cfg.loss.negatives_cross_device_heads == "dense"
    assert (cfg.data.train_group_size, cfg.data.query_max_len, cfg.data.passage_max_len,
            cfg.data.default_batch_size) == (4, 64, 128, 8)
    assert (cfg.model.pooling, cfg.trainer.precision, cfg.optimizer.lr, cfg.seed) == ("cls", "fp32", 1e-5, 42)


def test_vs_flagembedding_smoke_runs_the_m3composer_half_through_bench_train(work):
    """`bench_vs_flagembedding.py --smoke`: m3composer's tiny 1-process run (bench_train.py in a child
    process, as the benchmark runs it) to the results table, with no FlagEmbedding virtualenv."""
    bench = load_script("bench_vs_flagembedding")
    assert bench.main(["--smoke", "--work", str(work), "--timeout", "240"]) == 0
    runs = json.loads((work / "results.json").read_text())["runs"]
    assert [(r["trainer"], r["config"], r["rc"]) for r in runs] == [("m3composer", "tiny 1p", 0)], runs
    assert runs[0]["steps"] == bench.SMOKE_STEPS and runs[0]["samples_per_s"] > 0, runs[0]
    assert "| tiny 1p |" in (work / "results.md").read_text()


def test_bench_data_conversion_and_dataloader_rows(jsonl, tiny_dir, capsys):
    assert load_script("bench_data").main(["--data", str(jsonl), "--tokenizer", str(tiny_dir), "--repeats", "1",
                                           "--dataloader-steps", "1"]) == 0
    result = printed_json(capsys.readouterr().out)
    assert result["rows"] == 24 and result["convert_s"] > 0 and result["dataloader"]["steps"] == 1


def test_bench_convert_table(jsonl, tiny_dir, capsys):
    load_script("bench_convert").main(["--data", str(jsonl), "--tokenizer", str(tiny_dir), "--copies", "1",
                                       "--workers", "1", "--repeats", "1"])
    result = printed_json(capsys.readouterr().out)
    assert result["input"]["rows"] == 24 and list(result["runs"]) == ["1"]


def test_bench_shard_hash_table(capsys):
    load_script("bench_shard_hash").main(["--rows", "20", "--passage-tokens", "8", "--repeats", "1"])
    out = capsys.readouterr().out
    assert "| write (MDSWriter, zstd) |" in out and "| first read" in out and "xxh64:" in out


def test_bench_refresh_reports_a_refresh(mds, tmp_path, capsys):
    assert load_script("bench_refresh").main([str(mds), "--model", "asset:tiny-xlmr", "--heads", "dense",
                                              "--batch-size", "16", "--out", str(tmp_path)]) == 0
    report = printed_json(capsys.readouterr().out)
    assert report["head"] == "dense" and report["rows"] == 24 and report["pool_passages"] > 0


def test_bench_mine_real_texts_and_the_index_alone(jsonl, tmp_path, capsys):
    assert load_script("bench_mine").main([str(jsonl), "--pool", "16", "--queries", "4", "--faiss-pool", "200",
                                           "--faiss-queries", "20", "--model", "asset:tiny-xlmr",
                                           "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "real texts: 4 queries" in out and "faiss flat:" in out and "faiss hnsw:" in out
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == 4


def test_bench_serving_budget_smoke_pairs_each_variant_with_base(tmp_path, capsys):
    """`bench_serving_budget.py --smoke`: base and Matryoshka + FLOPS, each through bench_train.py in a
    child process, on the tiny model; the report pairs their steps (same seed, same batches)."""
    bench = load_script("bench_serving_budget")
    assert bench.main(["--smoke", "--work", str(tmp_path), "--json", str(tmp_path / "r.json"), "--timeout", "240"]) == 0
    result = json.loads((tmp_path / "r.json").read_text())
    assert set(result["summary"]) == {"base", "both"}
    assert result["summary"]["base"]["ratio_to_base"] == 1.0
    assert result["summary"]["both"]["steps_paired"] == result["steps"] - 1 > 0
    base, both = (result["runs"][v][0]["losses"] for v in ("base", "both"))
    assert len(base) == len(both) == result["steps"] and base != both      # the variant's terms are in its loss
    assert "| both |" in capsys.readouterr().out


def test_bench_corpus_smoke_runs_every_phase_on_a_corpus_built_once(tmp_path, assets, capsys):
    """`bench_corpus.py --smoke`: a 500-passage corpus of the installed packages' text (BEIR folder and
    `m3c mine` input), every phase in this process with the tiny model (seeded heads added) to the
    report's rows; the store is read back by the second eval; a second run reuses the corpus."""
    bench = load_script("bench_corpus")
    assert bench.main(["--smoke", "--work", str(tmp_path)]) == 0
    printed = printed_json(capsys.readouterr().out)
    assert printed["failed"] == [], printed
    assert printed["rows"] == ["corpus", "encode", "eval dense exact, 1 rank", "store build", "store reuse",
                               "re-rank", "mine", "quality"]
    results = json.loads((tmp_path / "results.json").read_text())
    corpus = Path(results["corpus_dir"])
    docs = {d["_id"]: bench.normalise(d["title"] + " " + d["text"]) for d in map(json.loads, (corpus / "corpus.jsonl").open())}
    assert len(docs) == 500 and len(set(docs.values())) == 500
    qrels = (corpus / "qrels" / "test.tsv").read_text().splitlines()[1:]
    assert len(qrels) == 10 and all(line.split("\t")[1] in docs for line in qrels)
    mine_rows = [json.loads(line) for line in (corpus / "mine.jsonl").open()]
    assert [bench.normalise(r["pos"][0]) for r in mine_rows] == [docs[line.split("\t")[1]] for line in qrels]
    phases = results["phases"]
    assert phases["store reuse"]["result"]["corpus_cache"]["reused"] is True
    assert phases["store build"]["result"]["corpus_cache"]["reused"] is False
    assert set(phases["re-rank"]["result"]["agreement"]) == {"dense", "sparse", "colbert", "ensemble"}
    assert phases["mine"]["result"]["pool"] == 500 and phases["mine"]["result"]["rows"] == 10
    assert results["projection"]["nonzero_per_passage"] > 0
    report = (tmp_path / "report.md").read_text()
    assert "| store reuse |" in report and "Projection to 8.8 M passages on 8 GPUs" in report
    assert bench.main(["--smoke", "--work", str(tmp_path), "--build-only"]) == 0
    assert "reused" in capsys.readouterr().out


def test_bench_corpus_builds_the_same_corpus_twice(tmp_path):
    """The corpus is a function of the installed packages and the settings: two builds, the same bytes."""
    bench = load_script("bench_corpus")
    for name in ("a", "b"):
        bench.build_corpus(tmp_path / name, passages=300, queries=5, max_words=64, min_words=8)
    for part in ("corpus.jsonl", "queries.jsonl", "qrels/test.tsv", "mine.jsonl"):
        assert (tmp_path / "a" / part).read_bytes() == (tmp_path / "b" / part).read_bytes(), part
    lengths = [len(json.loads(line)["text"].split()) for line in (tmp_path / "a" / "corpus.jsonl").open()]
    assert len(lengths) == 300 and 8 <= min(lengths) and max(lengths) <= 64

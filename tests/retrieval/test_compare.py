"""m3c compare: paired bootstrap intervals between two per-query evaluations."""
import json

import numpy as np
import pytest

from m3composer.cli import main
from m3composer.retrieval.compare import compare, paired_bootstrap


def test_identical_and_shifted_scores_give_exact_intervals():
    base = {f"q{i}": i / 10 for i in range(10)}
    same = paired_bootstrap(base, dict(base))
    assert (same.difference, same.low, same.high) == (0.0, 0.0, 0.0) and not same.excludes_zero
    shifted = paired_bootstrap(base, {q: v + 0.25 for q, v in base.items()})
    assert shifted.difference == pytest.approx(0.25) and shifted.low == pytest.approx(0.25)
    assert shifted.high == pytest.approx(0.25) and shifted.excludes_zero


def test_the_interval_is_paired_and_covers_the_mean_difference():
    rng = np.random.default_rng(0)
    level = rng.uniform(0, 1, 300)               # queries differ a lot in difficulty ...
    base = {f"q{i}": float(v) for i, v in enumerate(level)}
    other = {f"q{i}": float(v + 0.02 + rng.normal(0, 0.01)) for i, v in enumerate(level)}   # ... the gain does not
    d = paired_bootstrap(base, other, samples=2000)
    assert d.low < d.difference < d.high and d.excludes_zero
    # unpaired, the spread of difficulty (std ~0.29) would swamp a 0.02 gain; paired, the interval is narrow
    assert d.high - d.low < 0.01
    with pytest.raises(ValueError, match="share no query"):
        paired_bootstrap({"a": 1.0}, {"b": 1.0})


def _eval_json(path, per_query):
    path.write_text(json.dumps({"dense": {}, "per_query": per_query}))
    return path


def test_cli_with_base_head_dense_compares_every_head_against_the_base_dense(tmp_path, capsys):
    queries = [f"q{i}" for i in range(20)]
    base = _eval_json(tmp_path / "base.json", {"dense": {q: {"ndcg@10": 0.5} for q in queries}})
    other = _eval_json(tmp_path / "other.json", {
        "dense": {q: {"ndcg@10": 0.6} for q in queries}, "sparse": {q: {"ndcg@10": 0.4} for q in queries}})
    assert main(["compare", str(base), str(other), "--base-head", "dense", "--output", str(tmp_path / "c.json")]) == 0
    out = capsys.readouterr().out
    assert "dense" in out and "sparse" in out
    written = json.loads((tmp_path / "c.json").read_text())
    assert written["dense"]["difference"] == pytest.approx(0.1) and written["sparse"]["difference"] == pytest.approx(-0.1)
    assert compare(json.loads(base.read_text()), json.loads(other.read_text()))["dense"].excludes_zero
    (tmp_path / "plain.json").write_text(json.dumps({"dense": {}}))
    assert main(["compare", str(tmp_path / "plain.json"), str(other)]) == 2
    assert "--per-query" in capsys.readouterr().err


def test_each_head_is_compared_with_the_same_head_of_the_base_and_a_head_the_base_lacks_is_not(tmp_path, capsys):
    """The quickstart's last table: the base e5-small has only dense, so the fine-tuned sparse head has
    nothing to be compared with; it is shown with its own mean and a note, not against base dense."""
    queries = [f"q{i}" for i in range(20)]
    base = _eval_json(tmp_path / "base.json", {"dense": {q: {"ndcg@10": 0.5} for q in queries}})
    other = _eval_json(tmp_path / "other.json", {
        "dense": {q: {"ndcg@10": 0.6} for q in queries}, "sparse": {q: {"ndcg@10": 0.4} for q in queries}})
    assert main(["compare", str(base), str(other), "--output", str(tmp_path / "c.json")]) == 0
    out = capsys.readouterr().out
    assert "each head against the same head of the base" in out
    sparse_row = next(line for line in out.splitlines() if line.startswith("sparse"))
    assert "no base sparse head: not compared" in sparse_row and "0.4000" in sparse_row and "*" not in sparse_row
    assert "0.5000" not in sparse_row and "-0.1" not in sparse_row
    written = json.loads((tmp_path / "c.json").read_text())
    assert written["sparse"] is None and written["dense"]["difference"] == pytest.approx(0.1)
    assert compare(json.loads(base.read_text()), json.loads(other.read_text()))["sparse"] is None


def test_a_base_with_every_head_is_compared_head_by_head(tmp_path):
    queries = [f"q{i}" for i in range(20)]
    heads = ("dense", "sparse", "colbert", "ensemble")
    base = {"per_query": {h: {q: {"ndcg@10": 0.5} for q in queries} for h in heads}}
    base["per_query"]["sparse"] = {q: {"ndcg@10": 0.2} for q in queries}
    other = {"per_query": {h: {q: {"ndcg@10": 0.6} for q in queries} for h in heads}}
    result = compare(base, other)
    assert list(result) == list(heads)
    assert {h: round(d.difference, 6) for h, d in result.items()} == {
        "dense": 0.1, "sparse": 0.4, "colbert": 0.1, "ensemble": 0.1}
    assert {round(d.base, 6) for d in compare(base, other, base_head="dense").values()} == {0.5}


def test_matryoshka_rows_are_compared_too_largest_size_first(tmp_path, capsys):
    """`m3c eval --dims` writes per-query rows `dense@96`, …; compare pairs them with the same row of the
    base (plain truncation of a model trained without MRL against an MRL model at the same size)."""
    queries = [f"q{i}" for i in range(20)]
    rows = ("dense", "colbert", "ensemble", "dense@96", "colbert@96", "ensemble@96", "dense@192", "colbert@192")
    base = _eval_json(tmp_path / "base.json", {h: {q: {"ndcg@10": 0.5} for q in queries} for h in rows})
    other = {h: {q: {"ndcg@10": 0.5 + (0.1 if "@96" in h else 0.0)} for q in queries} for h in rows}
    other = _eval_json(tmp_path / "other.json", other)
    result = compare(json.loads(base.read_text()), json.loads(other.read_text()))
    assert list(result) == ["dense", "colbert", "ensemble", "dense@192", "colbert@192", "dense@96", "colbert@96",
                            "ensemble@96"]
    assert {h: round(d.difference, 6) for h, d in result.items()} == {
        **{h: 0.0 for h in ("dense", "colbert", "ensemble", "dense@192", "colbert@192")},
        **{h: 0.1 for h in ("dense@96", "colbert@96", "ensemble@96")}}
    assert main(["compare", str(base), str(other)]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("ensemble@96"))
    assert "+0.1000" in row and row.rstrip().endswith("*")
    # the MRL model at 96 against its own full size: every row against one head of the same file
    own = compare(json.loads(other.read_text()), json.loads(other.read_text()), base_head="dense")
    assert round(own["dense@96"].difference, 6) == 0.1 and round(own["colbert"].difference, 6) == 0.0


def test_a_base_head_the_base_lacks_is_an_error_naming_it(tmp_path, capsys):
    queries = [f"q{i}" for i in range(5)]
    base = _eval_json(tmp_path / "base.json", {"dense": {q: {"ndcg@10": 0.5} for q in queries}})
    other = _eval_json(tmp_path / "other.json", {"dense": {q: {"ndcg@10": 0.6} for q in queries}})
    assert main(["compare", str(base), str(other), "--base-head", "colbert"]) == 2
    assert "no per-query metrics of the colbert head" in capsys.readouterr().err


# ------------------------------------------------------------- scripts/compare_eval.py: the quickstart's verdict
def _compare_eval():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "scripts" / "compare_eval.py"
    spec = importlib.util.spec_from_file_location("compare_eval", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _results(path, per_query: dict[str, dict[str, dict[str, float]]]):
    """An `m3c eval --per-query --output` file: means per head, and every query's metrics."""
    means = {head: {m: float(np.mean([q[m] for q in rows.values()])) for m in next(iter(rows.values()))}
             for head, rows in per_query.items()}
    path.write_text(json.dumps({**means, "num_queries": 20, "num_docs": 50, "per_query": per_query}))
    return str(path)


def _dense(recall: list[float], ndcg: list[float]) -> dict:
    return {"dense": {f"q{i}": {"recall@10": r, "ndcg@10": n} for i, (r, n) in enumerate(zip(recall, ndcg))}}


LEVEL = [0.2 + 0.03 * i for i in range(20)]           # 20 queries of different difficulty
SHIFT = [v + 0.1 for v in LEVEL]                        # the same gain on every query
# a mean gain of +0.02 that the queries do not support: 11 queries up 0.2, 9 down 0.2
NOISE = [v + (0.2 if i % 2 == 0 or i == 19 else -0.2) for i, v in enumerate(LEVEL)]


@pytest.mark.parametrize("recall, ndcg, verdict", [
    (SHIFT, SHIFT, "the fine-tuned model is better"),
    (NOISE, NOISE, "no clear difference between the two models"),   # higher means, and still not a gain
    (SHIFT, NOISE, "no clear difference between the two models"),   # better on one metric only
    ([v - 0.1 for v in LEVEL], NOISE, "the fine-tuned model is worse"),
])
def test_the_quickstart_verdict_follows_the_paired_interval(tmp_path, capsys, recall, ndcg, verdict):
    base = _results(tmp_path / "base.json", _dense(LEVEL, LEVEL))
    tuned = _results(tmp_path / "tuned.json", _dense(recall, ndcg))
    assert _compare_eval().main(base, tuned) == 0
    out = capsys.readouterr().out
    assert f"verdict: {verdict}\n" in out
    assert "interval over 20 queries" in out and out.count("]: ") == 2     # both metrics' intervals are printed


def test_the_ensemble_line_uses_the_interval_against_the_best_head(tmp_path, capsys):
    base = _results(tmp_path / "base.json", _dense(LEVEL, LEVEL))
    rows = _dense(SHIFT, SHIFT)
    rows["colbert"] = {q: {"recall@10": m["recall@10"] - 0.05, "ndcg@10": m["ndcg@10"] - 0.05}
                       for q, m in rows["dense"].items()}
    rows["ensemble"] = {q: {"recall@10": m["recall@10"], "ndcg@10": n}
                        for (q, m), n in zip(rows["dense"].items(), NOISE)}       # above dense in mean only
    compare_eval = _compare_eval()
    assert compare_eval.main(base, _results(tmp_path / "tuned.json", rows)) == 0
    assert "fine-tuned ensemble nDCG@10 is not clearly above the best single head (dense)" in capsys.readouterr().out
    rows["ensemble"] = {q: {"recall@10": m["recall@10"], "ndcg@10": m["ndcg@10"] + 0.01} for q, m in rows["dense"].items()}
    assert compare_eval.main(base, _results(tmp_path / "tuned.json", rows)) == 0
    assert "fine-tuned ensemble nDCG@10 beats the best single head (dense)" in capsys.readouterr().out


def test_compare_eval_without_per_query_metrics_is_one_line_saying_so(tmp_path, capsys):
    (tmp_path / "plain.json").write_text(json.dumps({"dense": {"ndcg@10": 0.5, "recall@10": 0.7}}))
    tuned = _results(tmp_path / "tuned.json", _dense(SHIFT, SHIFT))
    assert _compare_eval().main(str(tmp_path / "plain.json"), tuned) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--per-query" in err


def test_the_quickstart_verdict_compares_a_trained_head_and_marks_the_heads_not_trained(tmp_path, capsys):
    base = _results(tmp_path / "base.json", _dense(LEVEL, LEVEL))
    rows = _dense(LEVEL, LEVEL)
    rows["sparse"] = _dense(SHIFT, SHIFT)["dense"]
    tuned = tmp_path / "tuned.json"
    _results(tuned, rows)
    # loss.heads=[sparse]: the base (dense only) has no sparse head, so there is nothing like for like
    tuned.write_text(json.dumps({**json.loads(tuned.read_text()), "trained_heads": ["sparse"]}))
    assert _compare_eval().main(base, str(tuned)) == 0
    out = capsys.readouterr().out
    assert "heads trained (loss.heads): sparse" in out and "verdict:" not in out
    assert "no trained head (sparse) was evaluated on the base model" in out
    dense_row = next(line for line in out.splitlines() if line.startswith("dense "))
    assert dense_row.endswith("(not trained)")
    # loss.heads=[dense, sparse]: the trained dense head against the base's
    tuned.write_text(json.dumps({**json.loads(tuned.read_text()), "trained_heads": ["dense", "sparse"]}))
    assert _compare_eval().main(base, str(tuned)) == 0
    out = capsys.readouterr().out
    assert "fine-tuned dense vs base dense" in out and "verdict: no clear difference" in out
    assert "(not trained)" not in out

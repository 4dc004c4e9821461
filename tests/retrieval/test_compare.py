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


def test_cli_compares_every_head_against_the_base_dense_when_the_base_has_no_heads(tmp_path, capsys):
    queries = [f"q{i}" for i in range(20)]
    base = _eval_json(tmp_path / "base.json", {"dense": {q: {"ndcg@10": 0.5} for q in queries}})
    other = _eval_json(tmp_path / "other.json", {
        "dense": {q: {"ndcg@10": 0.6} for q in queries}, "sparse": {q: {"ndcg@10": 0.4} for q in queries}})
    assert main(["compare", str(base), str(other), "--output", str(tmp_path / "c.json")]) == 0
    out = capsys.readouterr().out
    assert "dense" in out and "sparse" in out
    written = json.loads((tmp_path / "c.json").read_text())
    assert written["dense"]["difference"] == pytest.approx(0.1) and written["sparse"]["difference"] == pytest.approx(-0.1)
    assert compare(json.loads(base.read_text()), json.loads(other.read_text()))["dense"].excludes_zero
    (tmp_path / "plain.json").write_text(json.dumps({"dense": {}}))
    assert main(["compare", str(tmp_path / "plain.json"), str(other)]) == 2
    assert "--per-query" in capsys.readouterr().err

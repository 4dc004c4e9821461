"""scripts/bench_memory.py: the longer position table of its e5-small rows, and a trial's memory per phase."""
from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
import torch

from tests import bounded

# run by `make test-bench` (and CI), not by `make test`: pyproject.toml [tool.pytest.ini_options]
pytestmark = pytest.mark.bench

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "bench_memory.py"


def _bench_memory():
    spec = importlib.util.spec_from_file_location("bench_memory", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("asset", ["tiny_dir", "e5_dir"])        # XLM-R (positions after padding_idx) and BERT
def test_extend_positions_keeps_short_inputs_and_runs_long_ones(asset, request):
    from m3composer.model.m3 import M3Model
    m3 = M3Model.from_pretrained(request.getfixturevalue(asset), attn_implementation="sdpa").eval()
    encoder = m3.encoder
    old = encoder.embeddings.position_embeddings.weight.detach().clone()
    padding_idx = getattr(encoder.embeddings, "padding_idx", None)
    offset = 0 if padding_idx is None else padding_idx + 1
    ids = torch.randint(5, 1000, (2, 40))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        before = encoder(input_ids=ids, attention_mask=mask).last_hidden_state

    size = old.shape[0] + 130
    _bench_memory().extend_positions(encoder, size - offset)

    table = encoder.embeddings.position_embeddings.weight.detach()
    assert table.shape == (size, old.shape[1]) and encoder.config.max_position_embeddings == size
    assert torch.equal(table[:old.shape[0]], old)
    assert old.shape[0] - offset > 130
    assert torch.equal(table[old.shape[0]:], old[offset:offset + 130])        # the learned positions, again
    with torch.no_grad():
        after = encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        long_ids = torch.randint(5, 1000, (1, size - offset))                  # longer than the old table
        long = encoder(input_ids=long_ids, attention_mask=torch.ones_like(long_ids)).last_hidden_state
    torch.testing.assert_close(after, before, rtol=1e-6, atol=1e-6)
    assert long.shape == (1, size - offset, old.shape[1]) and torch.isfinite(long).all()


def test_extend_positions_leaves_a_large_enough_table_alone(tiny_dir):
    from m3composer.model.m3 import M3Model
    encoder = M3Model.from_pretrained(tiny_dir).encoder
    table = encoder.embeddings.position_embeddings
    _bench_memory().extend_positions(encoder, table.num_embeddings - encoder.embeddings.padding_idx - 1)
    assert encoder.embeddings.position_embeddings is table


def test_cached_trial_reports_memory_per_phase():
    """One real cached step (tiny 250k-vocabulary model, 1 query x 2 passages of 64 tokens, 2 chunks) in a
    fresh process under the address-space cap: every phase of the step is there, in order, with a peak
    no lower than where it started, and the cache's two passes inside the step's forward and backward."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    done = bounded.run([sys.executable, str(SCRIPT), "--trial", "--cached", "--phases", "--model", "tiny-v250k",
                        "--length", "64", "--batch", "1", "--group-size", "2", "--steps", "1", "--threads", "1",
                        "--cache-sequences", "2", "--cache-tokens", "0"], env=env, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads([line for line in done.stdout.splitlines() if line.startswith("{")][-1])
    assert result["ok"]
    names = [p["phase"] for p in result["phases"]]
    assert names == ["model, optimizer and batch", "forward (encode)", "cache pass 1: encode without graph",
                     "loss forward", "backward", "cache pass 3: replay chunks with graph + backward",
                     "optimizer step", "between steps"]
    for phase in result["phases"]:
        assert phase["peak_rss_gib"] >= phase["rss_at_start_gib"] > 0
    assert max(p["peak_rss_gib"] for p in result["phases"]) <= result["peak_rss_gib"] + 0.01


def test_throughput_mode_of_the_gpu_check_runs_on_the_cpu(tmp_path):
    """`bench_memory.py --throughput` (scripts/gpu_check.py runs the same function) on a tiny bucket: a row per
    setting with a step time, samples/s, TFLOP/s (no bf16 peak on a CPU) and the peak memory."""
    out = tmp_path / "throughput.json"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    done = bounded.run([sys.executable, str(SCRIPT), "--throughput", "32:1", "--models", "tiny-v250k",
                        "--group-size", "2", "--steps", "1", "--threads", "1", "--cache-sequences", "2",
                        "--out", str(out)], env=env, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(out.read_text())
    assert [(r["length"], r["batch"], r["cached"]) for r in rows] == [(32, 1, False), (32, 1, True)]
    for r in rows:
        assert r["device"] == "cpu" and r["tflops_vs_bf16_peak"] is None
        assert r["step_s"] > 0 and r["samples_per_s"] == pytest.approx(1 / r["step_s"])
        assert r["tflops"] > 0 and r["peak_memory_gib"] > 0.1

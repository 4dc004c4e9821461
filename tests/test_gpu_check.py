"""The GPU check's parts that run without a GPU (scripts/gpu_check.py; the whole check is proven on
the CPU by scripts/gpu_proof.sh, outside the suite because it downloads torch), and `--device`."""
from __future__ import annotations

import pytest
import torch

from m3composer.model.inference import inference_device
from tests.test_bench_scripts import SCRIPTS, load_script


@pytest.fixture
def gpu_check(monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPTS))       # as `python scripts/gpu_check.py` has it
    return load_script("gpu_check")


def test_the_largest_batch_search_doubles_then_bisects_to_the_boundary(gpu_check):
    tried = []

    def fits(batch):
        tried.append(batch)
        return batch <= 11

    found = gpu_check.search_largest(fits, max_batch=256, budget_s=60)
    assert (found["largest_batch"], found["first_failed"], found["complete"]) == (11, 12, True)
    assert tried[:5] == [1, 2, 4, 8, 16]                     # doubling, then bisection between 8 and 16
    assert len(tried) == 8
    capped = gpu_check.search_largest(lambda b: True, max_batch=5, budget_s=60)
    assert (capped["largest_batch"], capped["first_failed"], capped["complete"]) == (4, None, True)
    out_of_time = gpu_check.search_largest(lambda b: True, max_batch=1 << 20, budget_s=0)
    assert (out_of_time["largest_batch"], out_of_time["complete"]) == (0, False)


def test_one_steps_loss_terms_under_bf16_autocast_agree_with_fp32(gpu_check):
    result = gpu_check.bf16_vs_fp32("tiny-v250k", 32, 2)
    assert result["device"] == "cpu"
    assert set(result["fp32"]) >= {"dense", "sparse", "colbert", "ensemble", "self_distill", "total"}
    assert all(d <= gpu_check.BF16_TOLERANCE["abs"] + gpu_check.BF16_TOLERANCE["rel"] * abs(result["fp32"][k])
               for k, d in result["abs_diff"].items())
    assert max(result["abs_diff"].values()) > 0          # bf16 really ran: some term rounds differently


def test_inference_runs_where_asked():
    assert inference_device("cpu") == torch.device("cpu")
    assert inference_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="one of auto, cpu, cuda"):
        inference_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            inference_device("cuda")

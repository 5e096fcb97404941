"""The GPU checks' logic (tests/gpu_cases.py) run CPU against CPU: the numbers they report must be
zero where both sides compute the same thing, and their keys must be what scripts/gpu-check reads.
Also collects tests/test_gpu.py, so a broken GPU test file is caught here too."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from gpu_cases import (agreement, counting_syncs, handler_agreement, ideal_agreement, source_agreement, source_models,
                       store_agreement)
from models import HANDLER_CASES


@pytest.fixture(scope="module")
def tiny(small_digits):
    (X, y), (Xt, yt) = small_digits.train, small_digits.test
    return (X[:40], y[:40]), (Xt[:4], yt[:4])


@pytest.mark.parametrize("per_example,projection", [("hooks", None), ("vmap", "gaussian"), ("hooks", "factored")])
def test_agreement_cpu_vs_cpu_is_exact(cnn_run, tiny, per_example, projection):
    model, ckpts = cnn_run
    r = agreement(model, ckpts, *tiny, per_example, projection, tf32=False, device_b="cpu", proj_dim=64)
    assert r["influence_rel_err"] == 0 and r["self_influence_rel_err"] == 0 and r["outliers_rel_err"] == 0
    assert r["top10_overlap"] == 1.0 and r["result_devices"] == ["cpu"]
    assert r["mode_b"] == ("factored" if projection == "factored" else per_example)
    assert 0 < r["tolerance"] < 1e-3


def test_store_and_ideal_agreement_on_cpu(cnn_run, tiny, tmp_path):
    model, ckpts = cnn_run
    r = store_agreement(model, ckpts, *tiny, tmp_path / "ix", device="cpu")
    assert r["store_dtype"] == "torch.float16" and r["auto_mode"] == "direct"
    assert r["half_products"] and r["tolerance"] == 2**-10      # 4 test rows: half products on any CPU
    assert all(r[f"{m}_rel_err"] < r["tolerance"] for m in ("direct", "resident", "stream"))
    assert r["direct_rel_err"] == r["resident_rel_err"] == r["stream_rel_err"] > 0   # same rows, same path
    data = ((tiny[0][0].flatten(1), tiny[0][1]), (tiny[1][0].flatten(1), tiny[1][1]))
    ideal = ideal_agreement(lambda: nn.Sequential(nn.Linear(64, 8), nn.Tanh(), nn.Linear(8, 10)), data,
                            device_b="cpu", steps=3)
    assert ideal == {"ideal_rel_err": 0.0, "ideal_device": "cpu"}
    with counting_syncs("cpu") as counted:
        torch.ones(3).sum().item()
    assert counted == {"syncs": 0}


@pytest.mark.parametrize("name", ["resnet_bn", "causal_lm_tied"])
def test_handler_agreement_on_cpu(name):
    r = handler_agreement(HANDLER_CASES[name], device="cpu")
    assert r["exact_rel_err"] < 1e-12 and r["factored_rel_err"] < 1e-10       # float64, same device
    assert r["exact_influence_rel_err"] == 0 and r["factored_influence_rel_err"] == 0
    assert 0 < r["exact_tolerance"] < 1e-3 and 0 < r["factored_tolerance"] < 1e-3


def test_gpu_check_script_reports_json_without_a_gpu(tmp_path):
    """scripts/gpu-check on a CPU machine (--allow-cpu --skip-bench): the gpu tests are collected and
    reported as skipped in the JSON, so the script and tests/test_gpu.py are importable and wired."""
    import json

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "check.json"
    run = subprocess.run([sys.executable, "scripts/gpu_check.py", "--allow-cpu", "--skip-bench", "--out", str(out)],
                         cwd=root, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report == json.loads(run.stdout)
    names = {c["name"] for c in report["tests"]["cases"]}
    assert "test_nccl_single_rank" in names and "test_cuda_agrees_with_cpu[vmap-factored-tf32_on]" in names
    assert "test_rerank_on_cuda_returns_the_cpu_exact_scores" in names
    assert "test_source_with_every_layer_on_cuda[llama_every_layer]" in names
    assert "test_layer_handlers_on_cuda[hf_gpt2_tied]" in names and "test_factored_routes_on_cuda[dense-vit]" in names
    if not torch.cuda.is_available():
        assert report["cuda"] is False and report["tests"]["skipped"] == len(names) == 62


@pytest.mark.parametrize("name", sorted(source_models()))
def test_source_agreement_on_cpu(name):
    """source_agreement's logic CPU vs CPU: the same draws and factors give the same scores."""
    pytest.importorskip("transformers")
    r = source_agreement(source_models()[name], "cpu", "cpu")
    assert r["scores_rel_err"] == 0 and r["self_rel_err"] == 0
    assert r["curvature"] == (["mc", "mc"] if name.startswith("llama") else ["gn", "gn"])

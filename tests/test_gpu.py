"""The exactness and Captum checks on CUDA (skipped where CUDA is absent: marked gpu)."""

from __future__ import annotations

import pytest
import torch.nn.functional as F

import tracin_engine as te

from reference import pearson, rel_err

pytestmark = pytest.mark.gpu


def test_cuda_matches_cpu(cnn_run, small_digits):
    model, ckpts = cnn_run
    test = (small_digits.test[0][:16], small_digits.test[1][:16])
    cpu = te.TracIn(model, ckpts, loss_fn=F.cross_entropy, device="cpu").index(small_digits.train, progress=False)
    gpu = te.TracIn(model, ckpts, loss_fn=F.cross_entropy, device="cuda").index(small_digits.train, progress=False)
    assert rel_err(gpu.influence(test).cpu(), cpu.influence(test)) < 1e-4
    assert rel_err(gpu.self_influence().cpu(), cpu.self_influence()) < 1e-4
    assert rel_err(gpu.outliers().scores, cpu.outliers().scores) < 1e-4  # output norms recorded on the GPU
    top_c, top_g = cpu.top_k(test, k=10), gpu.top_k(test, k=10)
    for i in range(16):
        assert set(top_c.proponents.indices[i].tolist()) == set(top_g.proponents.indices[i].tolist())


def test_cuda_float64_matches_loop_reference(cnn_run, small_digits):
    import copy

    from reference import loop_influence

    model, ckpts = cnn_run
    m64 = copy.deepcopy(model).double()
    ck64 = te.Checkpoints.from_state_dicts([{k: v.double() for k, v in ckpts.load(c).items()}
                                            for c in range(len(ckpts))], ckpts.learning_rates.tolist())
    train = (small_digits.train[0][:30].double(), small_digits.train[1][:30])
    test = (small_digits.test[0][:4].double(), small_digits.test[1][:4])
    tracin = te.TracIn(m64, ck64, loss_fn=F.cross_entropy, device="cuda")
    fast = tracin.index(train, progress=False).influence(test).cpu()
    assert rel_err(fast, loop_influence(tracin, train, test).cpu()) <= 1e-6
    assert pearson(fast, loop_influence(tracin, train, test).cpu()) > 0.999999

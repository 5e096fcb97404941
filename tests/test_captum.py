"""Agreement with an independent implementation: Captum's TracInCP (test-only dependency)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

import tracin_engine as te

from reference import pearson

captum_influence = pytest.importorskip("captum.influence")


def _captum(model, ckpts, train, layers=None):
    model = copy.deepcopy(model)  # Captum flips requires_grad on the model it is given
    def load(m, path):
        m.load_state_dict(torch.load(path, weights_only=True)["state_dict"])
        return torch.load(path, weights_only=True)["learning_rate"]

    return captum_influence.TracInCP(
        model, TensorDataset(*train), [str(c.source) for c in ckpts], checkpoints_load_func=load,
        loss_fn=torch.nn.CrossEntropyLoss(reduction="sum"), batch_size=64,
        sample_wise_grads_per_batch=True, layers=layers)


@pytest.mark.parametrize("run", ["cnn_run", "mlp_run"])
def test_matches_captum_tracincp(run, request, small_digits):
    model, ckpts = request.getfixturevalue(run)
    train = small_digits.train
    test = (small_digits.test[0][:12], small_digits.test[1][:12])
    ours = te.TracIn(model, ckpts, loss_fn=F.cross_entropy).index(train, progress=False)
    theirs = _captum(model, ckpts, train)

    S_ours, S_theirs = ours.influence(test), theirs.influence(test)
    assert pearson(S_ours, S_theirs) >= 0.9999
    assert torch.allclose(S_ours, S_theirs.float(), rtol=1e-3, atol=1e-4 * S_theirs.abs().max())

    si_theirs = theirs.self_influence()
    assert pearson(ours.self_influence(), si_theirs) >= 0.9999

    top = ours.top_k(test, k=10)
    pro_theirs = theirs.influence(test, k=10, proponents=True)
    opp_theirs = theirs.influence(test, k=10, proponents=False)
    for i in range(len(test[0])):
        assert set(top.proponents.indices[i].tolist()) == set(pro_theirs.indices[i].tolist())
        assert set(top.opponents.indices[i].tolist()) == set(opp_theirs.indices[i].tolist())


def test_matches_captum_on_last_layer(cnn_run, small_digits):
    model, ckpts = cnn_run
    test = (small_digits.test[0][:8], small_digits.test[1][:8])
    ours = te.TracIn(model, ckpts, loss_fn=F.cross_entropy, layers=["fc2"]).index(small_digits.train, progress=False)
    theirs = _captum(model, ckpts, small_digits.train, layers=["fc2"])
    assert pearson(ours.influence(test), theirs.influence(test)) >= 0.9999

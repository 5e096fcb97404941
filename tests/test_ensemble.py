"""Dropout ensembles (ensemble.py): one fixed mask per member, shared by train and test, averaged."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tracin_engine as te
from tracin_engine.methods.ensemble import EnsembleIndex, dropout_ensemble, fixed_dropout

from models import DropMLP, sgd_checkpoints


@pytest.fixture(scope="module")
def run():
    torch.manual_seed(0)
    model = DropMLP().double()
    X, y = torch.randn(40, 6, dtype=torch.float64), torch.randint(0, 3, (40,))
    Xt, yt = torch.randn(7, 6, dtype=torch.float64), torch.randint(0, 3, (7,))
    states = sgd_checkpoints(model, X, y, lr=0.3, steps=30, every=10)
    model.eval()
    ckpts = te.Checkpoints.from_state_dicts(states, [0.3, 0.2, 0.1], [10, 20, 30])
    return model, ckpts, (X, y), (Xt, yt)


def _reference_tracin(model, ckpts, mask, train, test):
    """sum_c eta_c <g_c(z'), g_c(z)> with an explicit masked forward fc2(relu(fc1 x) * mask), looped."""
    def grads(state, X, y):
        rows = []
        for x, t in zip(X, y):
            p = {k: v.detach().clone().requires_grad_(True) for k, v in state.items()}
            h = torch.relu(x[None] @ p["fc1.weight"].T + p["fc1.bias"]) * mask
            loss = F.cross_entropy(h @ p["fc2.weight"].T + p["fc2.bias"], t[None])
            g = torch.autograd.grad(loss, [p["fc1.weight"], p["fc1.bias"], p["fc2.weight"], p["fc2.bias"]])
            rows.append(torch.cat([v.flatten() for v in g]))
        return torch.stack(rows)

    return sum(lr * grads(ckpts.load(c), *test) @ grads(ckpts.load(c), *train).T
               for c, lr in enumerate(ckpts.learning_rates.tolist()))


@pytest.mark.parametrize("per_example", ["auto", "vmap"])
def test_member_uses_one_fixed_mask_for_train_and_test(run, per_example):
    model, ckpts, train, test = run
    tracin = te.TracIn(model, ckpts, loss_fn=F.cross_entropy, per_example=per_example, device="cpu")
    ens = dropout_ensemble(tracin, train, n_members=1, seed=5, progress=False)
    mask = fixed_dropout(model, 5).mask(0, model.drop, (8,))
    assert set(mask.unique().tolist()) == {0.0, 2.0} and 0 < int((mask == 0).sum()) < 8
    ref = _reference_tracin(model, ckpts, mask, train, test)
    assert torch.allclose(ens.influence(test), ref, rtol=1e-8, atol=1e-12)
    plain = tracin.index(train, progress=False).influence(test)   # no mask: a different model
    assert not torch.allclose(plain, ref, rtol=1e-3)


def test_ensemble_averages_distinct_members_and_top_k_agrees(run):
    model, ckpts, train, test = run
    tracin = te.TracIn(model, ckpts, loss_fn=F.cross_entropy, device="cpu")
    ens = dropout_ensemble(tracin, train, n_members=3, seed=0, progress=False)
    per = ens.member_influence(test)
    assert per.shape == (3, 7, 40)
    assert not torch.allclose(per[0], per[1], rtol=1e-2)
    S = ens.influence(test)
    assert torch.allclose(S, per.mean(0))
    top = ens.top_k(test, k=5)
    assert torch.equal(top.proponents.indices, S.topk(5, dim=1).indices)
    assert torch.allclose(top.opponents.scores, (-S).topk(5, dim=1).values.neg())
    selfs = torch.stack([idx.self_influence() for _, idx in ens.members]).mean(0)
    assert torch.allclose(ens.self_influence(), selfs)
    assert ens.similarity(test).abs().max() <= 1 + 1e-9


def test_source_ensemble(run):
    model, ckpts, train, test = run
    tracin = te.TracIn(model, ckpts, loss_fn=F.cross_entropy, device="cpu")
    ens = dropout_ensemble(tracin, train, n_members=2, method="source", segments=3, progress=False)
    assert all(type(idx).__name__ == "SourceIndex" for _, idx in ens.members)
    S_train = ens.influence(train)
    assert torch.allclose(torch.diagonal(S_train), ens.self_influence(), rtol=1e-6)
    with fixed_dropout(model, 1):
        single = tracin.index(train, method="source", segments=3, progress=False).influence(test)
    assert torch.allclose(ens.member_influence(test)[1], single)


def test_masks_differ_by_seed_and_dropout2d_masks_channels():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Dropout2d(0.5), nn.Flatten(), nn.Linear(4 * 4 * 4, 2))
    a, b = fixed_dropout(model, 0), fixed_dropout(model, 1)
    ma, mb = a.mask(0, model[1], (4, 4, 4)), b.mask(0, model[1], (4, 4, 4))
    assert ma.shape == (4, 1, 1) and not torch.equal(ma, mb)
    x = torch.randn(3, 1, 6, 6)
    with a:
        h = model[1](model[0](x))
    assert torch.allclose(h, model[0](x) * ma.float())


def test_errors(run):
    model, ckpts, train, _ = run
    plain = te.TracIn(nn.Sequential(nn.Linear(6, 3)).double(), te.Checkpoints.from_state_dicts(
        [nn.Sequential(nn.Linear(6, 3)).double().state_dict()], [0.1]), loss_fn=F.cross_entropy)
    with pytest.raises(te.TracInError, match="no nn.Dropout layers"):
        dropout_ensemble(plain, train)
    tracin = te.TracIn(model, ckpts, loss_fn=F.cross_entropy, device="cpu")
    with pytest.raises(te.TracInError, match="n_members must be a positive integer"):
        dropout_ensemble(tracin, train, n_members=0)
    with pytest.raises(te.TracInError, match="at least one member"):
        EnsembleIndex(tracin, [])

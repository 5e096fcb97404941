"""TracInIdeal: exact accounting of loss changes, agreement with first-order TracIn at batch size 1."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import tracin_engine as te
from tracin_engine.examples import MLP
from tracin_engine.methods.ideal import TracInIdealRecorder


def _run(data, test, steps, batch, lr, split="residual", keep_states=False, seed=0):
    X, y = data
    torch.manual_seed(seed)
    model = MLP(64, 10, hidden=12)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    rec = TracInIdealRecorder(model, F.cross_entropy, test, n_train=len(X), split=split)
    g = torch.Generator().manual_seed(seed)
    states, used = [], []
    with torch.no_grad():
        start = torch.stack([F.cross_entropy(model(test[0][j:j + 1]), test[1][j:j + 1]) for j in range(len(test[0]))])
    for _ in range(steps):
        idx = torch.randint(len(X), (batch,), generator=g) if batch > 1 else torch.randint(len(X), (1,), generator=g)
        if keep_states:
            states.append(copy.deepcopy(model.state_dict()))
            used.append(idx)
        opt.zero_grad()
        F.cross_entropy(model(X[idx]), y[idx]).backward()
        with rec.step(idx, X[idx], y[idx], lr=lr):
            opt.step()
    with torch.no_grad():
        end = torch.stack([F.cross_entropy(model(test[0][j:j + 1]), test[1][j:j + 1]) for j in range(len(test[0]))])
    return model, rec, (start - end).double(), states, used


@pytest.fixture(scope="module")
def data(small_digits):
    X, y = small_digits.train
    Xt, yt = small_digits.test
    return (X[:60].flatten(1), y[:60]), (Xt[:8].flatten(1), yt[:8])


@pytest.mark.parametrize("split", ["residual", "proportional"])
def test_shares_add_up_to_the_exact_loss_change(data, split):
    train, test = data
    _, rec, change, _, _ = _run(train, test, steps=15, batch=8, lr=0.5, split=split)
    assert rec.steps == 15 and rec.ideal.shape == (8, 60)
    assert torch.allclose(rec.ideal.sum(1), change, atol=1e-5)
    # with a large lr the higher-order remainder is not negligible, so ideal != first order
    assert float((rec.ideal - rec.first_order).abs().max()) > 1e-6


def test_batch_one_small_lr_matches_first_order_tracin(data):
    train, test = data
    model, rec, change, states, used = _run(train, test, steps=40, batch=1, lr=1e-3, keep_states=True)
    # first-order TracIn from the engine: a checkpoint before every step, each counted only for its example
    ckpts = te.Checkpoints([te.Checkpoint(s, 1e-3, step=t) for t, s in enumerate(states)])
    index = te.TracIn(model, ckpts, loss_fn=F.cross_entropy, per_example="vmap").index(train, progress=False)
    per = index.influence_per_checkpoint(test).double()  # (T, m, n)
    tracin = torch.zeros_like(rec.ideal)
    for t, idx in enumerate(used):
        tracin[:, idx] += per[t][:, idx]
    assert torch.allclose(rec.first_order, tracin, atol=1e-6, rtol=1e-4)
    scale = float(rec.ideal.abs().max())
    assert float((rec.ideal - tracin).abs().max()) < 0.02 * scale
    corr = torch.corrcoef(torch.stack([rec.ideal.flatten(), tracin.flatten()]))[0, 1]
    assert float(corr) > 0.999


def test_bad_use(data):
    train, test = data
    rec = TracInIdealRecorder(MLP(64, 10, hidden=4), F.cross_entropy, test, n_train=60)
    with pytest.raises(te.TracInError, match="without before_step"):
        rec.after_step()
    with pytest.raises(te.TracInError, match="n_train"):
        rec.before_step(torch.tensor([60]), train[0][:1], train[1][:1], 0.1)
    with pytest.raises(te.TracInError, match="split"):
        TracInIdealRecorder(MLP(64, 10), F.cross_entropy, test, n_train=60, split="even")
    rec.before_step(torch.tensor([0]), train[0][:1], train[1][:1], 0.1)
    with pytest.raises(te.TracInError, match="twice"):
        rec.before_step(torch.tensor([0]), train[0][:1], train[1][:1], 0.1)

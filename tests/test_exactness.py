"""Exact mode against the slow loop reference in float64 (relative error <= 1e-6), and invariants."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import tracin_engine as te
from tracin_engine.store.topk import reference_top_k

from reference import loop_grads, loop_influence, rel_err


@pytest.fixture(scope="module")
def f64_run(cnn_run, small_digits):
    """The CNN run converted to float64, with 60 train / 8 test examples."""
    model, ckpts = cnn_run
    m64 = copy.deepcopy(model).double()
    sds = [{k: v.double() for k, v in ckpts.load(c).items()} for c in range(len(ckpts))]
    ck64 = te.Checkpoints.from_state_dicts(sds, ckpts.learning_rates.tolist())
    (X, y), (Xt, yt) = small_digits.train, small_digits.test
    return m64, ck64, (X[:60].double(), y[:60]), (Xt[:8].double(), yt[:8])


@pytest.mark.parametrize("per_example", ["hooks", "vmap"])
@pytest.mark.parametrize("layers", [None, "last", ["conv1", "fc2"]])
def test_influence_matches_loop_reference_float64(f64_run, layers, per_example):
    model, ckpts, train, test = f64_run
    tracin = te.TracIn(model, ckpts, loss_fn=F.cross_entropy, layers=layers, per_example=per_example)
    index = tracin.index(train, batch_size=16, progress=False)
    fast = index.influence(test)
    assert fast.dtype == torch.float64
    assert rel_err(fast, loop_influence(tracin, train, test)) <= 1e-6


@pytest.mark.parametrize("per_example", ["hooks", "vmap"])
def test_prediction_target_matches_loop_reference(f64_run, per_example):
    model, ckpts, train, test = f64_run
    tracin = te.TracIn(model, ckpts, loss_fn=F.cross_entropy, per_example=per_example)
    index = tracin.index(train, progress=False)
    fast = index.influence((test[0],), target="prediction")  # unlabeled test data
    assert rel_err(fast, loop_influence(tracin, train, (test[0],), target="prediction")) <= 1e-6


def test_user_target_function_is_negated_loss_of_that_value(f64_run):
    """target=f explains f(output): scores equal those of the 'loss' -f."""
    model, ckpts, train, test = f64_run
    tracin = te.TracIn(model, ckpts, loss_fn=lambda out, y: -out[:, 3].sum(), layers="last")
    index = tracin.index(train, progress=False)
    via_loss = index.influence((test[0], torch.zeros(len(test[0]), dtype=torch.long)))
    via_target = index.influence((test[0],), target=lambda out: out[:, 3].sum())
    # the training side uses loss_fn for both, so only the test objective differs: f vs -(-f)
    assert torch.allclose(via_loss, via_target, rtol=1e-10, atol=1e-12)


def test_self_influence_is_diagonal_of_influence(cnn_index, small_digits):
    X, y = small_digits.train
    S = cnn_index.influence((X[:50], y[:50]))
    si = cnn_index.self_influence()[:50]
    assert rel_err(S.diagonal(), si) < 1e-5
    assert (si > 0).all()


def test_per_checkpoint_terms_sum_to_totals(cnn_index, small_digits):
    test = (small_digits.test[0][:5], small_digits.test[1][:5])
    per = cnn_index.influence_per_checkpoint(test)
    assert per.shape == (4, 5, cnn_index.n_train)
    assert rel_err(per.sum(0), cnn_index.influence(test)) < 1e-5
    assert rel_err(cnn_index.self_influence_per_checkpoint().sum(0), cnn_index.self_influence()) < 1e-12


def test_top_k_streaming_equals_full_sort(cnn_index, small_digits):
    test = (small_digits.test[0][:10], small_digits.test[1][:10])
    S = cnn_index.influence(test)
    ref = reference_top_k(S, 7)
    got = cnn_index.top_k(test, k=7, block_size=37)  # many uneven blocks
    assert torch.equal(got.proponents.indices, ref.proponents.indices)
    assert torch.equal(got.opponents.indices, ref.opponents.indices)
    assert torch.allclose(got.proponents.scores, ref.proponents.scores)
    assert (got.proponents.scores > 0).all() and (got.opponents.scores < 0).all()
    assert (got.proponents.scores[:, :-1] >= got.proponents.scores[:, 1:]).all()


def test_permuting_training_set_permutes_scores(cnn_run, small_digits):
    model, ckpts = cnn_run
    X, y = small_digits.train
    test = (small_digits.test[0][:6], small_digits.test[1][:6])
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(3))
    tracin = te.TracIn(model, ckpts, loss_fn=F.cross_entropy)
    a = tracin.index((X, y), progress=False)
    b = tracin.index((X[perm], y[perm]), progress=False)
    assert torch.allclose(a.influence(test)[:, perm], b.influence(test), rtol=1e-4, atol=1e-5)
    assert torch.allclose(a.self_influence()[perm], b.self_influence())


def test_similarity_is_weighted_mean_cosine(cnn_index, small_digits):
    test = (small_digits.test[0][:4], small_digits.test[1][:4])
    sim = cnn_index.similarity(test)
    g_test = loop_grads(cnn_index.tracin, *test)
    g_train = loop_grads(cnn_index.tracin, *small_digits.train)
    lrs = cnn_index.learning_rates
    ref = torch.zeros_like(sim, dtype=torch.float64)
    for c in range(len(lrs)):
        ref += lrs[c] / lrs.sum() * F.normalize(g_test[c].double(), dim=1) @ F.normalize(g_train[c].double(), dim=1).T
    assert rel_err(sim, ref) < 1e-5
    assert sim.abs().max() <= 1 + 1e-6


def test_data_forms_agree(cnn_run, small_digits):
    """(X, y) tuple, Dataset, DataLoader and a batch_fn over dicts give the same scores."""
    from torch.utils.data import DataLoader, TensorDataset

    model, ckpts = cnn_run
    X, y = small_digits.train[0][:40], small_digits.train[1][:40]
    test = (small_digits.test[0][:3], small_digits.test[1][:3])
    tracin = te.TracIn(model, ckpts, loss_fn=F.cross_entropy, layers="last")
    ref = tracin.index((X, y), progress=False).influence(test)
    ds = TensorDataset(X, y)
    dicts = [{"image": X[i], "label": y[i]} for i in range(40)]
    forms = [
        tracin.index(ds, batch_size=7, progress=False),
        tracin.index(DataLoader(ds, batch_size=9), progress=False),
        tracin.index(DataLoader(dicts, batch_size=8), batch_fn=lambda b: (b["image"], b["label"]), progress=False),
    ]
    for index in forms:
        assert torch.allclose(index.influence(test), ref, rtol=1e-5, atol=1e-6)


def test_hook_features_are_smaller_and_exact(cnn_run, small_digits):
    """The factored (a, g) rows of Linear layers give the same scores as flat vmap gradients."""
    model, ckpts = cnn_run
    test = (small_digits.test[0][:5], small_digits.test[1][:5])
    hooks = te.TracIn(model, ckpts, loss_fn=F.cross_entropy)
    flat = te.TracIn(model, ckpts, loss_fn=F.cross_entropy, per_example="vmap")
    assert hooks.featurizer.mode == "hooks" and hooks.dim < flat.dim / 2
    a, b = hooks.index(small_digits.train, progress=False), flat.index(small_digits.train, progress=False)
    assert rel_err(a.influence(test), b.influence(test)) < 1e-5
    assert rel_err(a.self_influence(), b.self_influence()) < 1e-5
    assert rel_err(a.similarity(test), b.similarity(test)) < 1e-5


def test_checkpoints_loaded_once_per_pass(cnn_run, small_digits, monkeypatch):
    model, ckpts = cnn_run
    fresh = te.Checkpoints.from_files([c.source for c in ckpts], ckpts.learning_rates.tolist())
    calls = []
    real = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    tracin = te.TracIn(model, fresh, loss_fn=F.cross_entropy, layers="last")
    tracin.index(small_digits.train, batch_size=10, progress=False)  # 30 batches x 4 checkpoints
    assert len(calls) == len(fresh)


@pytest.mark.parametrize("per_example,mode", [("auto", "hooks"), ("vmap", "vmap")])
def test_batchnorm_buffers_and_eval_mode(per_example, mode):
    """Models with buffers (BatchNorm running stats) and dropout, in eval mode: the BatchNorm handler
    (hooks) and vmap both agree with the loop."""
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Dropout(0.5), nn.Linear(6, 3)).double()
    model.train()
    for _ in range(3):  # give the running statistics non-trivial values
        model(torch.randn(16, 5, dtype=torch.float64))
    ckpts = te.Checkpoints.from_state_dicts([model.state_dict()], [0.3])
    X, y = torch.randn(12, 5, dtype=torch.float64), torch.randint(0, 3, (12,))
    tracin = te.TracIn(model, ckpts, loss_fn=F.cross_entropy, per_example=per_example)
    assert tracin.featurizer.mode == mode
    index = tracin.index((X, y), progress=False)
    test = (X[:4], y[:4])
    assert rel_err(index.influence(test), loop_influence(tracin, (X, y), test)) <= 1e-6
    assert model.training  # the user's mode is restored


def test_query_path_and_batch_path_give_the_same_features(cnn_index, small_digits):
    """Small queries take all checkpoints in one backward pass; larger ones go checkpoint by checkpoint."""
    X, y = small_digits.train
    big = cnn_index.tracin.features((X[:70], y[:70]))       # > 64 examples: per-checkpoint batches
    small = cnn_index.tracin.features((X[:9], y[:9]))       # a query: TracIn.featurizer.many
    assert big.shape == (4, 70, cnn_index.tracin.dim)
    assert torch.allclose(big[:, :9], small, rtol=1e-5, atol=1e-7)


class _Histogram(torch.nn.Module):
    """A forward calling an op torch.func has no batching rule for (torch.histc, as Mixtral's router does)."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(x) + 0 * torch.histc(x.detach(), bins=4).sum()


def test_vmap_stays_quiet_about_torch_missing_batching_rules():
    """torch's 'performance drop ... batching rule' note is about torch itself, nothing a user can act on: the
    per-example gradients stay exact and no warning reaches the notebook."""
    import warnings

    from tracin_engine.gradients.per_example import GradientComputer

    torch.manual_seed(0)
    model = _Histogram().double()
    gc = GradientComputer(model, F.cross_entropy, device="cpu")
    state = gc.prepare(model.state_dict())
    x, y = torch.randn(3, 4, dtype=torch.float64), torch.randint(0, 3, (3,))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = gc.per_example(state, x, y)
    assert not [w for w in caught if "batching rule" in str(w.message)]
    assert torch.allclose(got, gc.reference(state, x, y), rtol=1e-12, atol=1e-14)

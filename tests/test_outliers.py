"""Self-influence outliers, renormalized influence and the neighbour label-agreement measure."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import tracin_engine as te
from tracin_engine.analysis.neighbors_quality import compare_views, label_agreement
from tracin_engine.analysis.outliers import rank_outliers, renormalized_influence, renormalized_top_k, self_influence_terms
from tracin_engine.store.topk import reference_top_k


def _q(index):
    """||g_c(z)||^2 recomputed from the stored rows (not the stored sq_norms): (C, n) float64."""
    return torch.stack([index.layout.sq_norms(index.features(c)) for c in range(index.store.n_checkpoints)])


def _output_reference(cnn_run, small_digits):
    """(||dl/df_c(z)||^2, l_c(z)) for every training example and checkpoint, one example at a time
    through a plain nn.Module (not the engine's featurizer): two Tensors (C, n) float64."""
    model, ckpts = cnn_run
    X, y = small_digits.train
    model = copy.deepcopy(model).eval()
    sq, losses = torch.zeros(len(ckpts), len(X), dtype=torch.float64), torch.zeros(len(ckpts), len(X), dtype=torch.float64)
    for c in range(len(ckpts)):
        model.load_state_dict(ckpts.load(c))
        for i in range(len(X)):
            out = model(X[i:i + 1]).detach().requires_grad_(True)
            loss = F.cross_entropy(out, y[i:i + 1])
            (g,) = torch.autograd.grad(loss, out)
            sq[c, i], losses[c, i] = float((g.double() ** 2).sum()), float(loss.detach())
    return sq, losses


def test_output_space_self_influence_matches_a_per_example_loop(cnn_index, cnn_run, small_digits):
    sq, losses = _output_reference(cnn_run, small_digits)
    torch.testing.assert_close(cnn_index.store.out_sq_norms, sq, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(cnn_index.store.losses, losses, rtol=1e-5, atol=1e-7)
    # cross-entropy: dl/df = softmax(f) - onehot(y), so ||dl/df||^2 <= 2, and 0 only for a perfect fit
    assert float(sq.max()) <= 2 and float(sq.min()) > 0
    eta = cnn_index.learning_rates
    out = rank_outliers(cnn_index)  # default: output space
    torch.testing.assert_close(out.scores, (eta.unsqueeze(1) * sq).sum(0), rtol=1e-5, atol=1e-9)
    assert torch.equal(out.indices, cnn_index.outliers().indices)
    # the parameter space differs (it is the paper's self-influence) and is one call away
    params = rank_outliers(cnn_index, space="parameters")
    assert torch.allclose(params.scores, cnn_index.self_influence(), rtol=1e-6)
    assert not torch.allclose(params.scores / params.scores.sum(), out.scores / out.scores.sum(), rtol=0.05)


@pytest.mark.parametrize("kwargs", [dict(per_example="vmap"), dict(proj_dim=256, projection="factored"),
                                    dict(proj_dim=256)])
def test_every_featurization_path_records_the_same_output_norms(cnn_run, small_digits, cnn_index, kwargs):
    model, ckpts = cnn_run
    X, y = small_digits.train[0][:70], small_digits.train[1][:70]
    other = te.TracIn(model, ckpts, loss_fn=F.cross_entropy, **kwargs).index((X, y), progress=False, batch_size=32)
    torch.testing.assert_close(other.store.out_sq_norms, cnn_index.store.out_sq_norms[:, :70], rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(other.store.losses, cnn_index.store.losses[:, :70], rtol=1e-5, atol=1e-7)


def test_output_space_needs_recorded_norms(cnn_index):
    store = cnn_index.store
    saved = store.out_sq_norms.clone()
    try:
        store.out_sq_norms[1, 5] = float("nan")  # a row written without them (e.g. FeatureStore.write by hand)
        with pytest.raises(te.TracInError, match="no output-gradient norms.*space='parameters'"):
            cnn_index.outliers()
        assert len(cnn_index.outliers(space="parameters").indices) == cnn_index.n_train
    finally:
        store.out_sq_norms.copy_(saved)
    with pytest.raises(te.TracInError, match="space must be one of"):
        cnn_index.outliers(space="logits")


def test_self_influence_formulas(cnn_index):
    q, eta = _q(cnn_index), cnn_index.learning_rates
    none = rank_outliers(cnn_index, space="parameters")  # normalize "none"
    assert torch.allclose(none.scores, (eta.unsqueeze(1) * q).sum(0), rtol=1e-4)
    assert torch.allclose(none.scores, cnn_index.self_influence(), rtol=1e-6)
    ck = rank_outliers(cnn_index, normalize="checkpoint", space="parameters")
    ref = sum(float(eta[c]) * q[c] / q[c].mean() for c in range(len(eta)))
    assert torch.allclose(ck.scores, ref, rtol=1e-4)
    assert torch.allclose(ck.per_checkpoint.sum(0), ck.scores)
    lg = rank_outliers(cnn_index, normalize="log", space="parameters").scores
    ref = sum(float(eta[c] / eta.sum()) * torch.log(q[c] / q[c].mean()) for c in range(len(eta)))
    assert torch.allclose(lg, ref, atol=1e-4)
    # ranked highest first, and top() takes ceil(fraction * n)
    assert bool((ck.scores[ck.indices][:-1] >= ck.scores[ck.indices][1:]).all())
    assert len(ck.top(0.1)) == math.ceil(0.1 * cnn_index.n_train) and int(ck.top(0.1)[0]) == int(ck.indices[0])


def test_checkpoint_choice_and_scale_invariance(cnn_index):
    one = rank_outliers(cnn_index, checkpoints=[-1], normalize="none", space="parameters")
    assert torch.allclose(one.scores, cnn_index.self_influence(weights=torch.tensor([0.0, 0, 0, 1]) * cnn_index.learning_rates[-1]))
    assert bool((one.per_checkpoint[:3] == 0).all())
    # "checkpoint" and "log" rankings do not change when one checkpoint's gradients are rescaled
    terms = self_influence_terms(cnn_index, normalize="checkpoint", space="parameters")
    store = cnn_index.store
    saved = store.sq_norms.clone()
    try:
        store.sq_norms[0] *= 1e4
        assert torch.allclose(self_influence_terms(cnn_index, normalize="checkpoint", space="parameters"), terms)
        assert not torch.allclose(self_influence_terms(cnn_index, normalize="none", space="parameters")[0],
                                  saved[0] * cnn_index.learning_rates[0])
    finally:
        store.sq_norms.copy_(saved)


def test_renormalized_influence_matches_loop(cnn_index, small_digits):
    feats = cnn_index.tracin.features(small_digits.test)
    per = cnn_index.influence_per_checkpoint(features=feats).double()  # (C, m, n)
    norms = cnn_index.store.sq_norms.sqrt()
    ref = sum(per[c] / norms[c].unsqueeze(0) for c in range(per.shape[0]))
    R = renormalized_influence(cnn_index, features=feats, block_size=77)
    assert torch.allclose(R.double(), ref, rtol=1e-4, atol=1e-6)
    top = renormalized_top_k(cnn_index, features=feats, k=5, block_size=64)
    assert torch.equal(top.proponents.indices, reference_top_k(R, 5).proponents.indices)


def test_label_agreement_and_views(cnn_index, small_digits):
    agree = label_agreement(torch.tensor([[0, 1], [2, 2]]), torch.tensor([3, 4, 5]), torch.tensor([3, 5]))
    assert agree.tolist() == [0.5, 1.0]
    views = compare_views(cnn_index, small_digits.train, small_digits.test, k=5)
    assert set(views) == {"influence proponents", "influence opponents", "renormalized proponents",
                          "similarity proponents", "embedding neighbours"}
    assert views["influence proponents"] > views["influence opponents"]
    assert views["embedding neighbours"] > 0.3  # chance is 0.1


def test_bad_input(cnn_index):
    with pytest.raises(te.TracInError, match="normalize"):
        rank_outliers(cnn_index, normalize="zscore")
    with pytest.raises(te.TracInError, match="checkpoints"):
        rank_outliers(cnn_index, checkpoints=[9])
    with pytest.raises(te.TracInError, match="weights"):
        rank_outliers(cnn_index, weights=[1.0, 2.0])
    with pytest.raises(te.TracInError, match="sum to zero"):
        rank_outliers(cnn_index, weights=[0.0, 0, 0, 0])


def test_output_stats_in_train_mode_leave_the_checkpoint_buffers_alone():
    from tracin_engine.gradients.per_example import GradientComputer

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    gc = GradientComputer(model, F.cross_entropy, device="cpu", train_mode=True)
    state = gc.prepare({k: v.clone() for k, v in model.state_dict().items()})
    before = {k: v.clone() for k, v in state.items()}
    x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
    out_sq, losses = gc.output_stats(state, x, y)
    assert all(torch.equal(state[k], before[k]) for k in state)           # running_mean/var untouched
    with torch.no_grad():                                                   # train-mode forward on a copy
        ref = copy.deepcopy(model).train()(x)
    assert torch.allclose(losses, F.cross_entropy(ref, y, reduction="none").double(), atol=1e-6)
    p = ref.softmax(1) - F.one_hot(y, 3)
    assert torch.allclose(out_sq, (p.double() ** 2).sum(1), atol=1e-6)
    with pytest.raises(te.TracInError, match="no labels"):
        gc.output_stats(state, x, None)

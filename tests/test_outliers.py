"""Self-influence outliers, renormalized influence and the neighbour label-agreement measure."""

from __future__ import annotations

import math

import pytest
import torch

import tracin_engine as te
from tracin_engine.neighbors_quality import compare_views, label_agreement
from tracin_engine.outliers import rank_outliers, renormalized_influence, renormalized_top_k, self_influence_terms
from tracin_engine.topk import reference_top_k


def _q(index):
    """||g_c(z)||^2 recomputed from the stored rows (not the stored sq_norms): (C, n) float64."""
    return torch.stack([index.layout.sq_norms(index.features(c)) for c in range(index.store.n_checkpoints)])


def test_self_influence_formulas(cnn_index):
    q, eta = _q(cnn_index), cnn_index.learning_rates
    none = rank_outliers(cnn_index)  # default "none"
    assert torch.allclose(none.scores, (eta.unsqueeze(1) * q).sum(0), rtol=1e-4)
    assert torch.allclose(none.scores, cnn_index.self_influence(), rtol=1e-6)
    ck = rank_outliers(cnn_index, normalize="checkpoint")
    ref = sum(float(eta[c]) * q[c] / q[c].mean() for c in range(len(eta)))
    assert torch.allclose(ck.scores, ref, rtol=1e-4)
    assert torch.allclose(ck.per_checkpoint.sum(0), ck.scores)
    lg = rank_outliers(cnn_index, normalize="log").scores
    ref = sum(float(eta[c] / eta.sum()) * torch.log(q[c] / q[c].mean()) for c in range(len(eta)))
    assert torch.allclose(lg, ref, atol=1e-4)
    # ranked highest first, and top() takes ceil(fraction * n)
    assert bool((ck.scores[ck.indices][:-1] >= ck.scores[ck.indices][1:]).all())
    assert len(ck.top(0.1)) == math.ceil(0.1 * cnn_index.n_train) and int(ck.top(0.1)[0]) == int(ck.indices[0])


def test_checkpoint_choice_and_scale_invariance(cnn_index):
    one = rank_outliers(cnn_index, checkpoints=[-1], normalize="none")
    assert torch.allclose(one.scores, cnn_index.self_influence(weights=torch.tensor([0.0, 0, 0, 1]) * cnn_index.learning_rates[-1]))
    assert bool((one.per_checkpoint[:3] == 0).all())
    # "checkpoint" and "log" rankings do not change when one checkpoint's gradients are rescaled
    terms = self_influence_terms(cnn_index, normalize="checkpoint")
    store = cnn_index.store
    saved = store.sq_norms.clone()
    try:
        store.sq_norms[0] *= 1e4
        assert torch.allclose(self_influence_terms(cnn_index, normalize="checkpoint"), terms)
        assert not torch.allclose(self_influence_terms(cnn_index, normalize="none")[0], saved[0] * cnn_index.learning_rates[0])
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

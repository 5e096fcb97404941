"""top_k(rerank=M): projected candidates rescored with exact gradients (methods/rerank.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import tracin_engine as te

from models import lm_loss, sgd_checkpoints, topic_lm

V, T = 200, 10


@pytest.fixture(scope="module")
def lm_run():
    """A tied-embedding causal LM, two checkpoints of 15 Adam steps each on two topics of 100 words."""
    model, ids, y, states = topic_lm(V, T, n=50, topics=2, steps=30, saves=2)
    ck = te.Checkpoints.from_state_dicts(states, [3e-3, 1e-3])
    return model, ck, (ids[:40], y[:40]), (ids[40:], y[40:])


def _same_ranking(got, want) -> None:
    """Same ranked training examples (Neighbors (m, k)) up to the order of ties: the exact scores agree
    position by position within float32 rounding (1e-5 of the largest), and the indices agree wherever
    a score is not tied (within that) with a neighbour or the list's boundary (the last place)."""
    w, tol = want.scores.double(), 1e-5 * float(want.scores.abs().max())
    assert torch.allclose(got.scores.double(), w, rtol=0, atol=tol)
    near = (w[:, 1:] - w[:, :-1]).abs() <= tol
    tied = torch.zeros_like(w, dtype=torch.bool)
    tied[:, 1:] |= near
    tied[:, :-1] |= near
    tied[:, -1] = True
    assert bool(((got.indices == want.indices) | tied).all()), (got.indices, want.indices)


def _overlap(a: torch.Tensor, b: torch.Tensor) -> float:
    return sum(len(set(a[i].tolist()) & set(b[i].tolist())) for i in range(len(a))) / a.numel()


def test_rerank_returns_exact_scores_and_beats_the_projection(lm_run):
    model, ck, train, test = lm_run
    exact = te.TracIn(model, ck, loss_fn=lm_loss).index(train, progress=False)
    S = exact.influence(test).double()                                       # (10, 40) float64 reference
    proj = te.TracIn(model, ck, loss_fn=lm_loss, proj_dim=24).index(train, progress=False)
    plain = proj.top_k(test, k=5)
    best = proj.top_k(test, k=5, rerank=12, train_data=train)
    assert best.proponents.indices.shape == (10, 5) and best.opponents.indices.shape == (10, 5)
    tol = 1e-5 * float(S.abs().max())                                        # float32 gradients and sums
    for nb in (best.proponents, best.opponents):
        assert torch.allclose(nb.scores.double(), S.gather(1, nb.indices), rtol=0, atol=tol)
    assert (best.proponents.scores[:, :-1] >= best.proponents.scores[:, 1:]).all()
    assert (best.opponents.scores[:, :-1] <= best.opponents.scores[:, 1:]).all()
    truth = exact.top_k(test, k=5)
    # every true top-5 member among the projected candidates is returned: rerank never loses one
    cand = proj.top_k(test, k=12)
    union = set(torch.cat([cand.proponents.indices.flatten(), cand.opponents.indices.flatten()]).tolist())
    for i in range(10):
        kept = set(truth.proponents.indices[i].tolist()) & union
        assert kept <= set(best.proponents.indices[i].tolist())
    before = _overlap(truth.proponents.indices, plain.proponents.indices)
    after = _overlap(truth.proponents.indices, best.proponents.indices)
    assert after >= before and after >= 0.9, (before, after)


def test_rerank_over_every_candidate_is_the_exact_top_k(lm_run):
    model, ck, train, test = lm_run
    truth = te.TracIn(model, ck, loss_fn=lm_loss).index(train, progress=False).top_k(test, k=4)
    proj = te.TracIn(model, ck, loss_fn=lm_loss, proj_dim=20).index(train, progress=False)
    best = proj.top_k(test, k=4, rerank=40, train_data=train)
    _same_ranking(best.proponents, truth.proponents)
    _same_ranking(best.opponents, truth.opponents)


def test_rerank_refuses_other_data_and_bad_arguments(lm_run):
    model, ck, train, test = lm_run
    proj = te.TracIn(model, ck, loss_fn=lm_loss, proj_dim=20).index(train, progress=False)
    with pytest.raises(te.TracInError, match="train_data="):
        proj.top_k(test, k=3, rerank=5)
    shuffled = (train[0].flip(0), train[1].flip(0))
    with pytest.raises(te.TracInError, match="not the data this index was built from"):
        proj.top_k(test, k=3, rerank=5, train_data=shuffled)
    with pytest.raises(te.TracInError, match="holds 40"):
        proj.top_k(test, k=3, rerank=5, train_data=(train[0][:30], train[1][:30]))
    with pytest.raises(te.TracInError, match=">= k=3"):
        proj.top_k(test, k=3, rerank=2, train_data=train)
    feats = proj.test_features(test)
    with pytest.raises(te.TracInError, match="needs test_data"):
        proj.top_k(k=3, rerank=5, train_data=train, features=feats)
    # the accepted object is remembered; changed in place afterwards, it is checked again and refused
    data = (train[0].clone(), train[1].clone())
    proj.top_k(test, k=3, rerank=5, train_data=data)
    data[0][0, 0] = (data[0][0, 0] + 1) % 100
    with pytest.raises(te.TracInError, match="not the data this index was built from"):
        proj.top_k(test, k=3, rerank=5, train_data=data)


def test_rerank_on_an_exact_index_changes_nothing():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    X, y = torch.randn(30, 5), torch.randint(0, 3, (30,))
    ck = te.Checkpoints.from_state_dicts(sgd_checkpoints(model, X, y, lr=0.1, steps=2, every=1), [0.1, 0.1])
    index = te.TracIn(model, ck).index((X, y), progress=False)
    a = index.top_k((X[:4], y[:4]), k=3)
    b = index.top_k((X[:4], y[:4]), k=3, rerank=6, train_data=(X, y))
    assert torch.equal(a.proponents.indices, b.proponents.indices)
    assert torch.equal(a.opponents.scores, b.opponents.scores)


def test_rerank_with_dict_batches_and_prediction_targets():
    transformers = pytest.importorskip("transformers")  # noqa: F841
    from models import hf_bert, token_batch
    torch.manual_seed(2)
    model = hf_bert(vocab=40, dim=16, depth=1, heads=2, seq=8, classes=3).model   # dict batches, ModelOutput
    ids = token_batch(24, 8, 40, pad=0, seed=3)
    data = {"input_ids": ids, "attention_mask": (ids != 0).long(), "labels": torch.randint(0, 3, (24,))}
    ck = te.Checkpoints.from_state_dicts([model.state_dict()], [1.0])
    truth = te.TracIn(model, ck).index(data, progress=False)
    proj = te.TracIn(model, ck, proj_dim=32).index(data, progress=False)
    test = {"input_ids": ids[:3], "attention_mask": (ids[:3] != 0).long()}
    best = proj.top_k(test, k=3, rerank=24, target="prediction", train_data=data)
    want = truth.top_k(test, k=3, target="prediction")
    _same_ranking(best.proponents, want.proponents)


def test_exact_terms_per_checkpoint_match_the_exact_index(lm_run):
    model, ck, train, test = lm_run
    exact = te.TracIn(model, ck, loss_fn=lm_loss).index(train, progress=False).influence_per_checkpoint(test)
    proj = te.TracIn(model, ck, loss_fn=lm_loss, proj_dim=20).index(train, progress=False)
    rows = torch.tensor([3, 17, 0, 39, 17])
    terms = proj.exact_influence_per_checkpoint(test, train, rows)
    assert terms.shape == (2, 10, 5) and terms.dtype == torch.float64
    assert torch.allclose(terms, exact[:, :, rows].double(), rtol=1e-4, atol=1e-5 * float(exact.abs().max()))
    with pytest.raises(te.TracInError, match="0..39"):
        proj.exact_influence_per_checkpoint(test, train, [40])


def test_rerank_on_a_cnn_with_batchnorm_and_low_rank_rows():
    from models import ResNet
    torch.manual_seed(3)
    model = ResNet(width=16, blocks=(1, 1)).eval()        # 4x4 inputs: the second stage's convs are low-rank rows
    X, y = torch.randn(24, 3, 4, 4), torch.randint(0, 10, (24,))
    ck = te.Checkpoints.from_state_dicts([model.state_dict()], [0.5])
    truth = te.TracIn(model, ck).index((X, y), progress=False).top_k((X[:3], y[:3]), k=4)
    proj = te.TracIn(model, ck, proj_dim=64).index((X, y), progress=False)
    best = proj.top_k((X[:3], y[:3]), k=4, rerank=24, train_data=(X, y))
    assert proj.tracin.exact().featurizer.layout.lowrank
    _same_ranking(best.proponents, truth.proponents)
    _same_ranking(best.opponents, truth.opponents)


def test_auto_rerank_widens_until_the_exact_top_k_is_certain(lm_run):
    model, ck, train, test = lm_run                 # a coarse projection: auto ends up rescoring everything
    truth = te.TracIn(model, ck, loss_fn=lm_loss).index(train, progress=False).top_k(test, k=5)
    proj = te.TracIn(model, ck, loss_fn=lm_loss, proj_dim=20).index(train, progress=False)
    best = proj.top_k(test, k=5, rerank="auto", train_data=train)
    _same_ranking(best.proponents, truth.proponents)
    _same_ranking(best.opponents, truth.opponents)
    proj.top_k((test[0][:1], test[1][:1]), k=5, rerank=5, train_data=train)
    assert proj.last_rerank["rounds"] == 1 and proj.last_rerank["rescored"] <= 10


def test_auto_rerank_rescores_only_what_the_error_leaves_in_doubt():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 3))
    X = torch.randn(220, 10)
    y = X[:, :3].argmax(1)
    states = sgd_checkpoints(model, X[:200], y[:200], lr=0.3, steps=60, every=20)
    ck = te.Checkpoints.from_state_dicts(states, [0.3] * 3)
    train, test = (X[:200], y[:200]), (X[200:], y[200:])
    truth = te.TracIn(model, ck).index(train, progress=False).top_k(test, k=5)
    proj = te.TracIn(model, ck, proj_dim=64).index(train, progress=False)
    plain = proj.top_k(test, k=5)
    assert _overlap(truth.proponents.indices, plain.proponents.indices) < 0.95     # the projection alone errs
    rescored = []
    for i in range(20):                                   # one query at a time, as a gallery asks
        best = proj.top_k((test[0][i:i + 1], test[1][i:i + 1]), k=5, rerank="auto", train_data=train)
        _same_ranking(best.proponents, truth[i].proponents)
        _same_ranking(best.opponents, truth[i].opponents)
        rescored.append(proj.last_rerank["rescored"])
    assert min(rescored) >= 30 and sum(rescored) / 20 < 75, rescored    # 2 k each way, a 2 k probe, the doubtful


def test_auto_rerank_warns_when_it_stops_before_certainty(lm_run, monkeypatch):
    from tracin_engine.methods import rerank
    model, ck, train, test = lm_run
    proj = te.TracIn(model, ck, loss_fn=lm_loss, proj_dim=20).index(train, progress=False)
    monkeypatch.setattr(rerank, "AUTO_LIMIT", 0.0)    # stop after the first round: 2 k each way and a 2 k probe
    monkeypatch.setattr(rerank, "AUTO_EXTRA", 0)
    with pytest.warns(UserWarning, match="rerank=.auto. stopped after rescoring 12 of 40"):
        proj.top_k((test[0][:1], test[1][:1]), k=2, rerank="auto", train_data=train)
    assert proj.last_rerank["rounds"] == 1


def test_rerank_from_a_reloaded_disk_index(lm_run, tmp_path):
    model, ck, train, test = lm_run
    truth = te.TracIn(model, ck, loss_fn=lm_loss).index(train, progress=False).top_k(test, k=3)
    te.TracIn(model, ck, loss_fn=lm_loss, proj_dim=20).index(train, store=tmp_path / "ix", progress=False)
    fresh = te.TracIn(model, ck, loss_fn=lm_loss, proj_dim=20)                   # a new session: nothing cached
    index = te.GradientIndex.load(tmp_path / "ix", fresh, train_data=train)
    assert index.store.dtype == torch.float16                                      # projected rows on disk
    best = index.top_k(test, k=3, rerank=40, train_data=train)
    _same_ranking(best.proponents, truth.proponents)
    other = (train[0], train[1].roll(1, 0))                                        # same inputs, other labels
    with pytest.raises(te.TracInError, match="not the data this index was built from"):
        te.GradientIndex.load(tmp_path / "ix", fresh).top_k(test, k=3, rerank=5, train_data=other)


def test_rerank_on_a_gru_text_model():
    """A GRU (layer handlers: rnn.py) with a coarse projection (proj_dim 64). n = 40, k = 4, 3 test examples:
    the first candidates and the probe alone are 37 rows, past half the set; "auto" still takes one more
    round (AUTO_EXTRA) and returns the exact lists without a warning (it used to stop at 37 of 40, with
    3 candidates left, one of them a true proponent)."""
    import warnings

    class GRUText(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.gru, self.out = nn.Embedding(30, 8), nn.GRU(8, 12, batch_first=True), nn.Linear(12, 3)

        def forward(self, ids):
            h, _ = self.gru(self.emb(ids))
            return self.out(h[:, -1])

    torch.manual_seed(0)
    model = GRUText()
    X, y = torch.randint(0, 30, (40, 7)), torch.randint(0, 3, (40,))
    ck = te.Checkpoints.from_state_dicts([model.state_dict()], [1.0])
    truth = te.TracIn(model, ck).index((X, y), progress=False).top_k((X[:3], y[:3]), k=4)
    proj = te.TracIn(model, ck, proj_dim=64).index((X, y), progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        best = proj.top_k((X[:3], y[:3]), k=4, rerank="auto", train_data=(X, y))
    assert proj.last_rerank["rounds"] == 2 and proj.last_rerank["rescored"] > 20
    _same_ranking(best.proponents, truth.proponents)
    _same_ranking(best.opponents, truth.opponents)

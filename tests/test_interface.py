"""One contract, three implementations: GradientIndex (TracInCP), SourceIndex (SOURCE) and
EnsembleIndex (dropout ensemble) answer the same InfluenceIndex queries with the same conventions
(tracin_engine/interface.py). Every test here runs against all three."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import tracin_engine as te
from tracin_engine.store.topk import reference_top_k

from models import DropMLP, sgd_checkpoints

KINDS = ["tracin", "source", "ensemble"]


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = DropMLP(p=0.3).double()
    X, y = torch.randn(30, 6, dtype=torch.float64), torch.randint(0, 3, (30,))
    Xt, yt = torch.randn(5, 6, dtype=torch.float64), torch.randint(0, 3, (5,))
    states = sgd_checkpoints(model, X, y, lr=0.3, steps=30, every=10)
    model.eval()
    ckpts = te.Checkpoints.from_state_dicts(states, [0.3, 0.2, 0.1], [10, 20, 30])
    tracin = te.TracIn(model, ckpts, loss_fn=F.cross_entropy)
    indexes = {"tracin": tracin.index((X, y), progress=False),
               "source": tracin.index((X, y), method="source", segments=1, progress=False),
               "ensemble": te.dropout_ensemble(tracin, (X, y), n_members=2, progress=False)}
    return tracin, indexes, (X, y), (Xt, yt)


@pytest.fixture(params=KINDS)
def case(request, setup):
    tracin, indexes, train, test = setup
    return indexes[request.param], train, test


def test_declares_the_protocol(case):
    index, _, _ = case
    assert isinstance(index, te.InfluenceIndex)
    assert index.n_train == 30
    assert index.learning_rates.shape == (index.n_checkpoints,)


def test_features_and_test_data_give_the_same_scores(case):
    index, _, test = case
    feats = index.test_features(test)
    s_data, s_feats = index.influence(test), index.influence(features=feats)
    assert s_data.shape == (5, 30)
    torch.testing.assert_close(s_data, s_feats, rtol=1e-12, atol=1e-12)


def test_per_checkpoint_terms_sum_to_the_scores(case):
    index, _, test = case
    per = index.influence_per_checkpoint(test)
    assert per.shape == (index.n_checkpoints, 5, 30)
    torch.testing.assert_close(per.sum(0), index.influence(test), rtol=1e-10, atol=1e-12)


def test_top_k_ranks_the_scores(case):
    index, _, test = case
    best = index.top_k(test, k=4)
    ref = reference_top_k(index.influence(test), 4)
    torch.testing.assert_close(best.proponents.scores.double(), ref.proponents.scores.double(), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(best.opponents.scores.double(), ref.opponents.scores.double(), rtol=1e-6, atol=1e-9)
    assert best.proponents.indices.shape == (5, 4)


def test_similarity_is_a_cosine(case):
    index, _, test = case
    sim = index.similarity(test)
    assert sim.shape == (5, 30)
    assert float(sim.abs().max()) <= 1 + 1e-9


def test_self_influence_and_outliers_agree(case):
    index, _, _ = case
    si, per = index.self_influence(), index.self_influence_per_checkpoint()
    assert si.shape == (30,) and per.shape == (index.n_checkpoints, 30)
    torch.testing.assert_close(per.sum(0), si, rtol=1e-10, atol=1e-12)
    out = index.outliers(space="parameters")
    torch.testing.assert_close(out.scores, si.double(), rtol=1e-10, atol=1e-12)
    assert out.indices[0] == int(torch.argmax(si))


def test_every_public_result_lives_on_the_cpu(case):
    index, _, test = case
    results = [index.influence(test), index.influence_per_checkpoint(test), index.similarity(test),
               index.self_influence(), index.self_influence_per_checkpoint(), index.outliers(space="parameters").scores]
    best = index.top_k(test, k=3)
    results += [best.proponents.indices, best.proponents.scores, best.opponents.indices, best.opponents.scores]
    assert {r.device.type for r in results} == {"cpu"}


def test_unanswerable_questions_are_clear_errors(case):
    """cluster / renormalized_top_k either answer or raise TracInError (never AttributeError)."""
    index, _, test = case
    for ask in (lambda: index.cluster(3), lambda: index.renormalized_top_k(test, k=3)):
        try:
            result = ask()
        except te.TracInError as e:
            assert "member" in str(e) or "index" in str(e)
        else:
            assert result is not None


def test_saves_and_reopens(case, setup, tmp_path):
    index, _, test = case
    tracin = setup[0]
    where = index.save(tmp_path / "idx")
    cls = type(index)
    again = cls.load(where, tracin)
    torch.testing.assert_close(again.influence(test), index.influence(test), rtol=1e-6, atol=1e-9)


def test_settings_are_the_metadata(setup, tmp_path):
    """IndexSettings round-trips through metadata.json for both store-backed methods."""
    from tracin_engine.settings import IndexSettings

    tracin, indexes, _, _ = setup
    s = tracin.settings()
    assert IndexSettings.from_metadata(s.to_metadata()) == s
    assert "method" not in s.to_metadata()
    src = indexes["source"]
    meta = src.metadata()
    assert meta["method"] == "source" and meta["segments"] == 1
    assert IndexSettings.from_metadata(meta).source == src.settings
    saved = IndexSettings.from_metadata(te.FeatureStore.load(src.save(tmp_path / "s")).metadata)
    assert saved.source == src.settings and saved.model == s.model

"""InfluenceExplorer's method switch: TracIn and SOURCE rankings of the same query."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import tracin_engine as te
import tracin_widgets as tw


@pytest.fixture(scope="module")
def two_methods(cnn_run, small_digits):
    model, ckpts = cnn_run
    tracin = te.TracIn(model, ckpts, loss_fn=F.cross_entropy)
    return tracin.index(small_digits.train, progress=False), tracin.index(small_digits.train, method="source",
                                                                          progress=False)


def _strip_indices(explorer, key):
    return [t["index"] for s in explorer.gallery.strips if s["key"] == key for t in s["tiles"]]


def test_method_switch_reranks_with_source(two_methods, small_digits):
    tracin_index, source_index = two_methods
    ex = tw.InfluenceExplorer(tracin_index, small_digits.train, small_digits.test, k=5,
                              methods={"SOURCE": source_index})
    query = (small_digits.test[0][:1], small_digits.test[1][:1])
    assert _strip_indices(ex, "proponents") == tracin_index.top_k(query, k=5).proponents.indices[0].tolist()
    ex.method = "SOURCE"
    assert ex.method_picker.value == "SOURCE"
    expected = source_index.top_k(query, k=5)
    assert _strip_indices(ex, "proponents") == expected.proponents.indices[0].tolist()
    assert _strip_indices(ex, "opponents") == expected.opponents.indices[0].tolist()
    assert ex._detail_rows(expected.proponents.indices[0, 0].item())[0][0] == "SOURCE score (sum)"
    ex.method_picker.value = "TracIn"  # the dropdown drives the trait too
    assert ex.method == "TracIn" and ex.index is tracin_index


def test_unknown_method_and_mismatched_training_set(two_methods, small_digits):
    tracin_index, source_index = two_methods
    ex = tw.InfluenceExplorer(tracin_index, small_digits.train, small_digits.test, k=3)
    with pytest.raises(te.TracInError, match="unknown method 'SOURCE'"):
        ex.method = "SOURCE"
    small = tracin_index.tracin.index((small_digits.train[0][:50], small_digits.train[1][:50]), progress=False)
    with pytest.raises(te.TracInError, match="another training set"):
        tw.InfluenceExplorer(tracin_index, small_digits.train, small_digits.test, methods={"small": small})
    assert torch.isfinite(source_index.self_influence()).all()


def test_self_influence_gallery_of_a_source_index_ranks_by_source_self_influence(two_methods, small_digits):
    _, source_index = two_methods
    g = tw.SelfInfluenceGallery(source_index, small_digits.train, page_size=8)
    s = source_index.self_influence()
    assert g.space == "parameters" and "self-influence of the parameters" in g.gallery.help
    assert g.ranked()[:8].tolist() == torch.argsort(s, descending=True, stable=True)[:8].tolist()
    with pytest.raises(te.TracInError, match="no output-space self-influence"):
        tw.SelfInfluenceGallery(source_index, small_digits.train, space="output")


def test_explorer_rerank_shows_exact_scores_of_a_projected_index(two_methods, cnn_run, small_digits):
    exact_index, _ = two_methods
    model, ckpts = cnn_run
    proj = te.TracIn(model, ckpts, loss_fn=F.cross_entropy, proj_dim=32).index(small_digits.train, progress=False)
    ex = tw.InfluenceExplorer(proj, small_digits.train, small_digits.test, k=5, rerank=40, browse=0)
    query = (small_digits.test[0][:1], small_digits.test[1][:1])
    S = exact_index.influence(query)[0].double()
    shown = _strip_indices(ex, "proponents")
    scores = [t["score"] for s in ex.gallery.strips if s["key"] == "proponents" for t in s["tiles"]]
    assert shown == proj.top_k(query, k=5, rerank=40, train_data=small_digits.train).proponents.indices[0].tolist()
    assert torch.allclose(torch.tensor(scores, dtype=torch.float64), S[shown], rtol=1e-4, atol=1e-6 * float(S.abs().max()))
    note = next(s["note"] for s in ex.gallery.strips if s["key"] == "query")
    assert f"exact scores ({proj.last_rerank['rescored']} projected candidates rescored)" in note
    per = ex.per_checkpoint(shown[0])                    # the detail's bars sum to the exact score
    assert torch.allclose(per.sum(), S[shown[0]], rtol=1e-4)
    ex.train_query = 7                                   # a training query is left out of its own list
    assert 7 not in _strip_indices(ex, "proponents") and len(_strip_indices(ex, "proponents")) == 5
    auto = tw.InfluenceExplorer(proj, small_digits.train, small_digits.test, k=5, rerank="auto", browse=0)
    assert _strip_indices(auto, "proponents") == exact_index.top_k(query, k=5).proponents.indices[0].tolist()
    with pytest.raises(te.TracInError, match="rerank must be an integer >= k=5"):
        tw.InfluenceExplorer(proj, small_digits.train, small_digits.test, k=5, rerank=3)


def test_dropout_ensemble_as_a_method(small_digits):
    """Any index of the InfluenceIndex contract can be a method: a dropout ensemble ranks by its averaged scores."""
    from models import DropMLP, sgd_checkpoints

    X, y = small_digits.train[0][:120].flatten(1), small_digits.train[1][:120]
    test = (small_digits.test[0][:4].flatten(1), small_digits.test[1][:4])
    torch.manual_seed(0)
    model = DropMLP(64, 16, 10, 0.3)
    ckpts = te.Checkpoints.from_state_dicts(sgd_checkpoints(model, X, y, 0.1, 10, 5), [0.1, 0.1])
    tracin = te.TracIn(model, ckpts, loss_fn=F.cross_entropy)
    ensemble = te.dropout_ensemble(tracin, (X, y), n_members=3, progress=False)
    ex = tw.InfluenceExplorer(tracin.index((X, y), progress=False), (X, y), test, k=5,
                              methods={"dropout ensemble": ensemble})
    ex.method = "dropout ensemble"
    expected = ensemble.top_k((test[0][:1], test[1][:1]), k=5)
    assert _strip_indices(ex, "proponents") == expected.proponents.indices[0].tolist()
    assert ex._detail_rows(expected.proponents.indices[0, 0].item())[0][0] == "dropout ensemble score (sum)"

"""The three galleries on the Python side: what they show agrees with slow references, traits sync, errors surface."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from ipywidgets.widgets.widget import _remove_buffers

import tracin_engine as te
import tracin_widgets as tw
from tracin_engine import TracInError
from tracin_engine.analysis.embeddings import embed, nearest_neighbors


def strip(w, key):
    return next(s for s in w.gallery.strips if s["key"] == key)


def ids(w, key):
    return [t["index"] for t in strip(w, key)["tiles"]]


def scores(w, key):
    return torch.tensor([t["score"] for t in strip(w, key)["tiles"]], dtype=torch.float64)


@pytest.fixture
def explorer(cnn_index, small_digits):
    return tw.InfluenceExplorer(cnn_index, small_digits.train, small_digits.test, k=5,
                                class_names=small_digits.class_names)


def ranked_reference(row: torch.Tensor, k: int):
    """Slow reference: sort one row of the full influence matrix."""
    order = sorted(range(len(row)), key=lambda j: -float(row[j]))
    return order[:k], order[::-1][:k]


# -- InfluenceExplorer -----------------------------------------------------------------------------
def test_explorer_strips_match_the_full_influence_matrix(explorer, cnn_index, small_digits):
    full = cnn_index.influence(small_digits.test).double()
    for i in (0, 13):
        explorer.test_index = i
        pro, opp = ranked_reference(full[i], 5)
        assert ids(explorer, "proponents") == pro
        assert ids(explorer, "opponents") == opp
        torch.testing.assert_close(scores(explorer, "proponents"), full[i, pro], rtol=1e-4, atol=1e-6)
        query = strip(explorer, "query")["tiles"][0]
        assert query | {"png": None, "sub": ""} == explorer._tile("test", i, pinned=True) | {"png": None}
        assert query["sub"] == explorer.outcomes.describe(i) and query["sub"].startswith("loss ")
        assert explorer.picker.value == str(i)
    assert (scores(explorer, "proponents") > 0).all() and (scores(explorer, "opponents") < 0).all()


def test_explorer_tiles_carry_labels_predictions_and_png_bytes(explorer, cnn_index, small_digits):
    X, y = small_digits.train
    preds = cnn_index.tracin.predictions(small_digits.train)
    for t in strip(explorer, "proponents")["tiles"]:
        assert t["label"] == str(int(y[t["index"]])) and t["pred"] == str(int(preds[t["index"]]))
        assert t["alt"].startswith(f"training example {t['index']}, label {t['label']}")
        assert isinstance(t["png"], bytes) and t["png"][:4] == b"\x89PNG"


def test_thumbnails_travel_as_binary_buffers(explorer):
    state, paths, buffers = _remove_buffers(explorer.gallery.get_state())
    n_png = sum(t["png"] is not None for s in explorer.gallery.strips for t in s["tiles"])
    n_tests = len(strip(explorer, "tests")["tiles"])
    assert n_tests == 24 and n_png == 11 + n_tests and len(buffers) == n_png   # browser + query + 5 + 5
    assert all(p[0] == "strips" and p[-1] == "png" for p in paths)


def test_picker_and_test_index_follow_each_other(explorer):
    explorer.picker.value = "4"
    assert explorer.test_index == 4 and explorer.query == ("test", 4)
    explorer.test_index = 6
    assert explorer.picker.value == "6" and strip(explorer, "query")["tiles"][0]["index"] == 6
    with pytest.raises(TracInError, match="test_index=40 is out of range"):
        explorer.test_index = 40


def test_query_action_uses_a_training_example(explorer, cnn_index, small_digits):
    target = ids(explorer, "proponents")[2]
    explorer.gallery.send_action({"action": "query", "index": target})      # Alt+click / q / detail button
    assert explorer.query == ("train", target) and explorer.test_index is None
    X, y = small_digits.train
    ref = cnn_index.top_k((X[target:target + 1], y[target:target + 1]), k=6)   # the query is left out of its lists
    assert target in ref.proponents.indices[0].tolist()                      # (it is its own top proponent)
    assert ids(explorer, "proponents") == [j for j in ref.proponents.indices[0].tolist() if j != target][:5]
    assert ids(explorer, "opponents") == [j for j in ref.opponents.indices[0].tolist() if j != target][:5]
    pinned = strip(explorer, "query")["tiles"][0]
    assert pinned["pinned"] and pinned["role"] == "train" and pinned["index"] == target
    explorer.test_index = 1                                                  # back to a test example
    assert explorer.train_query is None and explorer.query == ("test", 1)


def test_clicks_toggle_selected_and_open_the_detail(explorer, cnn_index, small_digits):
    a, b = ids(explorer, "proponents")[:2]
    explorer.gallery.selected = [a, b]                                       # what the browser does
    assert explorer.selected == [a, b]
    explorer.selected = [b]
    assert explorer.gallery.selected == [b]
    explorer.gallery.active = a
    d = explorer.gallery.detail
    rows = dict(d["rows"])
    per = cnn_index.influence_per_checkpoint(small_digits.test)[:, 0, a]
    assert d["index"] == a and isinstance(d["png"], bytes)
    assert [k for k in rows if k.startswith("checkpoint")] == [f"checkpoint {c} (lr {lr:g})"
                                                              for c, lr in enumerate(cnn_index.learning_rates.tolist())]
    assert float(rows["TracIn score (sum)"]) == pytest.approx(float(per.sum()), rel=1e-3)
    first = f"checkpoint 0 (lr {float(cnn_index.learning_rates[0]):g})"
    assert float(rows[first]) == pytest.approx(float(per[0]), rel=1e-3)
    explorer.gallery.active = -1
    assert explorer.gallery.detail == {}


def test_embedding_toggle_adds_the_nearest_neighbour_strip(explorer, cnn_index, small_digits):
    explorer.emb_toggle.value = True
    assert explorer.show_embeddings
    ref = nearest_neighbors(embed(cnn_index.tracin, small_digits.train),
                            embed(cnn_index.tracin, small_digits.test)[:1], k=5)
    assert ids(explorer, "embedding") == ref.indices[0].tolist()
    explorer.show_embeddings = False
    assert [s["key"] for s in explorer.gallery.strips] == ["tests", "query", "proponents", "opponents"]


def test_callback_errors_are_shown_not_swallowed(cnn_index, small_digits):
    def render(x):
        if float(x.sum()) == float(small_digits.test[0][3].sum()):
            raise ValueError("cannot draw this one")
        return x
    ex = tw.InfluenceExplorer(cnn_index, small_digits.train, small_digits.test, k=3, render=render, browse=0)
    ex.picker.value = "3"                                                    # a control's callback fails
    assert isinstance(ex.last_error, ValueError)
    assert "cannot draw this one" in "".join(o.get("text", "") for o in ex.errors.outputs)


def test_explorer_static_views(explorer):
    from IPython.core.formatters import DisplayFormatter
    from matplotlib.figure import Figure

    html = explorer._repr_html_()
    for i in ids(explorer, "proponents") + ids(explorer, "opponents"):
        assert f'data-index="{i}"' in html
    assert html.count("data:image/png;base64,") == 11 + 24 and 'alt="training example' in html
    from IPython.core.interactiveshell import InteractiveShell
    from IPython.utils.capture import capture_output

    InteractiveShell.instance()
    with capture_output() as shown:                   # the widget view, then a static copy beside it
        explorer._ipython_display_()
    kinds = [set(o.data) for o in shown.outputs]
    assert "application/vnd.jupyter.widget-view+json" in kinds[0] and "text/html" in kinds[1]
    assert 'class="tw-static-fallback"' in shown.outputs[1].data["text/html"]
    assert DisplayFormatter().format(explorer) == ({}, {})          # IPython leaves display to _ipython_display_
    fig = explorer.to_figure()
    assert isinstance(fig, Figure) and len([ax for ax in fig.axes if ax.images]) == 10 + 11
    df = explorer.to_dataframe()
    assert list(df["index"][:5]) == ids(explorer, "proponents") and set(df["strip"]) == {"proponents", "opponents"}


def test_bad_arguments_raise_tracin_errors(cnn_index, small_digits):
    with pytest.raises(TracInError, match="k must be at least 1"):
        tw.InfluenceExplorer(cnn_index, small_digits.train, small_digits.test, k=0)
    with pytest.raises(TracInError, match="the index holds 300"):
        tw.InfluenceExplorer(cnn_index, small_digits.test, small_digits.test)


# -- SelfInfluenceGallery -------------------------------------------------------------------------
@pytest.fixture
def outliers(cnn_index, small_digits):
    return tw.SelfInfluenceGallery(cnn_index, small_digits.train, page_size=16)


def test_pages_follow_the_self_influence_ranking(outliers, cnn_index):
    s = cnn_index.outliers().scores                                          # default: output space
    order = sorted(range(len(s)), key=lambda j: -float(s[j]))
    assert ids(outliers, "page") == order[:16]
    outliers.next_btn.click()
    assert outliers.page == 1 and ids(outliers, "page") == order[16:32]
    assert outliers.page_box.value == 2 and strip(outliers, "page")["note"].startswith("ranks 17-32 of 300;")
    outliers.page = 99                                                       # clamped to the last page
    assert outliers.page == 18 and ids(outliers, "page") == order[288:] and outliers.next_btn.disabled
    torch.testing.assert_close(scores(outliers, "page"), s[order[288:]].double())


def test_label_filter_keeps_the_ranking_within_one_label(outliers, cnn_index, small_digits):
    y = small_digits.train[1]
    s = cnn_index.outliers().scores
    outliers.page = 2
    outliers.label_box.index = 1 + 7                                         # options: all labels, 0..9
    assert outliers.label_filter == 7 and outliers.page == 0
    want = sorted((j for j in range(300) if int(y[j]) == 7), key=lambda j: -float(s[j]))
    assert outliers.ranked().tolist() == want and ids(outliers, "page") == want[:16]
    assert all(t["label"] == "7" for t in strip(outliers, "page")["tiles"])
    outliers.label_filter = None
    assert outliers.label_box.index == 0 and len(outliers.ranked()) == 300


def test_marks_selected_and_dataframe(outliers, cnn_index):
    top = ids(outliers, "page")
    outliers.gallery.send_action({"action": "mark", "index": top[0], "mark": "suspicious"})   # key s
    outliers.gallery.selected = [top[3], top[1]]
    outliers.mark_btns["fine"].click()                                       # marks the selected ones
    assert outliers.marks == {top[0]: "suspicious", top[3]: "fine", top[1]: "fine"}
    assert outliers.gallery.marks == {str(top[0]): "suspicious", str(top[3]): "fine", str(top[1]): "fine"}
    df = outliers.to_dataframe()
    assert list(df["index"]) == [top[0], top[1], top[3]] and list(df["rank"]) == [1, 2, 4]
    assert list(df["mark"]) == ["suspicious", "fine", "fine"] and list(df["selected"]) == [False, True, True]
    assert df["self_influence"].iloc[0] == pytest.approx(float(cnn_index.outliers().scores[top[0]]))
    outliers.gallery.send_action({"action": "mark", "index": top[0], "mark": "clear"})
    assert top[0] not in outliers.marks
    with pytest.raises(TracInError, match="mark must be 'suspicious', 'fine' or None"):
        outliers.mark([1], "odd")
    assert len(outliers.to_dataframe(all_examples=True)) == 300


def test_parameter_space_ranking_and_per_checkpoint_detail(cnn_index, small_digits):
    g = tw.SelfInfluenceGallery(cnn_index, small_digits.train, page_size=8, space="parameters")
    assert "||g_c(z)||^2: self-influence of the parameters" in g.gallery.help
    assert "||dl/df_c(z)||^2: self-influence of the model output" in tw.SelfInfluenceGallery(
        cnn_index, small_digits.train).gallery.help
    s = cnn_index.self_influence()
    assert ids(g, "page") == sorted(range(len(s)), key=lambda j: -float(s[j]))[:8]
    top = ids(g, "page")[0]
    rows = dict(g._detail_rows(top))
    per = cnn_index.self_influence_per_checkpoint()[:, top]
    assert [float(rows[f"checkpoint {c}"].split()[0]) for c in range(len(per))] == pytest.approx(per.tolist(), rel=1e-3)
    # each checkpoint's term comes with the example's loss there (recorded while featurizing)
    losses = [float(rows[f"checkpoint {c}"].split("loss ")[1]) for c in range(len(per))]
    assert losses == pytest.approx(cnn_index.store.losses[:, top].tolist(), rel=2e-3)


def test_thumbnails_are_cached(outliers, monkeypatch):
    calls = []
    real = outliers.renderer.view
    monkeypatch.setattr(outliers.renderer, "view", lambda x, **kw: calls.append(1) or real(x, **kw))
    outliers.page = 1
    assert len(calls) == 16
    outliers.page = 0
    outliers.page = 1
    assert len(calls) == 16


def test_outlier_detail_and_static_views(outliers, cnn_index):
    i = ids(outliers, "page")[0]
    outliers.gallery.active = i
    rows = dict(outliers.gallery.detail["rows"])
    per = cnn_index.outliers().per_checkpoint[:, i]
    assert rows["rank"] == "1 of 300" and float(rows["checkpoint 1"].split()[0]) == pytest.approx(float(per[1]), rel=1e-3)
    assert outliers._repr_html_().count("<figure") == 16
    assert len([ax for ax in outliers.to_figure(max_cols=8).axes if ax.images]) == 8


# -- ClusterGallery -------------------------------------------------------------------------------
@dataclass(frozen=True)
class GivenClusters:
    """A clustering the user already has (clusters= argument), in the engine's Clusters shape."""

    labels: torch.Tensor
    sizes: torch.Tensor
    representatives: list

    def members(self, k):
        return torch.nonzero(self.labels == k).flatten()


def test_cluster_gallery_with_given_clusters(cnn_index, small_digits):
    y = small_digits.train[1]
    labels = (y >= 5).long()                                                 # two clusters: digits < 5, >= 5
    reps = [GivenClusters(labels, torch.bincount(labels), []).members(k)[[3, 0]] for k in (0, 1)]
    c = GivenClusters(labels, torch.bincount(labels), reps)
    g = tw.ClusterGallery(cnn_index, small_digits.train, clusters=c, per_cluster=6)
    big = int(torch.argmax(c.sizes))
    assert [s["key"] for s in g.gallery.strips][0] == f"cluster-{big}"
    shown = ids(g, "cluster-0")
    assert shown[:2] == reps[0].tolist() and len(shown) == 6 and all(int(y[i]) < 5 for i in shown)
    mix = strip(g, "cluster-1")["mix"]
    assert sum(n for _, n in mix) == int(c.sizes[1]) and {lab for lab, _ in mix} == {"5", "6", "7", "8", "9"}
    g.gallery.selected = [shown[1]]
    assert g.selected == [shown[1]] and g.to_dataframe()["selected"].sum() == 1


def test_cluster_gallery_from_the_index(cnn_index, small_digits):
    g = tw.ClusterGallery(cnn_index, small_digits.train, n_clusters=4, per_cluster=5)
    c = g.clusters
    assert len(g.gallery.strips) == len(c.sizes) and int(c.sizes.sum()) == 300
    for k in range(len(c.sizes)):
        shown = ids(g, f"cluster-{k}")
        reps = [int(i) for i in c.representatives[k]][:5]
        assert shown[:len(reps)] == reps
        assert all(int(c.labels[i]) == k for i in shown)
    assert "<figure" in g._repr_html_() and g.to_figure().axes


# -- tabular and text examples --------------------------------------------------------------------
def test_tabular_rows_and_text_snippets(mlp_run, small_digits):
    model, ckpts = mlp_run
    (X, y), (Xt, yt) = small_digits.train, small_digits.test
    flat, flat_test = (X.flatten(1), y), (Xt.flatten(1), yt)
    index = te.TracIn(model, ckpts, loss_fn=F.cross_entropy).index(flat, progress=False)
    g = tw.SelfInfluenceGallery(index, flat, page_size=4, feature_names=[f"px{i}" for i in range(64)])
    t = strip(g, "page")["tiles"][0]
    assert t["png"] is None
    assert t["text"].splitlines()[:2] == [f"px0 = {float(flat[0][t['index'], 0]):.4g}",
                                          f"px1 = {float(flat[0][t['index'], 1]):.4g}"]
    g.gallery.active = t["index"]
    assert g.gallery.detail["text"].count("\n") == 63                       # the detail shows all 64 features
    assert f'<pre role="img" aria-label="training example {t["index"]}, label' in g._repr_html_()

    ex = tw.InfluenceExplorer(index, flat, flat_test, k=3, render=lambda x: f"<i>row</i> sum={float(x.sum()):.2f}")
    tile = strip(ex, "proponents")["tiles"][0]
    assert tile["text"].startswith("<i>row</i> sum=")                         # raw; the browser sets textContent
    assert "&lt;i&gt;row&lt;/i&gt;" in ex._repr_html_() and "<i>row</i>" not in ex._repr_html_()


def test_regression_targets_show_values_and_no_class_predictions(tmp_path):
    torch.manual_seed(0)
    X = torch.randn(60, 4)
    y = X.sum(1, keepdim=True)
    model = te.examples.MLP(4, 1, hidden=8)
    te.examples.train(model, (X, y), tmp_path, epochs=2, n_checkpoints=2, lr=0.05, loss_fn=F.mse_loss)
    index = te.TracIn(model, te.Checkpoints.from_dir(tmp_path), loss_fn=F.mse_loss).index((X, y), progress=False)
    ex = tw.InfluenceExplorer(index, (X, y), (X[:5], y[:5]), k=3, feature_names=list("abcd"))
    for t in strip(ex, "proponents")["tiles"]:
        assert t["pred"] is None and t["label"] == f"{float(y[t['index']]):.4g}"
        assert t["text"].startswith(f"a = {float(X[t['index'], 0]):.4g}")

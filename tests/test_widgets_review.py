"""SelfInfluenceGallery II: the closed review loop (relabel, auto-advance, undo, counts, export, sidecar marks,
the cleaned dataset), the label filter's page, the brushable scatter, and the index kinds."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.data import DataLoader

import tracin_engine as te
import tracin_widgets as tw
from tracin_engine import TracInError
from tracin_widgets.review import SIDECAR

from models import sgd_checkpoints


def ids(g):
    return [t["index"] for t in g.gallery.strips[0]["tiles"]]


@pytest.fixture
def g(cnn_index, small_digits):
    return tw.SelfInfluenceGallery(cnn_index, small_digits.train, page_size=6, class_names=small_digits.class_names)


def test_keys_mark_and_advance_relabel_undo_and_counts(g, cnn_index, small_digits):
    top = ids(g)
    g.gallery.active = top[0]
    g.gallery.send_action({"action": "mark", "index": top[0], "mark": "suspicious", "advance": True})   # key s
    assert g.marks == {top[0]: "suspicious"} and g.gallery.active == top[1]                          # next one opens
    g.gallery.send_action({"action": "mark", "index": top[1], "mark": "relabel", "advance": True})      # key a
    pred = int(cnn_index.tracin.predictions((small_digits.train[0][top[1]:top[1] + 1],))[0])
    assert g.relabels == {top[1]: pred} and g.marks[top[1]] == "relabel" and g.gallery.active == top[2]
    tile = next(t for t in g.gallery.strips[0]["tiles"] if t["index"] == top[1])
    assert tile["sub"] == f"relabelled \u2192 {pred}"
    g.gallery.send_action({"action": "mark", "index": top[2], "mark": "relabel", "value": 7})         # detail's picker
    assert g.relabels[top[2]] == 7 and g.gallery.active == top[3]
    g.gallery.selected = [top[4]]
    assert g.gallery.counts.startswith("1 selected \u00b7 1 suspicious \u00b7 0 fine \u00b7 2 relabelled")
    assert g.undo() and g.relabels == {top[1]: pred} and top[2] not in g.marks
    g.gallery.send_action({"action": "undo"})                                                         # key u
    assert g.relabels == {} and g.marks == {top[0]: "suspicious"}
    g.undo()
    assert g.marks == {} and not g.undo()


def test_last_tile_of_a_page_advances_to_the_next_page(g):
    last = ids(g)[-1]
    g.gallery.active = last
    g.gallery.send_action({"action": "mark", "index": last, "mark": "fine"})
    assert g.page == 1 and g.gallery.active == ids(g)[0]


def test_open_detail_follows_marks_from_the_control_row(g):
    i = ids(g)[2]
    g.gallery.active = i
    g.gallery.selected = [i]
    g.mark_btns["suspicious"].click()
    assert dict(g.gallery.detail["rows"])["mark"] == "suspicious"
    assert g.gallery.detail["relabel"]["options"][3] == [3, "3"]


def test_export_dataframe_and_csv_never_overwrites(g, tmp_path):
    top = ids(g)
    g.mark([top[0]], "suspicious")
    g.relabel(top[1], 4)
    df = g.to_dataframe()
    assert list(df["index"]) == top[:2] and list(df["new_label"]) == ["", "4"] and list(df["mark"]) == ["suspicious", "relabel"]
    path = g.to_csv(tmp_path / "review.csv")
    assert path.read_text().splitlines()[0] == "index,rank,label,new_label,self_influence,mark,selected"
    with pytest.raises(TracInError, match="exists; pass overwrite=True"):
        g.to_csv(path)
    g.to_csv(path, overwrite=True)


def test_cleaned_dataset_drops_and_relabels(g, small_digits):
    X, y = small_digits.train
    top = ids(g)
    g.mark([top[0], top[2]], "suspicious")
    g.relabel(top[1], 9)
    g.mark([top[3]], "fine")
    clean = g.cleaned()
    assert len(clean) == 298 and top[0] not in clean.kept.tolist() and top[3] in clean.kept.tolist()
    Xc, yc = clean.tensors()
    keep = [i for i in range(300) if i not in (top[0], top[2])]
    want_y = y[keep].clone()
    want_y[keep.index(top[1])] = 9
    assert torch.equal(Xc, X[keep]) and torch.equal(yc, want_y)
    xb, yb = next(iter(DataLoader(clean, batch_size=300)))                 # usable for retraining as is
    assert torch.equal(yb, want_y)
    assert len(tw.cleaned_dataset(small_digits.train, {top[0]: "suspicious"}, drop=())) == 300
    with pytest.raises(TracInError, match="unknown marks"):
        tw.cleaned_dataset(small_digits.train, {}, drop=("bad",))


def test_marks_live_in_a_sidecar_beside_a_disk_index(cnn_run, small_digits, tmp_path):
    model, ckpts = cnn_run
    import torch.nn.functional as F
    store = tmp_path / "index"
    index = te.TracIn(model, ckpts, loss_fn=F.cross_entropy).index(small_digits.train, store=store, progress=False)
    g1 = tw.SelfInfluenceGallery(index, small_digits.train, page_size=4)
    top = ids(g1)
    g1.mark([top[0]], "suspicious")
    g1.relabel(top[1], 2)
    data = json.loads((store / SIDECAR).read_text())
    assert data["format"] == "tracin-review-marks" and data["marks"] == {str(top[0]): "suspicious", str(top[1]): "relabel"}
    g2 = tw.SelfInfluenceGallery(index, small_digits.train, page_size=4)   # a later session sees them
    assert g2.marks == g1.marks and g2.relabels == {top[1]: 2} and "saved to" in g2.gallery.counts
    theirs = tmp_path / "notes.json"
    theirs.write_text('{"mine": true}')
    with pytest.raises(TracInError, match="not written by tracin"):
        tw.SelfInfluenceGallery(index, small_digits.train, marks_file=theirs)
    assert theirs.read_text() == '{"mine": true}'                          # a user's file is left alone
    g3 = tw.SelfInfluenceGallery(index, small_digits.train, marks_file=None)
    assert g3.marks == {} and g3.marks_file is None


def test_label_filter_starts_at_the_top_of_that_label(g, small_digits):
    g.page = 20
    g.label_box.index = 1 + 3                                              # label 3 chosen on page 21
    y = small_digits.train[1]
    assert g.label_filter == 3 and g.page == 0 and g.page_box.value == 1
    assert ids(g) == [i for i in g.order.tolist() if int(y[i]) == 3][:6]   # the most suspicious 3s


def test_scatter_and_brush(g, cnn_index):
    sc = g.gallery.scatter
    x = torch.frombuffer(bytearray(sc["x"]), dtype=torch.float32)
    yv = torch.frombuffer(bytearray(sc["y"]), dtype=torch.float32)
    s = cnn_index.outliers().scores
    torch.testing.assert_close(x.double(), torch.log10(s).double(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(yv.double(), cnn_index.store.losses[-1].double(), rtol=1e-5, atol=1e-6)
    assert g.gallery.highlight == ids(g) and sc["ylabel"] == "final training loss"
    sent = []
    g.gallery.observe(sent.append, names="scatter")
    g.page = 1
    assert sent == [] and g.gallery.highlight == ids(g)                    # the points are not sent again
    lo = float(torch.quantile(yv, 0.8))
    g.gallery.send_action({"action": "brush", "x0": -99, "x1": 99, "y0": lo, "y1": 99})          # drag a box
    inside = [i for i in g.order.tolist() if float(yv[i]) >= lo]
    assert g.ranked().tolist() == inside and g.page == 0 and "brushed" in g.gallery.strips[0]["note"]
    g.gallery.send_action({"action": "brush"})                                                     # double-click
    assert g.brush is None and len(g.ranked()) == 300
    with pytest.raises(TracInError, match="brush is"):
        g.brush = (1, 0, 0, 1)


@pytest.fixture(scope="module")
def index_kinds(small_digits):
    """The three index kinds on one small dropout MLP (flattened digits), 3 checkpoints."""
    import torch.nn.functional as F
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 10))
    X, y = small_digits.train[0].flatten(1), small_digits.train[1]
    states = sgd_checkpoints(model, X, y, lr=0.5, steps=60, every=20)
    model.eval()
    tracin = te.TracIn(model, te.Checkpoints.from_state_dicts(states, [0.5, 0.5, 0.5], [20, 40, 60]),
                       loss_fn=F.cross_entropy)
    train = (X, y)
    test = (small_digits.test[0].flatten(1), small_digits.test[1])
    return {"tracin": tracin.index(train, progress=False),
            "source": tracin.index(train, method="source", segments=1, progress=False),
            "ensemble": te.dropout_ensemble(tracin, train, n_members=2, progress=False)}, train, test


@pytest.mark.parametrize("kind", ["tracin", "source", "ensemble"])
def test_every_index_kind_drives_every_widget(index_kinds, kind):
    indexes, train, test = index_kinds
    index = indexes[kind]
    ex = tw.InfluenceExplorer(index, train, test, k=3, browse=4)
    ref = index.top_k((test[0][:1], test[1][:1]), k=3)
    assert ids_of(ex, "proponents") == ref.proponents.indices[0].tolist()
    ex.gallery.active = ids_of(ex, "proponents")[0]
    assert ex.gallery.detail["index"] == ids_of(ex, "proponents")[0]
    per = index.influence_per_checkpoint((test[0][:1], test[1][:1]))[:, 0, ex.gallery.active]
    assert dict(ex.gallery.detail["rows"])["TracIn score (sum)"] == f"{float(per.sum()):+.4g}"
    g = tw.SelfInfluenceGallery(index, train, page_size=4)
    assert ids(g) == torch.argsort(index.outliers(space=g.space).scores, descending=True, stable=True)[:4].tolist()
    assert [w.last_error for w in (ex, g)] == [None] * 2
    if kind == "ensemble":                         # the index cannot cluster: its clear error, not a widget's
        with pytest.raises(TracInError, match="cannot cluster"):
            tw.ClusterGallery(index, train, n_clusters=3, per_cluster=3)
        return
    c = tw.ClusterGallery(index, train, n_clusters=3, per_cluster=3)
    assert len(c.gallery.strips) == 3 and c.last_error is None


def ids_of(w, key):
    return [t["index"] for s in w.gallery.strips if s["key"] == key for t in s["tiles"]]

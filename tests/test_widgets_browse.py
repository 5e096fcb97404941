"""InfluenceExplorer II: the test-example browser, the confusion matrix, the query history, a consistent view."""

from __future__ import annotations

import pytest
import torch

import tracin_widgets as tw
from tracin_engine import TracInError


def strip(w, key):
    return next(s for s in w.gallery.strips if s["key"] == key)


def ids(w, key):
    return [t["index"] for t in strip(w, key)["tiles"]]


@pytest.fixture
def ex(cnn_index, small_digits):
    return tw.InfluenceExplorer(cnn_index, small_digits.train, small_digits.test, k=4, browse=8,
                                class_names=small_digits.class_names)


def reference_outcomes(index, test):
    """Slow reference: one example at a time, float64 softmax, at the last checkpoint."""
    X, y = test
    model = index.tracin.model
    rows = []
    for i in range(len(y)):
        logits = torch.func.functional_call(model, index.tracin.state(len(index.tracin.checkpoints) - 1), (X[i:i + 1],))
        p = torch.softmax(logits.double(), 1)[0]
        rows.append((int(p.argmax()), float(-torch.log(p[int(y[i])])), float(p.max())))
    return rows


def test_browser_lists_mistakes_first_then_highest_loss(ex, cnn_index, small_digits):
    ref = reference_outcomes(cnn_index, small_digits.test)
    y = small_digits.test[1].tolist()
    want = sorted(range(len(y)), key=lambda i: (ref[i][0] == y[i], -ref[i][1]))
    assert ex.browsed().tolist() == want
    assert ids(ex, "tests") == want[:8]
    torch.testing.assert_close(ex.outcomes.loss, torch.tensor([r[1] for r in ref], dtype=torch.float64), rtol=1e-5, atol=1e-6)
    assert ex.outcomes.preds.tolist() == [r[0] for r in ref]
    tile = strip(ex, "tests")["tiles"][0]
    assert tile["pick"] and tile["role"] == "test" and tile["pred"] == str(ref[want[0]][0])
    assert tile["sub"] == f"loss {ref[want[0]][1]:.3g} \u00b7 {100 * ref[want[0]][2]:.0f}%"
    n_wrong = sum(ref[i][0] != y[i] for i in range(len(y)))
    assert n_wrong > 0 and f"{n_wrong} misclassified in all" in strip(ex, "tests")["note"]


def test_other_sorts_filters_and_pages(ex, small_digits):
    y = small_digits.test[1]
    loss, conf, preds = ex.outcomes.loss, ex.outcomes.confidence, ex.outcomes.preds
    ex.sort_box.value = "loss"
    assert ex.test_sort == "loss" and ex.browsed().tolist() == sorted(range(len(y)), key=lambda i: -float(loss[i]))
    ex.test_sort = "confidence"
    assert ex.sort_box.value == "confidence" and ex.browsed().tolist() == sorted(range(len(y)), key=lambda i: float(conf[i]))
    ex.test_page = 2
    assert ids(ex, "tests") == ex.browsed()[16:24].tolist() and strip(ex, "tests")["pager"] == {"page": 2, "n_pages": 5}
    ex.gallery.send_action({"action": "page", "strip": "tests", "page": 3})
    assert ex.test_page == 3
    ex.true_box.value = 3                                              # dropdown -> filter, back to page 0
    assert ex.test_filter == (3, None) and ex.test_page == 0
    assert ex.browsed().tolist() == [i for i in sorted(range(len(y)), key=lambda i: float(conf[i])) if int(y[i]) == 3]
    with pytest.raises(TracInError, match="test_sort must be one of"):
        ex.test_sort = "random"
    ex.test_sort = "index"
    ex.test_filter = (None, int(preds[0]))
    assert ex.pred_box.value == int(preds[0]) and ex.browsed().tolist() == [i for i in range(len(y)) if preds[i] == preds[0]]


def test_confusion_matrix_counts_and_its_cells_filter(ex, small_digits):
    y, preds = small_digits.test[1], ex.outcomes.preds
    cm = strip(ex, "tests")["confusion"]
    ref = [[sum(int(y[i]) == r and int(preds[i]) == c for i in range(len(y))) for c in range(10)] for r in range(10)]
    assert cm["counts"] == ref and cm["labels"] == small_digits.class_names and cm["active"] is None
    r, c = next((r, c) for r in range(10) for c in range(10) if r != c and ref[r][c])
    ex.gallery.send_action({"action": "confusion", "strip": "tests", "row": r, "col": c})   # a cell click
    assert ex.test_filter == (r, c) and strip(ex, "tests")["confusion"]["active"] == [r, c]
    assert sorted(ids(ex, "tests")) == sorted(i for i in range(len(y)) if int(y[i]) == r and int(preds[i]) == c)
    ex.gallery.send_action({"action": "confusion", "strip": "tests", "row": None, "col": None})
    assert ex.test_filter == (None, None)


def test_clicking_a_browsed_example_makes_it_the_query(ex):
    j = ids(ex, "tests")[3]
    ex.gallery.send_action({"action": "test", "index": j})
    assert ex.query == ("test", j) and ex.picker.value == str(j)
    assert strip(ex, "query")["tiles"][0]["index"] == j


def test_history_back_and_a_consistent_view(ex, cnn_index, small_digits):
    start_pro = ids(ex, "proponents")
    a = start_pro[0]
    ex.gallery.active = a                                          # detail open on a proponent
    ex.gallery.send_action({"action": "query", "index": a})        # it becomes the query
    assert ex.query == ("train", a) and ex.picker.value == "" and "training #" in ex.picker.placeholder
    assert a not in ids(ex, "proponents") + ids(ex, "opponents")    # not its own proponent
    assert [h["label"] for h in ex.gallery.history] == ["test #0", f"train #{a}"]
    assert ex.gallery.history[-1]["current"]
    open_now = ex.gallery.active                                   # closed (no longer shown) or scored against the new query
    assert (open_now == -1 and ex.gallery.detail == {}) or float(dict(ex.gallery.detail["rows"])["TracIn score (sum)"]) \
        == pytest.approx(float(ex.per_checkpoint(open_now).sum()), rel=1e-3)
    b = ids(ex, "proponents")[0]
    ex.gallery.active = b
    score_b = float(dict(ex.gallery.detail["rows"])["TracIn score (sum)"])
    ex.picker.value = "0"                                          # retyping the old test index works
    assert ex.query == ("test", 0) and len(ex.history) == 3
    assert ex.gallery.active in (-1, b)
    if ex.gallery.active == b:                                     # the open detail follows the query
        assert float(dict(ex.gallery.detail["rows"])["TracIn score (sum)"]) != pytest.approx(score_b, rel=1e-6)
    ex.gallery.send_action({"action": "back"})
    assert ex.query == ("train", a) and ex.history_position == 1 and len(ex.history) == 3
    ex.back()
    assert ex.query == ("test", 0) and ids(ex, "proponents") == start_pro and ex.picker.value == "0"
    ex.gallery.send_action({"action": "history", "at": 2})
    assert ex.query == ("test", 0) and ex.history_position == 2
    ex.test_index = 5                                              # a new query drops nothing behind it...
    assert [q for q in ex.history] == [("test", 0), ("train", a), ("test", 0), ("test", 5)]
    ex.back(); ex.back()
    ex.test_index = 9                                              # ...but a visit after going back cuts the forward part
    assert ex.history == [("test", 0), ("train", a), ("test", 9)]


def test_detail_shows_the_query_beside_the_example_and_a_per_checkpoint_chart(ex, cnn_index, small_digits):
    i = ids(ex, "opponents")[0]
    ex.gallery.active = i
    d = ex.gallery.detail
    per = cnn_index.influence_per_checkpoint(small_digits.test)[:, 0, i]
    assert d["bars"]["values"] == pytest.approx(per.tolist(), rel=1e-3)
    assert d["compare"]["title"].startswith("query: test #0") and d["compare"]["png"][:4] == b"\x89PNG"
    assert dict(d["rows"])["effect"].startswith("pushed the prediction away")
    assert strip(ex, "opponents")["note"].startswith(f"training examples that pushed it away from {small_digits.class_names[int(small_digits.test[1][0])]}")


def test_bars_are_scaled_per_strip_and_similarity_has_its_own_colour(ex):
    ex.show_embeddings = True
    for key in ("proponents", "opponents"):
        s = strip(ex, key)
        assert s["scale"] == pytest.approx(max(abs(t["score"]) for t in s["tiles"]))
        assert s["color"] == "influence" and "sum_c eta_c" in s["help"]
    emb = strip(ex, "embedding")
    assert emb["color"] == "similarity" and emb["signed"] is False
    assert "sum_c" not in ex.gallery.status and "sum_c" in ex.gallery.help        # formulas in the tooltip


def test_text_option_shows_the_original_sentence(cnn_index, small_digits):
    words = [f"sentence {i} about digits" for i in range(300)]
    tests = [f"test sentence {i}" for i in range(40)]
    ex = tw.InfluenceExplorer(cnn_index, small_digits.train, small_digits.test, k=3, browse=4,
                              text=words, test_text=lambda i: tests[i])
    q = strip(ex, "query")["tiles"][0]
    assert q["png"] is None and q["text"] == "test sentence 0"
    t = strip(ex, "proponents")["tiles"][0]
    assert t["text"] == words[t["index"]]
    ex.gallery.active = t["index"]
    assert ex.gallery.detail["text"] == words[t["index"]] and ex.gallery.detail["compare"]["text"] == "test sentence 0"
    assert "test sentence" in strip(ex, "tests")["tiles"][0]["text"]


def test_no_browser_without_class_labels_filters_raise(cnn_index, small_digits):
    X, y = small_digits.test
    ex = tw.InfluenceExplorer(cnn_index, small_digits.train, (X,), k=3, browse=4)   # unlabeled test data
    assert ex.target == "prediction" and strip(ex, "tests")["confusion"] is None
    assert ex.browsed().tolist() == list(range(len(y)))
    with pytest.raises(TracInError, match="no class labels to filter by"):
        ex.test_filter = (1, None)

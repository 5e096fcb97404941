"""InfluenceExplorer: start from the model's mistakes, pick a query, see its proponents and opponents.

Example:
    >>> ex = tw.InfluenceExplorer(index, split.train, split.test, k=8, class_names=split.class_names)
    >>> ex                       # in a notebook: test-example browser, query history, strips
    >>> ex.test_index = 7        # observable: the strips follow (so do the box, history and detail)
    >>> ex.train_query = 12      # a training example as the query (test_index becomes None)
    >>> ex.back()                # the previous query (the "back" button, key b)
    >>> ex.test_filter = (3, 5)  # the browser shows test examples labelled 3 and predicted 5
    >>> ex.selected              # training indices clicked in the strips
    >>> ex = tw.InfluenceExplorer(index, train, test, methods={"SOURCE": tracin.index(train, method="source")})

Test-example browser (on top; browse=0 hides it): the test examples with the model's prediction, loss and
confidence, misclassified and highest-loss first (test_sort), filtered by true / predicted class
(test_filter, the dropdowns, or a click on a confusion-matrix cell), browse tiles per page (test_page).
A click on one makes it the query. Choosing the query otherwise: the "test example" box, the trait
`test_index`, or a shown training example: Alt+click its tile, press q on it, or "use as query" in its
detail. A training example used as the query is left out of its own proponents and neighbours.
A plain click toggles a tile in `selected` and opens its detail beside it (both examples side by side,
the score split per checkpoint as a bar chart).
Scores: S(z, z') = sum_c eta_c <g_c(z), g_c(z')> (index.top_k); proponents have S > 0 (training on them
lowered the query's loss: they pushed the prediction towards its label), opponents S < 0. The toggle adds
the k nearest neighbours of the penultimate-layer embedding (cosine, last checkpoint).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import ipywidgets as W
import torch
import traitlets

from . import _engine as eng
from ._base import GalleryBase
from ._engine import TracInError, as_source
from ._testbrowser import SORTS, TestOutcomes

HISTORY = 20   # breadcrumbs kept


class InfluenceExplorer(GalleryBase):
    """Test-example browser, query history, proponents / opponents (and embedding neighbours). See the module docstring."""

    test_index = traitlets.Int(0, allow_none=True)
    train_query = traitlets.Int(None, allow_none=True)
    show_embeddings = traitlets.Bool(False)
    method = traitlets.Unicode("TracIn")
    test_sort = traitlets.Unicode("mistakes")
    test_filter = traitlets.Tuple((None, None))
    test_page = traitlets.Int(0)

    def __init__(self, index: Any, train_data: Any, test_data: Any, k: int = 8, test_index: int = 0,
                 target: str | None = None, embeddings: bool = False, test_batch_fn: Any = None,
                 cache_queries: int = 256, methods: dict[str, Any] | None = None, browse: int = 24,
                 test_text: Any = None, rerank: int | None = None, **kwargs: Any):
        """methods: other indexes over the same training data to switch to, e.g. {"SOURCE": source_index}.
        browse: test examples per page of the browser (0: no browser). test_text: original text of each
        test example (sequence of str or function i -> str), like text= for training examples.
        rerank: with a projected TracIn index (proj_dim), rescore its `rerank` best candidates each way (or
        "auto": as many as the projection's error leaves in doubt) with exact gradients
        (GradientIndex.top_k(rerank=)): the strips and the detail show exact scores; a query then costs about
        2 * rerank exact per-example gradients (other methods are shown as they are)."""
        if k < 1:
            raise TracInError(f"k must be at least 1, got {k}.")
        if browse < 0:
            raise TracInError(f"browse must be 0 (no test-example browser) or more, got {browse}.")
        if rerank is not None and rerank != "auto" and (isinstance(rerank, bool) or not isinstance(rerank, int)
                                                          or rerank < k):
            raise TracInError(f"rerank must be an integer >= k={k} (projected candidates rescored exactly) or "
                              f"'auto', got {rerank!r}.")
        self.rerank = rerank
        self.indexes = {"TracIn": index, **(methods or {})}
        bad = [name for name, ix in self.indexes.items() if ix.n_train != index.n_train]
        if bad:
            raise TracInError(f"methods {bad} were built on another training set (n_train differs from "
                              f"{index.n_train}); build every index on the same train_data.")
        self.test = as_source(test_data, test_batch_fn)
        self.k, self.browse = int(k), int(browse)
        if target is None:
            target = "loss" if self.test.example(0)[1] is not None else "prediction"
        self.target = target
        self._results: OrderedDict[tuple[str, str, int], dict] = OrderedDict()
        self._cache_queries = cache_queries
        self._emb_train: torch.Tensor | None = None
        self._outcomes: TestOutcomes | None = None
        self._history: list[tuple[str, int]] = []
        self._hist_pos = -1
        self._navigating = False
        self.picker = W.Text(value="0", description="test example", continuous_update=False,
                             style={"description_width": "initial"}, layout=W.Layout(width="190px"))
        self.picker.add_class("tw-picker")
        self.emb_toggle = W.ToggleButton(value=bool(embeddings), description="embedding neighbours",
                                         tooltip="also show nearest neighbours of the penultimate-layer embedding",
                                         layout=W.Layout(width="auto"))
        self.emb_toggle.add_class("tw-emb-toggle")
        self.method_picker = W.Dropdown(options=list(self.indexes), value="TracIn", description="method",
                                        layout=W.Layout(width="auto", display="" if methods else "none"))
        self.method_picker.add_class("tw-method")
        self.sort_box = W.Dropdown(options=[(v, k) for k, v in SORTS.items()], value="mistakes", description="sort",
                                   layout=W.Layout(width="auto"))
        self.true_box = W.Dropdown(options=[("any", None)], value=None, description="true", layout=W.Layout(width="auto"))
        self.pred_box = W.Dropdown(options=[("any", None)], value=None, description="predicted",
                                   layout=W.Layout(width="auto"))
        for w, cls in [(self.sort_box, "tw-sort"), (self.true_box, "tw-true"), (self.pred_box, "tw-predicted")]:
            w.add_class(cls)
            w.style = {"description_width": "initial"}
        self.help_line = W.HTML("<small>click: select + details &middot; Alt+click or <b>q</b>: make it the query "
                                "&middot; <b>b</b>: back &middot; arrows / Enter / Escape</small>")
        browse_ctl = [self.sort_box, self.true_box, self.pred_box] if browse else []
        row = [self.picker, self.method_picker, self.emb_toggle, *browse_ctl, self.help_line]
        super().__init__(index, train_data, controls=row, **kwargs)
        self._texts["test"] = test_text
        self.gallery.actions = ["query"]
        self.add_class("tw-explorer")
        if browse and self.outcomes.classes:
            names = [(self.renderer.label(c), c) for c in range(self.outcomes.n_classes)]
            self.true_box.options = [("any", None), *names]
            self.pred_box.options = [("any", None), *names]
        elif browse:
            self.true_box.layout.display = self.pred_box.layout.display = "none"
        self.show_embeddings = bool(embeddings)
        self.picker.observe(self._guard(self._on_picker), names="value")
        self.emb_toggle.observe(self._guard(lambda ch: setattr(self, "show_embeddings", ch["new"])), names="value")
        self.observe(self._guard(self._on_query), names=["test_index", "train_query"])
        self.method_picker.observe(self._guard(lambda ch: setattr(self, "method", ch["new"])), names="value")
        self.observe(self._guard(self._on_method), names="method")
        self.observe(self._guard(lambda ch: (setattr(self.emb_toggle, "value", ch["new"]), self.refresh())),
                     names="show_embeddings")
        self.sort_box.observe(self._guard(lambda ch: setattr(self, "test_sort", ch["new"])), names="value")
        self.true_box.observe(self._guard(lambda ch: setattr(self, "test_filter", (ch["new"], self.test_filter[1]))),
                              names="value")
        self.pred_box.observe(self._guard(lambda ch: setattr(self, "test_filter", (self.test_filter[0], ch["new"]))),
                              names="value")
        self.observe(self._guard(self._on_browse), names=["test_sort", "test_filter"])
        self.observe(self._guard(lambda _ch: self.refresh()), names="test_page")
        self._check(int(test_index), len(self.test), "test_index")
        if int(test_index) == self.test_index:
            self._visit(("test", int(test_index)))
            self.refresh()
        self.test_index = int(test_index)

    # -- the query ----------------------------------------------------------------------------------
    @staticmethod
    def _check(i: int, n: int, name: str) -> None:
        if not 0 <= i < n:
            raise TracInError(f"{name}={i} is out of range; there are {n} examples (0..{n - 1}).")

    @traitlets.validate("test_index")
    def _valid_test(self, proposal: dict) -> Any:
        if proposal["value"] is not None:
            self._check(proposal["value"], len(self.test), "test_index")
        return proposal["value"]

    @traitlets.validate("train_query")
    def _valid_train(self, proposal: dict) -> Any:
        if proposal["value"] is not None:
            self._check(proposal["value"], len(self.train), "train_query")
        return proposal["value"]

    @property
    def query(self) -> tuple[str, int]:
        """("test", i) or ("train", i): the example whose influences are shown."""
        if self.train_query is not None:
            return "train", int(self.train_query)
        return "test", int(self.test_index)

    def _on_picker(self, change: dict) -> None:
        text = str(change["new"]).strip()
        if not text:
            return
        try:
            i = int(text)
        except ValueError:
            raise TracInError(f"type a test example number (0..{len(self.test) - 1}), got {text!r}.") from None
        if self.query != ("test", i):
            self.test_index = i

    def _on_query(self, change: dict) -> None:
        if change["new"] is None:
            return
        with self.hold_trait_notifications():
            if change["name"] == "test_index":
                self.train_query = None
            else:
                self.test_index = None
        role, i = self.query
        self.picker.value = str(i) if role == "test" else ""
        self.picker.placeholder = "" if role == "test" else f"training #{i} is the query"
        if not self._navigating:
            self._visit((role, i))
        self.refresh()

    def _visit(self, q: tuple[str, int]) -> None:
        if 0 <= self._hist_pos < len(self._history) and self._history[self._hist_pos] == q:
            return
        self._history = self._history[: self._hist_pos + 1] + [q]
        self._history = self._history[-HISTORY:]
        self._hist_pos = len(self._history) - 1

    @property
    def history(self) -> list[tuple[str, int]]:
        """Queries visited, oldest first: [("test" | "train", index)]; history_position is the current one."""
        return list(self._history)

    @property
    def history_position(self) -> int:
        return self._hist_pos

    def go_to(self, at: int) -> None:
        """Make breadcrumb `at` (an index into history) the query again, keeping the history."""
        if not 0 <= at < len(self._history):
            raise TracInError(f"history position {at} is out of range (0..{len(self._history) - 1}).")
        self._hist_pos = at
        role, i = self._history[at]
        self._navigating = True
        try:
            if role == "test":
                self.test_index = i
            else:
                self.train_query = i
        finally:
            self._navigating = False
        self.refresh()

    def back(self) -> None:
        """The previous query in the history (no-op at the first)."""
        if self._hist_pos > 0:
            self.go_to(self._hist_pos - 1)

    @traitlets.validate("method")
    def _valid_method(self, proposal: dict) -> Any:
        if proposal["value"] not in self.indexes:
            raise TracInError(f"unknown method {proposal['value']!r}; choose one of {list(self.indexes)}.")
        return proposal["value"]

    def _on_method(self, change: dict) -> None:
        self.index = self.indexes[change["new"]]
        self.method_picker.value = change["new"]
        self.refresh()

    def _source(self, role: str):
        return self.test if role == "test" else self.train

    def result(self, role: str | None = None, i: int | None = None) -> dict:
        """Cached query result: {"features": (C, 1, dim), "proponents" / "opponents": (indices, scores),
        "embedding": (indices, scores) | None, "data": the query, "rescored": training examples rescored
        exactly (rerank=) | None}.

        A training query is left out of its own lists: top_k asks for k + 1 and drops it.
        """
        role, i = (role, i) if role is not None else self.query
        key = (self.method, role, int(i))
        res = self._results.get(key)
        if res is None:
            sub = self._source(role).subset([i])
            feats = self.index.test_features(sub, target=self.target)
            extra = 1 if role == "train" else 0
            if self._reranking:
                topk = self.index.top_k(sub, k=self.k + extra, target=self.target, features=feats,
                                        rerank=self.rerank if self.rerank == "auto" else max(self.rerank, self.k + extra),
                                        train_data=self.train)
            else:
                topk = self.index.top_k(k=self.k + extra, features=feats)
            rescored = self.index.last_rerank["rescored"] if self._reranking else None
            res = {"features": feats, "embedding": None, "data": sub, "rescored": rescored,
                   "proponents": self._drop(topk.proponents, role, i), "opponents": self._drop(topk.opponents, role, i)}
            self._results[key] = res
            if len(self._results) > self._cache_queries:
                self._results.popitem(last=False)
        else:
            self._results.move_to_end(key)
        if self.show_embeddings and res["embedding"] is None:
            if self._emb_train is None:
                self._emb_train = eng.embed(self.index, self.train)
            extra = 1 if role == "train" else 0
            res["embedding"] = self._drop(eng.nearest_neighbors(self._emb_train, eng.embed(self.index, res["data"]),
                                                                self.k + extra), role, i)
        return res

    def _drop(self, nb: Any, role: str, i: int) -> tuple[list[int], list[float]]:
        """(indices, scores) of row 0 of a ranked result, without the query itself, at most k."""
        pairs = [(int(j), float(s)) for j, s in zip(nb.indices[0].tolist(), nb.scores[0].tolist())
                 if not (role == "train" and int(j) == int(i))]
        pairs = pairs[: self.k]
        return [j for j, _ in pairs], [s for _, s in pairs]

    # -- the test-example browser ---------------------------------------------------------------------
    @property
    def outcomes(self) -> TestOutcomes:
        """The model's outcome on every test example (computed once, on first use)."""
        if self._outcomes is None:
            self._outcomes = TestOutcomes(self.index, self.test)
        return self._outcomes

    def browsed(self) -> torch.Tensor:
        """Test indices the browser lists (all pages) for test_sort and test_filter: LongTensor (m,)."""
        true, pred = self.test_filter
        return self.outcomes.order(self.test_sort, true, pred)

    @property
    def n_test_pages(self) -> int:
        return max(1, -(-len(self.browsed()) // max(1, self.browse)))

    @traitlets.validate("test_page")
    def _valid_test_page(self, proposal: dict) -> int:
        return min(max(0, int(proposal["value"])), self.n_test_pages - 1)

    @traitlets.validate("test_sort")
    def _valid_sort(self, proposal: dict) -> str:
        if proposal["value"] not in SORTS:
            raise TracInError(f"test_sort must be one of {list(SORTS)}, got {proposal['value']!r}.")
        return proposal["value"]

    @traitlets.validate("test_filter")
    def _valid_filter(self, proposal: dict) -> tuple:
        value = tuple(proposal["value"])
        if len(value) != 2:
            raise TracInError(f"test_filter is (true class or None, predicted class or None), got {value!r}.")
        if any(v is not None for v in value) and not self.outcomes.classes:
            raise TracInError("the test data has no class labels to filter by; set test_filter=(None, None).")
        return tuple(None if v is None else int(v) for v in value)

    def _on_browse(self, change: dict) -> None:
        if change["name"] == "test_filter":
            self.true_box.value, self.pred_box.value = change["new"]
        else:
            self.sort_box.value = change["new"]
        with self.hold_trait_notifications():
            self.test_page = 0
        self.refresh()

    def _test_strip(self) -> dict:
        out = self.outcomes
        shown = self.browsed()
        idx = shown[self.test_page * self.browse:(self.test_page + 1) * self.browse].tolist()
        if out.preds is not None:
            for j in idx:
                self._preds[("test", j)] = self.renderer.label(out.preds[j])
        tiles = [self._tile("test", j, pick=True, sub=out.describe(j)) for j in idx]
        wrong = int(out.wrong().sum())
        true, pred = self.test_filter
        filt = "".join([f", true {self.renderer.label(true)}" if true is not None else "",
                        f", predicted {self.renderer.label(pred)}" if pred is not None else ""])
        cm = None
        if out.classes:
            K = out.n_classes
            on = None if true is None and pred is None else [true, pred]
            cm = {"labels": [self.renderer.label(c) for c in range(K)], "counts": out.confusion().tolist(), "active": on}
        note = (f"{len(shown)} of {out.n}{filt}; {SORTS[self.test_sort]}"
                + (f"; {wrong} misclassified in all" if out.classes else "") + "; click one to explain it")
        return {"key": "tests", "title": "test examples", "note": note, "scale": 0.0, "wrap": True, "tiles": tiles,
                "help": "loss = l(f(x), y) at the last checkpoint; % = the model's confidence in its prediction",
                "pager": {"page": self.test_page, "n_pages": self.n_test_pages}, "confusion": cm}

    # -- view -----------------------------------------------------------------------------------------
    def _query_sub(self, role: str, i: int) -> str:
        if role == "test" and self.browse:
            return self.outcomes.describe(i)
        res = self.result(role, i)
        if "sub" not in res:
            outcome = TestOutcomes(self.index, res["data"])
            res["sub"] = outcome.describe(0)
        return res["sub"]

    def _strips(self) -> list[dict]:
        role, i = self.query
        res = self.result(role, i)
        (pro, pro_s), (opp, opp_s) = res["proponents"], res["opponents"]
        emb = res["embedding"] if self.show_embeddings else None
        self._fill_predictions("train", pro + opp + ([] if emb is None else emb[0]) + ([i] if role == "train" else []))
        self._fill_predictions(role, [i])
        qtile = self._tile(role, i, pinned=True, sub=self._query_sub(role, i))
        what = "test example" if role == "test" else "training example"
        towards = qtile["label"] if self.target == "loss" else (qtile["pred"] or "its prediction")
        formula = "S(z, z') = sum_c eta_c <g_c(z), g_c(z')>, summed over checkpoints c (learning rate eta_c)"
        query = {"key": "query", "title": f"query: {what} {i}", "scale": 0.0, "tiles": [qtile],
                 "note": f"{self.method}, k={self.k}" + (", left out of its own lists" if role == "train" else "")
                 + ("" if res["rescored"] is None else
                    f", exact scores ({res['rescored']} projected candidates rescored)"),
                 "help": f"target={self.target}"}
        strips = [query,
                  self._strip("proponents", "proponents", pro, pro_s, color="influence", help=formula + "; S > 0",
                              note=f"training examples that pushed the prediction towards {towards} (strongest first)"),
                  self._strip("opponents", "opponents", opp, opp_s, color="influence", help=formula + "; S < 0",
                              note=f"training examples that pushed it away from {towards} (strongest first)")]
        if emb is not None:
            strips.append(self._strip("embedding", "embedding neighbours", emb[0], emb[1], scale=1.0, signed=False,
                                      color="similarity", help="cosine of penultimate-layer embeddings, last checkpoint",
                                      note="look alike to the model (not influence): most similar first"))
        if self.browse:
            strips.insert(0, self._test_strip())
        return strips

    def _status(self) -> str:
        role, i = self.query
        return (f"{'test' if role == 'test' else 'training'} example {i} is the query; "
                f"{self.index.n_train} training examples")

    def _help(self) -> str:
        return ("bars: S(z, z') = sum_c eta_c <g_c(z), g_c(z')>, scaled to each strip's largest |S|. "
                "Keys: arrows, Enter (select), q (make it the query), b (back), Escape (close).")

    def _refresh_history(self) -> None:
        self.gallery.history = [{"label": f"{'test' if r == 'test' else 'train'} #{j}", "current": n == self._hist_pos}
                                for n, (r, j) in enumerate(self._history)]

    def refresh(self) -> None:
        self._refresh_history()
        super().refresh()

    def per_checkpoint(self, i: int) -> torch.Tensor:
        """Terms eta_c <g_c(query), g_c(z_i)> for one training example: Tensor (C,) float64, sums to its score.

        The same numbers as index.influence_per_checkpoint(...)[:, 0, i], from one stored row per
        checkpoint instead of a pass over all n_train rows; with rerank=, exact terms from recomputed gradients.
        """
        if self._reranking:
            return self.index.exact_influence_per_checkpoint(self.result()["data"], self.train, [int(i)],
                                                              target=self.target)[:, 0, 0]
        return eng.per_checkpoint_row(self.index, self.result()["features"], int(i))

    @property
    def _reranking(self) -> bool:
        """Whether queries of the current method are rescored exactly (rerank= and a projected TracIn index)."""
        return bool(self.rerank) and eng.can_rerank(self.index)

    def _detail_rows(self, i: int) -> list[tuple[str, str]]:
        per = self.per_checkpoint(i)
        lrs = self.index.learning_rates.tolist()
        total = float(per.sum())
        rows = [(f"{self.method} score (sum)", f"{total:+.4g}"),
                ("effect", "pushed the prediction towards the query's label" if total > 0 else
                 "pushed the prediction away from the query's label")]
        if self.method == "TracIn":
            rows += [(f"checkpoint {c} (lr {lr:g})", f"{float(v):+.4g}") for c, (lr, v) in enumerate(zip(lrs, per.tolist()))]
        return rows

    def _detail_extra(self, i: int) -> dict:
        role, q = self.query
        qtile = self._tile(role, q, pinned=True)
        extra: dict = {"compare": {"title": f"query: {'test' if role == 'test' else 'training'} #{q} ({qtile['label']})",
                                   "png": qtile["png"], "text": self.original_text(role, q) or qtile["text"]}}
        if self.method == "TracIn":
            per = self.per_checkpoint(i).tolist()
            extra["bars"] = {"title": "score per checkpoint", "values": per,
                             "labels": [f"checkpoint {c}" for c in range(len(per))]}
        return extra

    def _on_action(self, msg: dict) -> None:
        action = msg.get("action")
        if action == "query":
            self.train_query = int(msg["index"])
        elif action == "test":
            self.test_index = int(msg["index"])
        elif action == "back":
            self.back()
        elif action == "history":
            self.go_to(int(msg["at"]))
        elif action == "page" and msg.get("strip") == "tests":
            self.test_page = int(msg["page"])
        elif action == "confusion":
            self.test_filter = (msg.get("row"), msg.get("col"))

    def to_dataframe(self):
        """pandas DataFrame of the shown strips: strip, rank, index, label, predicted, score, selected."""
        import pandas as pd

        rows = [{"strip": s["key"], "rank": r, "index": t["index"], "label": t["label"], "predicted": t["pred"],
                 "score": t["score"], "selected": t["index"] in self.selected}
                for s in self.gallery.strips if s["key"] not in ("query", "tests") for r, t in enumerate(s["tiles"])]
        return pd.DataFrame(rows, columns=["strip", "rank", "index", "label", "predicted", "score", "selected"])

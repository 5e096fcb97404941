"""InfluenceExplorer: a query example pinned on top, its proponents and opponents as ranked strips.

Example:
    >>> ex = tw.InfluenceExplorer(index, split.train, split.test, k=8, class_names=split.class_names)
    >>> ex                       # in a notebook: picker, toggle, strips
    >>> ex.test_index = 7        # observable: the strips follow (so do the picker and the page)
    >>> ex.train_query = 12      # a training example as the query (test_index becomes None)
    >>> ex.selected              # training indices clicked in the strips
    >>> ex = tw.InfluenceExplorer(index, train, test, methods={"SOURCE": tracin.index(train, method="source")})
    >>> ex.method = "SOURCE"     # observable: the strips are re-ranked by the other method

Choosing the query: the "test example" box, the trait `test_index`, or a shown training example:
Alt+click its tile, press q on it, or "use as query" in its detail panel. A plain click toggles the tile
in `selected` and opens its detail (full-size view, TracIn score split per checkpoint).
Scores: S(z, z') = sum_c eta_c <g_c(z), g_c(z')> (index.top_k); proponents have S > 0 (training on them
lowered the query's loss), opponents S < 0. The toggle adds the k nearest neighbours of the
penultimate-layer embedding (cosine, last checkpoint), the comparison drawn in the TracIn paper.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import ipywidgets as W
import torch
import traitlets

from tracin_engine.data import as_source
from tracin_engine.errors import TracInError

from ._base import GalleryBase


class InfluenceExplorer(GalleryBase):
    """Query -> proponents / opponents (and optionally embedding neighbours). See the module docstring."""

    test_index = traitlets.Int(0, allow_none=True)
    train_query = traitlets.Int(None, allow_none=True)
    show_embeddings = traitlets.Bool(False)
    method = traitlets.Unicode("TracIn")

    def __init__(self, index: Any, train_data: Any, test_data: Any, k: int = 8, test_index: int = 0,
                 target: str | None = None, embeddings: bool = False, test_batch_fn: Any = None,
                 cache_queries: int = 256, methods: dict[str, Any] | None = None, **kwargs: Any):
        """methods: other indexes over the same training data to switch to, e.g. {"SOURCE": source_index}."""
        if k < 1:
            raise TracInError(f"k must be at least 1, got {k}.")
        self.indexes = {"TracIn": index, **(methods or {})}
        bad = [name for name, ix in self.indexes.items() if ix.n_train != index.n_train]
        if bad:
            raise TracInError(f"methods {bad} were built on another training set (n_train differs from "
                              f"{index.n_train}); build every index on the same train_data.")
        self.test = as_source(test_data, test_batch_fn)
        self.k = int(k)
        if target is None:
            target = "loss" if self.test.example(0)[1] is not None else "prediction"
        self.target = target
        self._results: OrderedDict[tuple[str, int], dict] = OrderedDict()
        self._cache_queries = cache_queries
        self._emb_train: torch.Tensor | None = None
        self.picker = W.BoundedIntText(value=0, min=0, max=len(self.test) - 1, description="test example",
                                       style={"description_width": "initial"}, layout=W.Layout(width="190px"))
        self.picker.add_class("tw-picker")
        self.emb_toggle = W.ToggleButton(value=bool(embeddings), description="embedding neighbours",
                                         tooltip="also show nearest neighbours of the penultimate-layer embedding",
                                         layout=W.Layout(width="auto"))
        self.emb_toggle.add_class("tw-emb-toggle")
        self.help = W.HTML("<small>click: select + details &middot; Alt+click or <b>q</b>: make it the query "
                           "&middot; arrows / Enter / Escape</small>")
        self.method_picker = W.Dropdown(options=list(self.indexes), value="TracIn", description="method",
                                        layout=W.Layout(width="180px", display="" if methods else "none"))
        self.method_picker.add_class("tw-method")
        row = [self.picker, self.method_picker, self.emb_toggle, self.help]
        super().__init__(index, train_data, controls=[W.HBox(row)], **kwargs)
        self.gallery.actions = ["query"]
        self.add_class("tw-explorer")
        self.show_embeddings = bool(embeddings)
        self.picker.observe(self._guard(lambda ch: setattr(self, "test_index", ch["new"])), names="value")
        self.emb_toggle.observe(self._guard(lambda ch: setattr(self, "show_embeddings", ch["new"])), names="value")
        self.observe(self._guard(self._on_query), names=["test_index", "train_query"])
        self.method_picker.observe(self._guard(lambda ch: setattr(self, "method", ch["new"])), names="value")
        self.observe(self._guard(self._on_method), names="method")
        self.observe(self._guard(lambda ch: (setattr(self.emb_toggle, "value", ch["new"]), self.refresh())),
                     names="show_embeddings")
        self._check(int(test_index), len(self.test), "test_index")
        if int(test_index) == self.test_index:
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

    def _on_query(self, change: dict) -> None:
        if change["new"] is None:
            return
        with self.hold_trait_notifications():
            if change["name"] == "test_index":
                self.train_query = None
                self.picker.value = change["new"]
            else:
                self.test_index = None
        self.refresh()

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
        """Cached query result: {"features": (C, 1, dim), "topk": TopK (1, k), "embedding": Neighbors | None}."""
        role, i = (role, i) if role is not None else self.query
        key = (self.method, role, int(i))
        res = self._results.get(key)
        if res is None:
            sub = self._source(role).subset([i])
            feats = self.index.test_features(sub, target=self.target)
            res = {"features": feats, "topk": self.index.top_k(k=self.k, features=feats), "embedding": None,
                   "data": sub}
            self._results[key] = res
            if len(self._results) > self._cache_queries:
                self._results.popitem(last=False)
        else:
            self._results.move_to_end(key)
        if self.show_embeddings and res["embedding"] is None:
            from tracin_engine.analysis.embeddings import embed, nearest_neighbors
            if self._emb_train is None:
                self._emb_train = embed(self.index.tracin, self.train)
            res["embedding"] = nearest_neighbors(self._emb_train, embed(self.index.tracin, res["data"]), self.k)
        return res

    # -- view -----------------------------------------------------------------------------------------
    def _strips(self) -> list[dict]:
        role, i = self.query
        res = self.result(role, i)
        pro, opp = res["topk"].proponents, res["topk"].opponents
        scale = float(max(pro.scores.abs().max(), opp.scores.abs().max()))
        emb = res["embedding"] if self.show_embeddings else None
        shown = pro.indices[0].tolist() + opp.indices[0].tolist() + ([] if emb is None else emb.indices[0].tolist())
        self._fill_predictions("train", shown + ([i] if role == "train" else []))   # one forward for all tiles
        self._fill_predictions(role, [i])
        what = "test example" if role == "test" else "training example"
        query = {"key": "query", "title": f"query: {what} {i}", "scale": scale,
                 "note": f"{self.method}, target={self.target}, k={self.k}", "tiles": [self._tile(role, i, pinned=True)]}
        strips = [query,
                  self._strip("proponents", "proponents", pro.indices[0], pro.scores[0], scale=scale,
                              note="training examples that lowered this loss (S > 0), strongest first"),
                  self._strip("opponents", "opponents", opp.indices[0], opp.scores[0], scale=scale,
                              note="training examples that raised it (S < 0), strongest first")]
        if emb is not None:
            strips.append(self._strip("embedding", "embedding neighbours", emb.indices[0], emb.scores[0], scale=1.0,
                                      note="cosine similarity of penultimate-layer embeddings (last checkpoint)"))
        return strips

    def _status(self) -> str:
        role, i = self.query
        return f"{'test' if role == 'test' else 'training'} example {i} as the query; {self.index.n_train} training examples"

    def per_checkpoint(self, i: int) -> torch.Tensor:
        """Terms eta_c <g_c(query), g_c(z_i)> for one training example: Tensor (C,) float64, sums to its score.

        The same numbers as index.influence_per_checkpoint(...)[:, 0, i], from one stored row per
        checkpoint instead of a pass over all n_train rows.
        """
        t = self.result()["features"].double()
        terms = [lr * self.index.layout.dots(t[c], self.index.features(c)[i:i + 1].to(t.device).double())[0, 0]
                 for c, lr in enumerate(self.index.learning_rates.tolist())]
        return torch.stack(terms).cpu()

    def _detail_rows(self, i: int) -> list[tuple[str, str]]:
        per = self.per_checkpoint(i)
        lrs = self.index.learning_rates.tolist()
        rows = [(f"{self.method} score (sum)", f"{float(per.sum()):+.4g}")]
        if self.method == "TracIn":
            rows += [(f"checkpoint {c} (lr {lr:g})", f"{float(v):+.4g}")
                     for c, (lr, v) in enumerate(zip(lrs, per.tolist()))]
        return rows

    def _on_action(self, msg: dict) -> None:
        if msg.get("action") == "query":
            self.train_query = int(msg["index"])

    def to_dataframe(self):
        """pandas DataFrame of the shown strips: strip, rank, index, label, predicted, score, selected."""
        import pandas as pd

        rows = [{"strip": s["key"], "rank": r, "index": t["index"], "label": t["label"], "predicted": t["pred"],
                 "score": t["score"], "selected": t["index"] in self.selected}
                for s in self.gallery.strips if s["key"] != "query" for r, t in enumerate(s["tiles"])]
        return pd.DataFrame(rows, columns=["strip", "rank", "index", "label", "predicted", "score", "selected"])

"""SelfInfluenceGallery: training examples ranked by self-influence, paged, filterable, markable.

Example:
    >>> g = tw.SelfInfluenceGallery(index, split.train, class_names=split.class_names, page_size=48)
    >>> g.page = 3; g.label_filter = 7          # observable traits; the controls follow
    >>> g.mark([12, 40], "suspicious")         # or click a tile, then "suspicious (s)" / "fine (f)"
    >>> g.selected                              # training indices clicked
    >>> g.to_dataframe()                        # the selected and marked examples, with scores

Ranking: index.outliers(weights, space=space).scores. space="output" (the default where the index
recorded it) is the self-influence of the model output, s(z) = sum_c eta_c ||dl/df_c(z)||^2;
space="parameters" (the default for a SOURCE index or a store built before output norms were
recorded; the status line says which) is the paper's sum_c eta_c ||g_c(z)||^2
(index.self_influence()); see tracin_engine/analysis/outliers.py. High values are examples the model found
hard to fit (mislabelled, ambiguous or rare). Only one page of tiles is rendered and sent
(page_size), so 50k examples stay as quick as 500: ranking and filtering are index arithmetic.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import ipywidgets as W
import torch
import traitlets

from tracin_engine.errors import TracInError
from tracin_engine.analysis.outliers import has_output_norms

from ._base import GalleryBase

MARKS = ("suspicious", "fine")


class SelfInfluenceGallery(GalleryBase):
    """Ranked by self-influence (highest first), page_size tiles per page. See the module docstring."""

    page = traitlets.Int(0)
    label_filter = traitlets.Any(None)

    def __init__(self, index: Any, train_data: Any, page_size: int = 48, self_influence: Any = None,
                 weights: Any = None, space: str | None = None, **kwargs: Any):
        if page_size < 1:
            raise TracInError(f"page_size must be at least 1, got {page_size}.")
        self.page_size = int(page_size)
        self._per_checkpoint: torch.Tensor | None = None
        if self_influence is None and space is None:  # output space where recorded (not for SOURCE, old stores)
            space = "output" if has_output_norms(index) else "parameters"
        self.space = space if self_influence is None else None
        if self_influence is None:
            ranked = index.outliers(weights, space=space)
            scores, self._per_checkpoint = ranked.scores, ranked.per_checkpoint
        else:
            scores = torch.as_tensor(self_influence)
        self.scores = scores.double().cpu()
        self.order = torch.argsort(self.scores, descending=True, stable=True)
        self.rank = torch.empty_like(self.order)
        self.rank[self.order] = torch.arange(len(self.order))
        self._filtered: dict[Any, torch.Tensor] = {}
        self.prev_btn = W.Button(description="\u25c0 prev", layout=W.Layout(width="auto"))
        self.next_btn = W.Button(description="next \u25b6", layout=W.Layout(width="auto"))
        self.page_box = W.BoundedIntText(value=1, min=1, max=1, description="page", layout=W.Layout(width="150px"))
        self.page_info = W.HTML()
        self._filter_values: list[Any] = [None]       # Dropdown index -> label_filter value
        self.label_box = W.Dropdown(options=["all labels"], index=0, description="label",
                                    layout=W.Layout(width="200px"))
        self.mark_btns = {m: W.Button(description=f"selected \u2192 {m}", layout=W.Layout(width="auto"))
                          for m in MARKS}
        for w, cls in [(self.prev_btn, "tw-prev"), (self.next_btn, "tw-next"), (self.page_box, "tw-page"),
                       (self.label_box, "tw-label-filter")]:
            w.add_class(cls)
        bar = W.HBox([self.label_box, self.prev_btn, self.page_box, self.next_btn, self.page_info,
                      *self.mark_btns.values()], layout=W.Layout(flex_flow="row wrap", align_items="center"))
        super().__init__(index, train_data, controls=[bar], **kwargs)
        if len(self.scores) != len(self.train):
            raise TracInError(f"self_influence has {len(self.scores)} values for {len(self.train)} training examples.")
        self.labels = self.train.labels()
        if self.labels is not None and self.labels.dim() == 1 and not self.labels.is_floating_point():
            self._filter_values += sorted(set(self.labels.tolist()))
            self.label_box.options = ["all labels"] + [self.renderer.label(v) for v in self._filter_values[1:]]
            self.label_box.index = 0
        else:
            self.label_box.disabled = True
        self.gallery.actions = ["suspicious", "fine", "clear"]
        self.add_class("tw-outliers")
        self.prev_btn.on_click(self._guard(lambda _b: self._go(self.page - 1)))
        self.next_btn.on_click(self._guard(lambda _b: self._go(self.page + 1)))
        self.page_box.observe(self._guard(lambda ch: self._go(ch["new"] - 1)), names="value")
        self.label_box.observe(self._guard(lambda ch: setattr(self, "label_filter", self._filter_values[ch["new"]])),
                               names="index")
        for m, b in self.mark_btns.items():
            b.on_click(self._guard(lambda _b, m=m: self.mark(self.selected, m)))
        self.observe(self._guard(self._on_filter), names="label_filter")
        self.observe(self._guard(lambda _ch: self.refresh()), names="page")
        self.refresh()

    # -- ranking, filtering, paging -----------------------------------------------------------------
    def ranked(self) -> torch.Tensor:
        """Training indices with the current label filter, highest self-influence first: LongTensor (m,)."""
        key = self.label_filter
        if key is None:
            return self.order
        if key not in self._filtered:
            if self.labels is None:
                raise TracInError("the training data has no labels to filter by; set label_filter=None.")
            self._filtered[key] = self.order[self.labels[self.order] == key]
        return self._filtered[key]

    @property
    def n_pages(self) -> int:
        return max(1, -(-len(self.ranked()) // self.page_size))

    @traitlets.validate("page")
    def _valid_page(self, proposal: dict) -> int:
        return min(max(0, int(proposal["value"])), self.n_pages - 1)

    def _go(self, page: int) -> None:
        self.page = page

    def _on_filter(self, change: dict) -> None:
        if change["new"] is not None and self.labels is not None and not bool((self.labels == change["new"]).any()):
            raise TracInError(f"no training example has label {change['new']!r}.")
        if change["new"] in self._filter_values:
            self.label_box.index = self._filter_values.index(change["new"])
        with self.hold_trait_notifications():
            self.page = 0
        self.refresh()

    def page_indices(self) -> torch.Tensor:
        """Training indices shown on the current page: LongTensor (<= page_size,)."""
        return self.ranked()[self.page * self.page_size:(self.page + 1) * self.page_size]

    def _strips(self) -> list[dict]:
        idx = self.page_indices()
        start = self.page * self.page_size
        total = len(self.ranked())
        label = "" if self.label_filter is None else f", label {self.renderer.label(self.label_filter)}"
        strip = self._strip("page", "highest self-influence first", idx, self.scores[idx],
                            scale=float(self.scores.abs().max()), wrap=True, signed=False,
                            note=f"ranks {start + 1}-{start + len(idx)} of {total}{label}")
        return [strip]

    def _status(self) -> str:
        formula = {"output": "s(z) = sum_c eta_c ||dl/df_c(z)||^2 (output space)",
                   "parameters": "s(z) = sum_c eta_c ||g_c(z)||^2 (parameter space)"}.get(self.space, "given scores")
        return (f"self-influence {formula} over {len(self.scores)} training examples; "
                f"click: select + details; s / f: suspicious / fine")

    def refresh(self) -> None:
        self.page_box.max = self.n_pages
        self.page_box.value = self.page + 1
        self.page_info.value = f"of {self.n_pages}"
        self.prev_btn.disabled = self.page <= 0
        self.next_btn.disabled = self.page >= self.n_pages - 1
        super().refresh()

    # -- marks ----------------------------------------------------------------------------------------
    @property
    def marks(self) -> dict[int, str]:
        """{training index: "suspicious" | "fine"} for every marked example."""
        return {int(k): v for k, v in self.gallery.marks.items()}

    def mark(self, indices: Iterable[int], mark: str | None) -> None:
        """Mark training examples "suspicious" or "fine"; mark=None (or "clear") removes their marks."""
        if mark == "clear":
            mark = None
        if mark is not None and mark not in MARKS:
            raise TracInError(f"mark must be one of {MARKS} or None, got {mark!r}.")
        marks = dict(self.gallery.marks)
        for i in indices:
            i = int(i)
            if not 0 <= i < len(self.scores):
                raise TracInError(f"training index {i} is out of range (0..{len(self.scores) - 1}).")
            if mark is None:
                marks.pop(str(i), None)
            else:
                marks[str(i)] = mark
        self.gallery.marks = marks

    def _on_action(self, msg: dict) -> None:
        if msg.get("action") == "mark":
            self.mark([msg["index"]], msg.get("mark"))
            if self.gallery.active == int(msg["index"]):
                self.gallery.detail = self.detail(int(msg["index"]))

    def _detail_rows(self, i: int) -> list[tuple[str, str]]:
        rows = [("rank", f"{int(self.rank[i]) + 1} of {len(self.scores)}"),
                ("self-influence", f"{float(self.scores[i]):.4g}")]
        if self._per_checkpoint is not None:
            losses = self.index.store.losses[:, i].tolist()  # NaN where not recorded (SOURCE, older stores)
            for c, v in enumerate(self._per_checkpoint[:, i].tolist()):
                loss = "" if math.isnan(losses[c]) else f" \u00b7 loss {losses[c]:.3g}"
                rows.append((f"checkpoint {c}", f"{v:.4g}{loss}"))
        rows.append(("mark", self.gallery.marks.get(str(i), "none")))
        return rows

    def to_dataframe(self, all_examples: bool = False):
        """pandas DataFrame, one row per selected or marked example (every example if all_examples),
        by rank: index, rank (1 = highest), label, self_influence, mark, selected."""
        import pandas as pd

        marks, sel = self.marks, set(self.selected)
        chosen = self.order.tolist() if all_examples else sorted(sel | set(marks), key=lambda i: int(self.rank[i]))
        rows = []
        for i in chosen:
            label = self.renderer.label(self.labels[i]) if self.labels is not None else ""
            rows.append({"index": i, "rank": int(self.rank[i]) + 1, "label": label,
                         "self_influence": float(self.scores[i]), "mark": marks.get(i, ""), "selected": i in sel})
        return pd.DataFrame(rows, columns=["index", "rank", "label", "self_influence", "mark", "selected"])

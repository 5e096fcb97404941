"""SelfInfluenceGallery: training examples ranked by self-influence; review them and fix them in one loop.

Example:
    >>> g = tw.SelfInfluenceGallery(index, split.train, class_names=split.class_names, page_size=48)
    >>> g.page = 3; g.label_filter = 7          # observable traits; the controls follow
    >>> g.mark([12, 40], "suspicious")         # or click a tile, then s (suspicious) / f (fine) / a (relabel)
    >>> g.relabel(40, 3)                       # new label (default: the model's prediction)
    >>> g.undo()                               # the last mark / relabel taken back (key u)
    >>> g.to_dataframe(); g.to_csv("review.csv")
    >>> clean = g.cleaned()                     # training data without "suspicious", relabels applied

Ranking: index.outliers(weights, space=space).scores. space="output" (the default where the index
recorded it) is the self-influence of the model output, s(z) = sum_c eta_c ||dl/df_c(z)||^2;
space="parameters" (the default for a SOURCE index or a store built before output norms were
recorded) is the paper's sum_c eta_c ||g_c(z)||^2 (index.self_influence()). High values are examples
the model found hard to fit: likely mislabelled, ambiguous or rare. Only one page of tiles is rendered
and sent (page_size), so 50k examples stay as quick as 500: ranking and filtering are index arithmetic.
Review loop: after s / f / a on the open tile the next one opens (auto-advance). Marks are kept in a
sidecar file beside a disk index (marks_file="auto"; see review.py), so a later session sees them.
Scatter (when training losses were recorded): self-influence against the final training loss; drag a
box on it to show only those examples (`brush`), double-click to clear.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable

import ipywidgets as W
import numpy as np
import torch
import traitlets

from . import _engine as eng
from ._base import GalleryBase
from ._engine import TracInError
from .review import MARKS, SIDECAR, CleanedData, MarksFile, cleaned_dataset


class SelfInfluenceGallery(GalleryBase):
    """Ranked by self-influence (highest first), page_size tiles per page. See the module docstring."""

    page = traitlets.Int(0)
    label_filter = traitlets.Any(None)
    brush = traitlets.Any(None)

    def __init__(self, index: Any, train_data: Any, page_size: int = 48, self_influence: Any = None,
                 weights: Any = None, space: str | None = None, marks_file: Any = "auto", scatter: bool = True,
                 **kwargs: Any):
        """marks_file: "auto" (a sidecar beside a disk index, none for a memory index), a path, or None."""
        if page_size < 1:
            raise TracInError(f"page_size must be at least 1, got {page_size}.")
        self.page_size = int(page_size)
        self._per_checkpoint: torch.Tensor | None = None
        if self_influence is None and space is None:  # output space where recorded (not for SOURCE, old stores)
            space = "output" if eng.has_output_norms(index) else "parameters"
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
        self._relabels: dict[int, int] = {}
        self._undo: list[list[tuple[int, str | None, int | None]]] = []
        self._syncing = False
        self.prev_btn = W.Button(description="\u25c0 prev", layout=W.Layout(width="auto"))
        self.next_btn = W.Button(description="next \u25b6", layout=W.Layout(width="auto"))
        self.page_box = W.BoundedIntText(value=1, min=1, max=1, description="page", layout=W.Layout(width="150px"))
        self.page_info = W.HTML()
        self._filter_values: list[Any] = [None]       # Dropdown index -> label_filter value
        self.label_box = W.Dropdown(options=["all labels"], index=0, description="label",
                                    layout=W.Layout(width="200px"))
        self.mark_btns = {m: W.Button(description=f"selected \u2192 {m}", layout=W.Layout(width="auto"))
                          for m in ("suspicious", "fine")}
        self.undo_btn = W.Button(description="undo (u)", layout=W.Layout(width="auto"))
        for w, cls in [(self.prev_btn, "tw-prev"), (self.next_btn, "tw-next"), (self.page_box, "tw-page"),
                       (self.label_box, "tw-label-filter"), (self.undo_btn, "tw-undo")]:
            w.add_class(cls)
        row = [self.label_box, self.prev_btn, self.page_box, self.next_btn, self.page_info,
               *self.mark_btns.values(), self.undo_btn]
        super().__init__(index, train_data, controls=row, **kwargs)
        if len(self.scores) != len(self.train):
            raise TracInError(f"self_influence has {len(self.scores)} values for {len(self.train)} training examples.")
        self.labels = self.train.labels()
        self.classes = self.labels is not None and self.labels.dim() == 1 and not self.labels.is_floating_point()
        if self.classes:
            self._filter_values += sorted(set(self.labels.tolist()))
            self.label_box.options = ["all labels"] + [self.renderer.label(v) for v in self._filter_values[1:]]
            self.label_box.index = 0
        else:
            self.label_box.disabled = True
        self.gallery.actions = ["suspicious", "fine", "relabel", "clear"] if self.classes else ["suspicious", "fine", "clear"]
        self.add_class("tw-outliers")
        self.marks_file = self._open_marks(index, marks_file)
        if self.marks_file is not None:
            marks, self._relabels = self.marks_file.load()
            self.gallery.marks = {str(k): v for k, v in marks.items()}
        self.prev_btn.on_click(self._guard(lambda _b: self._go(self.page - 1)))
        self.next_btn.on_click(self._guard(lambda _b: self._go(self.page + 1)))
        self.page_box.observe(self._guard(lambda ch: None if self._syncing else self._go(ch["new"] - 1)), names="value")
        self.label_box.observe(self._guard(lambda ch: setattr(self, "label_filter", self._filter_values[ch["new"]])),
                               names="index")
        for m, b in self.mark_btns.items():
            b.on_click(self._guard(lambda _b, m=m: self.mark(self.selected, m)))
        self.undo_btn.on_click(self._guard(lambda _b: self.undo()))
        self.observe(self._guard(self._on_filter), names=["label_filter", "brush"])
        self.observe(self._guard(lambda _ch: self.refresh()), names="page")
        self._losses = eng.train_losses(index) if index is not None else None
        self._scatter_on = bool(scatter)
        self._points: tuple[bytes, bytes] | None = None
        self.refresh()

    @staticmethod
    def _open_marks(index: Any, marks_file: Any) -> MarksFile | None:
        if marks_file is None:
            return None
        if isinstance(marks_file, str) and marks_file == "auto":
            folder = eng.store_path(index) if index is not None else None
            return None if folder is None else MarksFile(folder / SIDECAR, index.n_train)
        return MarksFile(Path(marks_file), index.n_train)

    # -- ranking, filtering, paging -----------------------------------------------------------------
    def ranked(self) -> torch.Tensor:
        """Training indices with the current label filter and brush, highest self-influence first: LongTensor (m,)."""
        key = (self.label_filter, None if self.brush is None else tuple(self.brush))
        if key not in self._filtered:
            keep = torch.ones(len(self.order), dtype=torch.bool)
            if self.label_filter is not None:
                if self.labels is None:
                    raise TracInError("the training data has no labels to filter by; set label_filter=None.")
                keep &= self.labels[self.order] == self.label_filter
            if self.brush is not None:
                x, y = self.scatter_coords()
                x0, x1, y0, y1 = self.brush
                inside = (x >= x0) & (x <= x1) & (y >= y0) & (y <= y1)
                keep &= inside[self.order]
            self._filtered[key] = self.order[keep]
        return self._filtered[key]

    @property
    def n_pages(self) -> int:
        return max(1, -(-len(self.ranked()) // self.page_size))

    @traitlets.validate("page")
    def _valid_page(self, proposal: dict) -> int:
        return min(max(0, int(proposal["value"])), self.n_pages - 1)

    @traitlets.validate("brush")
    def _valid_brush(self, proposal: dict) -> Any:
        b = proposal["value"]
        if b is None:
            return None
        if self._losses is None:
            raise TracInError("no training losses were recorded for this index, so there is no scatter to brush.")
        b = tuple(float(v) for v in b)
        if len(b) != 4 or b[0] > b[1] or b[2] > b[3]:
            raise TracInError(f"brush is (x0, x1, y0, y1) with x0 <= x1 and y0 <= y1, got {b}.")
        return b

    def _go(self, page: int) -> None:
        self.page = page

    def _on_filter(self, change: dict) -> None:
        if change["name"] == "label_filter":
            new = change["new"]
            if new is not None and self.labels is not None and not bool((self.labels == new).any()):
                raise TracInError(f"no training example has label {new!r}.")
            if new in self._filter_values:
                self.label_box.index = self._filter_values.index(new)
        with self.hold_trait_notifications():
            self.page = 0
        self.refresh()

    def page_indices(self) -> torch.Tensor:
        """Training indices shown on the current page: LongTensor (<= page_size,)."""
        return self.ranked()[self.page * self.page_size:(self.page + 1) * self.page_size]

    # -- the scatter ------------------------------------------------------------------------------------
    def scatter_coords(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) per training example as the scatter draws them: x = log10 self-influence (the score itself when
        some are <= 0), y = training loss at the last checkpoint. Tensors (n_train,) float64."""
        if self._losses is None:
            raise TracInError("no training losses were recorded for this index (SOURCE or an older store).")
        s = self.scores
        x = torch.log10(s) if bool((s > 0).all()) else s
        return x, self._losses[-1]

    def _scatter(self) -> dict:
        """The scatter trait (points as float32 bytes, made once); unchanged dicts are not sent again."""
        if self._losses is None or not self._scatter_on:
            return {}
        if self._points is None:
            x, y = self.scatter_coords()
            self._points = (x.numpy().astype(np.float32).tobytes(), y.numpy().astype(np.float32).tobytes())
        xlabel = "log10 self-influence" if bool((self.scores > 0).all()) else "self-influence"
        return {"x": self._points[0], "y": self._points[1], "xlabel": xlabel, "ylabel": "final training loss",
                "brush": None if self.brush is None else list(self.brush)}

    # -- view -------------------------------------------------------------------------------------------
    def _strips(self) -> list[dict]:
        idx = self.page_indices()
        start = self.page * self.page_size
        total = len(self.ranked())
        label = "" if self.label_filter is None else f", label {self.renderer.label(self.label_filter)}"
        brushed = "" if self.brush is None else ", inside the brushed box"
        strip = self._strip("page", "highest self-influence first", idx, self.scores[idx], wrap=True, signed=False,
                            color="self", help=self._formula(),
                            note=f"ranks {start + 1}-{start + len(idx)} of {total}{label}{brushed}; high: the model "
                                 "found it hard to fit (likely mislabelled, ambiguous or rare)")
        strip["pager"] = None
        for t in strip["tiles"]:
            new = self._relabels.get(t["index"])
            if new is not None:
                t["sub"] = f"relabelled \u2192 {self.renderer.label(new)}"
        return [strip]

    def _formula(self) -> str:
        return {"output": "s(z) = sum_c eta_c ||dl/df_c(z)||^2: self-influence of the model output",
                "parameters": "s(z) = sum_c eta_c ||g_c(z)||^2: self-influence of the parameters"}.get(
                    self.space, "self-influence as given")

    def _status(self) -> str:
        return (f"{len(self.scores)} training examples, the ones the model found hardest to fit first; "
                "click: details; s / f: suspicious / fine, a: relabel to the prediction, u: undo")

    def _help(self) -> str:
        return self._formula() + "; bars scaled to the page's largest value"

    def _counts(self) -> str:
        marks = self.marks
        n = {m: sum(v == m for v in marks.values()) for m in ("suspicious", "fine")}
        parts = [f"{len(self.selected)} selected", f"{n['suspicious']} suspicious", f"{n['fine']} fine",
                 f"{len(self._relabels)} relabelled"]
        where = f" (saved to {self.marks_file.path.name})" if self.marks_file is not None else ""
        return " \u00b7 ".join(parts) + " across all pages" + where

    def refresh(self) -> None:
        self._syncing = True
        try:
            self.page_box.max = max(self.n_pages, self.page_box.value)
            self.page_box.value = self.page + 1
            self.page_box.max = self.n_pages
        finally:
            self._syncing = False
        self.page_info.value = f"of {self.n_pages}"
        self.prev_btn.disabled = self.page <= 0
        self.next_btn.disabled = self.page >= self.n_pages - 1
        super().refresh()
        with self.gallery.hold_sync():
            self.gallery.scatter = self._scatter()
            self.gallery.highlight = self.page_indices().tolist() if self.gallery.scatter else []

    # -- marks, relabels, undo ----------------------------------------------------------------------------
    @property
    def marks(self) -> dict[int, str]:
        """{training index: "suspicious" | "fine" | "relabel"} for every marked example."""
        return {int(k): v for k, v in self.gallery.marks.items()}

    @property
    def relabels(self) -> dict[int, int]:
        """{training index: new label} for every relabelled example."""
        return dict(self._relabels)

    def _check_index(self, i: int) -> int:
        i = int(i)
        if not 0 <= i < len(self.scores):
            raise TracInError(f"training index {i} is out of range (0..{len(self.scores) - 1}).")
        return i

    def _apply(self, changes: list[tuple[int, str | None, int | None]], record: bool = True) -> None:
        """Set (index, mark | None, new label | None) for each change; keep the old values for undo."""
        marks = dict(self.gallery.marks)
        before = []
        for i, mark, new in changes:
            before.append((i, marks.get(str(i)), self._relabels.get(i)))
            if mark is None:
                marks.pop(str(i), None)
            else:
                marks[str(i)] = mark
            if new is None:
                self._relabels.pop(i, None)
            else:
                self._relabels[i] = int(new)
        if record and changes:
            self._undo.append(before)
        self.gallery.marks = marks
        if self.marks_file is not None:
            self.marks_file.save(self.marks, self._relabels)
        active = self.gallery.active
        with self.gallery.hold_sync():
            self.gallery.counts = self._counts()
            if any(i == active for i, _, _ in changes):
                self.gallery.detail = self.detail(active)
        if any(new is not None or old is not None for (_, _, new), (_, _, old) in zip(changes, before)):
            self.refresh()

    def mark(self, indices: Iterable[int], mark: str | None) -> None:
        """Mark training examples "suspicious" or "fine"; mark=None (or "clear") removes marks and relabels."""
        if mark == "clear":
            mark = None
        if mark is not None and mark not in ("suspicious", "fine"):
            raise TracInError(f"mark must be 'suspicious', 'fine' or None, got {mark!r}; use relabel() for new labels.")
        self._apply([(self._check_index(i), mark, None) for i in indices])

    def relabel(self, i: int, label: int | None = None) -> None:
        """Give training example i a new label (default: the model's prediction); marks it "relabel"."""
        i = self._check_index(i)
        if not self.classes:
            raise TracInError("relabelling needs integer class labels; this training data has none.")
        if label is None:
            if self.index is None:
                raise TracInError("no index to predict with; pass the new label: relabel(i, label).")
            label = int(self.index.tracin.predictions(self.train.subset([i]))[0])
        self._apply([(i, "relabel", int(label))])

    def undo(self) -> bool:
        """Take back the last mark / relabel action; returns False when there is nothing to undo."""
        if not self._undo:
            return False
        self._apply(self._undo.pop(), record=False)
        return True

    def _advance(self, i: int) -> None:
        """Open the next example on the page after i (the next page's first at the end of a page)."""
        shown = self.page_indices().tolist()
        if i in shown and shown.index(i) + 1 < len(shown):
            self.gallery.active = shown[shown.index(i) + 1]
        elif i in shown and self.page < self.n_pages - 1:
            self.page += 1
            nxt = self.page_indices().tolist()
            self.gallery.active = nxt[0] if nxt else -1

    def _on_action(self, msg: dict) -> None:
        action = msg.get("action")
        if action == "undo":
            self.undo()
            return
        if action == "brush":
            self.brush = None if "x0" not in msg else (msg["x0"], msg["x1"], msg["y0"], msg["y1"])
            return
        if action != "mark":
            return
        i = int(msg["index"])
        if msg.get("mark") == "relabel":
            self.relabel(i, msg.get("value"))
        else:
            self.mark([i], msg.get("mark"))
        if msg.get("mark") != "clear" and (msg.get("advance") or self.gallery.active == i):
            self._advance(i)

    def _detail_rows(self, i: int) -> list[tuple[str, str]]:
        rows = [("rank", f"{int(self.rank[i]) + 1} of {len(self.scores)}"),
                ("self-influence", f"{float(self.scores[i]):.4g}")]
        if self._per_checkpoint is not None:
            for c, v in enumerate(self._per_checkpoint[:, i].tolist()):
                loss = float("nan") if self._losses is None else float(self._losses[c, i])
                rows.append((f"checkpoint {c}", f"{v:.4g}" + ("" if math.isnan(loss) else f" \u00b7 loss {loss:.3g}")))
        rows.append(("mark", self.gallery.marks.get(str(i), "none")))
        if i in self._relabels:
            rows.append(("new label", self.renderer.label(self._relabels[i])))
        return rows

    def _detail_extra(self, i: int) -> dict:
        extra: dict = {}
        if self._per_checkpoint is not None:
            extra["bars"] = {"title": "self-influence per checkpoint", "values": self._per_checkpoint[:, i].tolist(), "color": "self",
                             "labels": [f"checkpoint {c}" for c in range(self._per_checkpoint.shape[0])]}
        if self.classes:
            classes = sorted(set(self.labels.tolist()))
            pred = self._preds.get(("train", i))
            current = self._relabels.get(i)
            if current is None and pred is not None:
                current = next((c for c in classes if self.renderer.label(c) == pred), None)
            extra["relabel"] = {"options": [[c, self.renderer.label(c)] for c in classes], "current": current}
        return extra

    # -- export -----------------------------------------------------------------------------------------
    def to_dataframe(self, all_examples: bool = False):
        """pandas DataFrame, one row per selected, marked or relabelled example (every example if all_examples),
        by rank: index, rank (1 = highest), label, new_label, self_influence, mark, selected."""
        import pandas as pd

        marks, sel = self.marks, set(self.selected)
        chosen = (self.order.tolist() if all_examples else
                  sorted(sel | set(marks) | set(self._relabels), key=lambda i: int(self.rank[i])))
        rows = []
        for i in chosen:
            label = self.renderer.label(self.labels[i]) if self.labels is not None else ""
            new = self._relabels.get(i)
            rows.append({"index": i, "rank": int(self.rank[i]) + 1, "label": label,
                         "new_label": "" if new is None else self.renderer.label(new),
                         "self_influence": float(self.scores[i]), "mark": marks.get(i, ""), "selected": i in sel})
        return pd.DataFrame(rows, columns=["index", "rank", "label", "new_label", "self_influence", "mark", "selected"])

    def to_csv(self, path: str | Path, overwrite: bool = False) -> Path:
        """Write to_dataframe() as CSV; an existing file is replaced only with overwrite=True. Returns the path."""
        path = Path(path)
        if path.exists() and not overwrite:
            raise TracInError(f"{path} exists; pass overwrite=True to replace it, or another path.")
        self.to_dataframe().to_csv(path, index=False)
        return path

    def cleaned(self, drop: Iterable[str] = ("suspicious",)) -> CleanedData:
        """The training data for retraining: examples marked in `drop` left out, relabels applied (review.py)."""
        return cleaned_dataset(self.train, self.marks, self._relabels, drop)


__all__ = ["SelfInfluenceGallery", "MARKS"]

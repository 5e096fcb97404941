"""What every gallery shares: data access with cached tiles, `selected`, errors shown, static views.

Example (a subclass):
    >>> class Mine(GalleryBase):
    ...     def _strips(self): return [self._strip("top", "Top", [3, 1], scores=[0.5, 0.2])]
    >>> w = Mine(index, train_data); w.refresh(); w.selected     # [] until tiles are clicked

A gallery is an ipywidgets.VBox: stock controls, the Gallery (anywidget), and an Output where any
exception raised in a callback is printed (Jupyter would swallow it); `last_error` keeps it too.
Python owns the data: tiles are rendered here (pillow) and cached by (role, index).
"""

from __future__ import annotations

import traceback
from collections import OrderedDict
from typing import Any, Callable, Sequence

import ipywidgets as W
import traitlets

from ._engine import TracInError, as_source
from ._gallery import Gallery
from ._static import strips_figure, strips_html
from .render import DETAIL_PX, Renderer, View


class GalleryBase(W.VBox):
    """Base of the three galleries. `selected`: training indices the user clicked (a list, in click order)."""

    selected = traitlets.List(traitlets.Int())

    def __init__(self, index: Any, train_data: Any, *, render: Callable | None = None,
                 class_names: Sequence[str] | None = None, feature_names: Sequence[str] | None = None,
                 predictions: Any = "auto", batch_fn: Any = None, cache_size: int = 50_000,
                 text: Any = None, controls: Sequence[W.Widget] = ()):
        """text: the original text of each training example (a sequence of str, or a function i -> str), shown
        in tiles and the detail instead of what render / the tokens give (e.g. the sentence behind token ids)."""
        self.index = index
        self._texts: dict[str, Any] = {"train": text}
        self.train = as_source(train_data, batch_fn)
        if index is not None and len(self.train) != index.n_train:
            raise TracInError(f"train_data has {len(self.train)} examples but the index holds {index.n_train}; "
                              "pass the same training data the index was built from.")
        self.renderer = Renderer(render, class_names, feature_names)
        self.gallery = Gallery()
        self.errors = W.Output(layout=W.Layout(max_height="240px", overflow="auto"))
        self.last_error: BaseException | None = None
        if isinstance(predictions, str) and predictions == "auto":
            y0 = self.train.example(0)[1]      # class predictions only make sense for integer class labels
            predictions = y0 is None or (y0.numel() == 1 and not y0.is_floating_point())
        self._predictions = predictions
        self._cache: OrderedDict[tuple[str, int], tuple[View, str]] = OrderedDict()
        self._cache_size = cache_size
        self._preds: dict[tuple[str, int], str] = {}
        if controls:
            row = W.HBox(list(controls), layout=W.Layout(flex_flow="row wrap", align_items="center"))
            row.add_class("tw-controls")
            controls = [row]
        super().__init__(children=[*controls, self.gallery, self.errors])
        self.add_class("tw-widget")
        traitlets.link((self, "selected"), (self.gallery, "selected"))
        self.gallery.observe(self._guard(self._on_active), names="active")
        self.gallery.on_action(self._guard(self._on_action))
        self.observe(lambda _ch: setattr(self.gallery, "counts", self._counts()), names="selected")

    # -- errors -----------------------------------------------------------------------------------
    def _guard(self, fn: Callable) -> Callable:
        """Wrap a callback so its exception is printed in `self.errors` and kept in `last_error`."""
        def run(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - shown to the user, not hidden
                self.last_error = exc
                self.errors.append_stderr(f"tracin_widgets: {type(exc).__name__}: {exc}\n"
                                          + "".join(traceback.format_exception(exc)[-6:]))
                return None
        return run

    # -- data -> tiles ----------------------------------------------------------------------------
    def _source(self, role: str):
        return self.train

    def _view(self, role: str, i: int) -> tuple[View, str]:
        key = (role, int(i))
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        x, y = self._source(role).example(int(i))
        text = self.original_text(role, int(i))
        hit = (self.renderer.view(x) if text is None else self.renderer.view(text), self.renderer.label(y))
        self._cache[key] = hit
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return hit

    def original_text(self, role: str, i: int) -> str | None:
        """The text given with text= (test_text= for test examples) for example i, else None."""
        given = self._texts.get(role)
        if given is None:
            return None
        value = given(int(i)) if callable(given) else given[int(i)]
        return None if value is None else str(value)

    def _fill_predictions(self, role: str, indices: Sequence[int]) -> None:
        if self._predictions is False or self._predictions is None or self.index is None:
            return
        if role == "train" and not isinstance(self._predictions, bool):
            for i in indices:
                self._preds[(role, int(i))] = self.renderer.label(self._predictions[int(i)])
            return
        missing = [int(i) for i in dict.fromkeys(indices) if (role, int(i)) not in self._preds]
        if missing:
            preds = self.index.tracin.predictions(self._source(role).subset(missing))
            for i, p in zip(missing, preds):
                self._preds[(role, i)] = self.renderer.label(p)

    def _tile(self, role: str, i: int, score: float | None = None, pinned: bool = False, pick: bool = False,
              sub: str = "") -> dict:
        """One tile (fields: _schema.TILE_FIELDS)."""
        view, label = self._view(role, i)
        pred = self._preds.get((role, int(i)))
        what = "test example" if role == "test" else "training example"
        alt = f"{what} {int(i)}, label {label or 'none'}" + (f", predicted {pred}" if pred else "")
        return {"index": int(i), "role": role, "pinned": pinned, "pick": pick, "label": label, "pred": pred,
                "score": None if score is None else float(score), "sub": sub, "alt": alt,
                "png": view.png, "text": view.text}

    def _strip(self, key: str, title: str, indices: Sequence[int], scores: Sequence[float] | None = None,
               note: str = "", scale: float | None = None, role: str = "train", **extra: Any) -> dict:
        """One strip (fields: _schema.STRIP_FIELDS); bars are scaled to this strip's largest |score| by default."""
        idx = [int(i) for i in indices]
        sc = [float(s) for s in scores] if scores is not None else [None] * len(idx)
        self._fill_predictions(role, idx)
        if scale is None:
            scale = max((abs(s) for s in sc if s is not None), default=0.0)
        return {"key": key, "title": title, "note": note, "scale": float(scale),
                "tiles": [self._tile(role, i, s) for i, s in zip(idx, sc)], **extra}

    # -- building the view --------------------------------------------------------------------------
    def _strips(self) -> list[dict]:
        raise NotImplementedError

    def _status(self) -> str:
        return ""

    def _help(self) -> str:
        """Tooltip of the status line: the formulas behind the scores and the keys."""
        return ""

    def _counts(self) -> str:
        return f"{len(self.selected)} selected" if self.selected else ""

    def refresh(self) -> None:
        """Rebuild the strips from the current state (called by every control); an open detail follows."""
        strips, status = self._strips(), self._status()
        with self.gallery.hold_sync():
            self.gallery.strips = strips
            self.gallery.status = status
            self.gallery.help = self._help()
            self.gallery.counts = self._counts()
            active = self.gallery.active
            if active >= 0:
                shown = any(t["index"] == active and t["role"] == "train" and not t.get("pinned") and not t.get("pick")
                            for s in strips for t in s["tiles"])
                if shown:
                    self.gallery.detail = self.detail(active)   # scores against the current query / state
                else:
                    self.gallery.active = -1

    # -- detail and actions -------------------------------------------------------------------------
    def _on_active(self, change: dict) -> None:
        i = change["new"]
        self.gallery.detail = {} if i < 0 else self.detail(i)

    def detail(self, i: int) -> dict:
        """What the detail panel shows for training example i: full-size view, label, scores."""
        x, y = self.train.example(int(i))
        text = self.original_text("train", int(i))
        view = self.renderer.view(x if text is None else text, max_px=DETAIL_PX)
        label = self.renderer.label(y)
        self._fill_predictions("train", [i])
        pred = self._preds.get(("train", int(i)))
        rows = [["label", label or "none"]] + ([["predicted", pred]] if pred else [])
        rows += [[k, v] for k, v in self._detail_rows(int(i))]
        return {"index": int(i), "title": f"training example {int(i)}", "alt": f"training example {int(i)}, label {label}",
                "png": view.png, "text": view.full_text or view.text, "rows": rows, **self._detail_extra(int(i))}

    def _detail_extra(self, i: int) -> dict:
        """More detail fields (bars, compare, relabel; see _schema.DETAIL_FIELDS) for training example i."""
        return {}

    def _detail_rows(self, i: int) -> list[tuple[str, str]]:
        return []

    def _on_action(self, msg: dict) -> None:
        pass

    # -- static views -------------------------------------------------------------------------------
    def _ipython_display_(self) -> None:
        """Show the live widget, and beside it a static copy of the current strips (text/html).

        Exported notebooks (nbconvert --to html, where the widget view renders empty without a
        widget manager) and notebooks reopened without a kernel ("model not found") show the static
        copy; in a live frontend the widget hides it as soon as it renders.
        """
        from IPython.display import display

        display(W.VBox._repr_mimebundle_(self), raw=True)
        display({"text/html": f'<div class="tw-static-fallback">{self._repr_html_()}</div>',
                 "text/plain": f"{type(self).__name__} (static copy)"}, raw=True)

    def _repr_html_(self) -> str:
        """Static fallback (exported notebooks, GitHub): the current strips as an HTML thumbnail grid."""
        return strips_html(self.gallery.strips, title=self.gallery.status)

    def to_figure(self, max_cols: int = 10, max_rows: int = 8):
        """The current view as a matplotlib Figure (one row per strip), for papers and slides."""
        return strips_figure(self.gallery.strips, max_cols=max_cols, max_rows=max_rows)

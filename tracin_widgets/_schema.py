"""The Gallery's synced traits and the fields of what they hold, written once.

`_gallery.Gallery` declares its traits from TRAITS; tests/test_widgets_schema.py checks that the
names static/gallery.js reads (model.get / change: events, and the fields of strips, tiles and the
detail) are exactly these, and that the dicts the galleries build carry these fields.

Example:
    >>> from tracin_widgets._schema import TRAITS, TILE_FIELDS
    >>> TRAITS["active"].doc
    'training index whose detail is open (-1: none)'
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import traitlets


@dataclass(frozen=True)
class Trait:
    """One synced trait: its traitlets type (a factory), default and meaning."""

    make: Callable[[], traitlets.TraitType]
    doc: str


TRAITS: dict[str, Trait] = {
    "strips": Trait(lambda: traitlets.List(traitlets.Dict()), "list of strips (STRIP_FIELDS), drawn top to bottom"),
    "selected": Trait(lambda: traitlets.List(traitlets.Int()), "training indices toggled by clicks, in click order"),
    "active": Trait(lambda: traitlets.Int(-1), "training index whose detail is open (-1: none)"),
    "detail": Trait(lambda: traitlets.Dict(), "what the detail panel shows (DETAIL_FIELDS); {} when closed"),
    "marks": Trait(lambda: traitlets.Dict(value_trait=traitlets.Unicode()),
                   "{str(training index): 'suspicious' | 'fine' | 'relabel'}"),
    "actions": Trait(lambda: traitlets.List(traitlets.Unicode()),
                     "buttons the detail offers: 'query', 'suspicious', 'fine', 'relabel', 'clear'"),
    "status": Trait(lambda: traitlets.Unicode(""), "a line of plain language above the strips"),
    "help": Trait(lambda: traitlets.Unicode(""), "tooltip of the status line: formulas and keys"),
    "counts": Trait(lambda: traitlets.Unicode(""), "review counts shown above the strips ('3 selected, ...')"),
    "history": Trait(lambda: traitlets.List(traitlets.Dict()),
                     "breadcrumbs of visited queries: [{label, current}], oldest first"),
    "scatter": Trait(lambda: traitlets.Dict(), "a brushable scatter (SCATTER_FIELDS); {} for none"),
    "highlight": Trait(lambda: traitlets.List(traitlets.Int()),
                       "training indices drawn on top of the scatter (the current page); sent apart from its points"),
}

STRIP_FIELDS = {
    "key": "unique name (data-key)", "title": "heading", "note": "plain-language caption",
    "help": "tooltip of the heading (the formula)", "scale": "bar length of |score| = scale (per strip)",
    "signed": "bars grow both ways from the middle (False: from the left)",
    "color": "'influence' (green/red by sign) | 'similarity' (blue) | 'self' (orange)",
    "wrap": "tiles wrap onto rows instead of scrolling", "mix": "[[label, count]] label mix bar",
    "tiles": "the tiles (TILE_FIELDS)", "pager": "{page, n_pages} or None: prev / next buttons",
    "confusion": "{labels, counts (rows true, cols predicted), active: [r, c] | None} or None",
}
TILE_FIELDS = {
    "index": "example index", "role": "'train' | 'test'", "pinned": "the query on top (not selectable)",
    "pick": "a test example that becomes the query on click (the test-example browser)",
    "label": "label text", "pred": "predicted label text or None", "score": "bar value or None",
    "sub": "a short line under the label (loss, confidence)", "alt": "accessible description",
    "png": "PNG bytes (a binary buffer) or None", "text": "text snippet when there is no png",
}
DETAIL_FIELDS = {
    "index": "training index", "title": "heading", "alt": "image description", "png": "PNG bytes or None",
    "text": "full text when there is no png", "rows": "[[name, value]] table",
    "bars": "{title, labels, values, color?} a per-checkpoint bar chart ('self': one colour), or None",
    "compare": "{title, png, text} the query beside the clicked example, or None",
    "relabel": "{options: [[value, label]], current} choices for 'relabel', or None",
}
SCATTER_FIELDS = {
    "x": "float32 bytes, one value per training example", "y": "float32 bytes, same length",
    "xlabel": "axis title", "ylabel": "axis title", "brush": "[x0, x1, y0, y1] in data units or None",
}
MESSAGES = {  # what the browser sends with model.send (Gallery.on_action receives it)
    "query": "{action, index}: use a training example as the query",
    "mark": "{action, index, mark, value?}: mark / relabel / clear a training example",
    "test": "{action, index}: a test example becomes the query", "back": "{action}: previous query",
    "history": "{action, at}: jump to breadcrumb `at`", "undo": "{action}: undo the last mark",
    "page": "{action, strip, page}: another page of a paged strip",
    "confusion": "{action, strip, row, col}: filter by true row / predicted col (null: clear)",
    "brush": "{action, x0, x1, y0, y1} or {action} to clear",
}


def trait_types() -> dict[str, traitlets.TraitType]:
    """Fresh traitlets for a class body: {name: TraitType tagged sync=True}."""
    return {name: t.make().tag(sync=True) for name, t in TRAITS.items()}


def check_fields(kind: str, d: dict[str, Any]) -> None:
    """Raise AssertionError if d has a field the schema does not name (used by tests and in debug)."""
    allowed = {"strip": STRIP_FIELDS, "tile": TILE_FIELDS, "detail": DETAIL_FIELDS, "scatter": SCATTER_FIELDS}[kind]
    extra = set(d) - set(allowed)
    assert not extra, f"{kind} has fields {sorted(extra)} not in tracin_widgets._schema"

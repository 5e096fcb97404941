"""The one front-end widget: strips of tiles, rendered by static/gallery.js (plain ES module).

Example:
    >>> g = Gallery(strips=[{"key": "top", "title": "top", "scale": 1.0, "tiles": [tile]}])
    >>> g.on_action(lambda msg: print(msg))        # {"action": "query" | "mark" | ..., "index": i, ...}
    >>> g.selected                                  # [training indices], toggled by clicks

Its synced traits, the fields of strips / tiles / the detail, and the messages the browser sends are
declared once, in _schema.py (a test checks gallery.js against them). PNG bytes travel as binary
buffers (ipywidgets extracts bytes from nested state), never as lists.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import anywidget
import traitlets

from ._schema import trait_types

_STATIC = Path(__file__).parent / "static"

_GalleryTraits = type("_GalleryTraits", (traitlets.HasTraits,), trait_types())   # the schema's traits, as a mixin


class Gallery(anywidget.AnyWidget, _GalleryTraits):
    """Strips of thumbnail tiles; Python fills the traits, the browser only draws and reports clicks."""

    _esm = _STATIC / "gallery.js"
    _css = _STATIC / "gallery.css"

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self._handlers: list[Callable[[dict], None]] = []
        self.on_msg(self._on_msg)

    def on_action(self, handler: Callable[[dict], None]) -> None:
        """Call handler(msg) for each action the browser sends (see _schema.MESSAGES)."""
        self._handlers.append(handler)

    def send_action(self, msg: dict) -> None:
        """Act as if the browser had sent msg (what a click on a detail button does); for code and tests."""
        self._on_msg(self, msg, [])

    def _on_msg(self, _widget: Any, content: Any, _buffers: Any) -> None:
        if not isinstance(content, dict) or "action" not in content:
            return
        for handler in self._handlers:
            handler(content)

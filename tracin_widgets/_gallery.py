"""The one front-end widget: strips of tiles, rendered by static/gallery.js (plain ES module).

Example:
    >>> g = Gallery(strips=[{"key": "top", "title": "top", "scale": 1.0, "tiles": [tile]}])
    >>> g.on_action(lambda msg: print(msg))        # {"action": "query" | "mark", "index": i, ...}
    >>> g.selected                                  # [training indices], toggled by clicks

Traits (all synced): strips: list of {key, title, note, scale, wrap, mix: [[label, count]], tiles};
a tile is {index, role: "train" | "test", label, pred, score, alt, png: bytes | None, text}.
PNG bytes travel as binary buffers (ipywidgets extracts bytes from nested state), never as lists.
selected: list of training indices; active: training index whose detail is open (-1: none);
detail: {index, title, alt, png, text, rows: [[name, value]]}; marks: {"index": "suspicious" | "fine"};
actions: buttons the detail offers ("query", "suspicious", "fine", "clear"); status: a line of text.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import anywidget
import traitlets

_STATIC = Path(__file__).parent / "static"


class Gallery(anywidget.AnyWidget):
    """Strips of thumbnail tiles; Python fills the traits, the browser only draws and reports clicks."""

    _esm = _STATIC / "gallery.js"
    _css = _STATIC / "gallery.css"

    strips = traitlets.List(traitlets.Dict()).tag(sync=True)
    selected = traitlets.List(traitlets.Int()).tag(sync=True)
    active = traitlets.Int(-1).tag(sync=True)
    detail = traitlets.Dict().tag(sync=True)
    marks = traitlets.Dict(value_trait=traitlets.Unicode()).tag(sync=True)
    actions = traitlets.List(traitlets.Unicode()).tag(sync=True)
    status = traitlets.Unicode("").tag(sync=True)

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self._handlers: list[Callable[[dict], None]] = []
        self.on_msg(self._on_msg)

    def on_action(self, handler: Callable[[dict], None]) -> None:
        """Call handler(msg) for each action the browser sends: {"action": "query"|"mark", "index": i, ...}."""
        self._handlers.append(handler)

    def send_action(self, msg: dict) -> None:
        """Act as if the browser had sent msg (what a click on a detail button does); for code and tests."""
        self._on_msg(self, msg, [])

    def _on_msg(self, _widget: Any, content: Any, _buffers: Any) -> None:
        if not isinstance(content, dict) or "action" not in content:
            return
        for handler in self._handlers:
            handler(content)

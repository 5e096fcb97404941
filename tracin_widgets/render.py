"""Turn one example into what a gallery tile shows: a PNG thumbnail, a text snippet or a table row.

Example:
    >>> r = Renderer(class_names=["cat", "dog"])
    >>> view = r.view(torch.rand(3, 32, 32))          # View(png=b"\\x89PNG...", text=None, ...)
    >>> r.view("a review that is far too long ...")     # View(png=None, text="a review that ...")
    >>> r.label(torch.tensor(1))                        # "dog"

Chosen automatically from the example, overridable with `render=`:
  * images: torch / numpy (H, W), (C, H, W) with C in 1, 3, 4, or (H, W, C); uint8 as is, float in
    [0, 1] scaled by 255, any other float range min-max scaled per image; PIL images as they are.
  * text: `str` (or what `render` returns as str): shown escaped (the browser sets textContent; the
    static HTML goes through html.escape), truncated to `max_chars` in tiles, in full in the detail.
  * tabular: 1-D vectors: "name = value" lines, names from `feature_names=` (else x0, x1, ...).
`render(x)` may return a PIL image, an array/tensor (rendered as above), a str, or a dict
{feature name: value} (a table row).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

THUMB_PX = 96      # longest side of a tile thumbnail (small images are sent as they are, scaled by CSS)
DETAIL_PX = 320    # longest side of the detail view image
MAX_ROWS = 200     # table rows kept for the detail view of a 1-D (tabular) example


@dataclass(frozen=True)
class View:
    """What one tile shows: png (PNG bytes) or text (plain, unescaped; the front end escapes it)."""

    png: bytes | None = None
    text: str | None = None
    full_text: str | None = None
    rows: tuple[tuple[str, str], ...] = ()


def _to_numpy(x: Any) -> np.ndarray | None:
    if hasattr(x, "detach") and hasattr(x, "cpu"):        # torch.Tensor without importing torch
        return x.detach().cpu().numpy()
    if isinstance(x, np.ndarray):
        return x
    return None


def _image_array(a: np.ndarray) -> np.ndarray | None:
    """(H, W) or (H, W, C) uint8 for an image-shaped array, else None."""
    if a.ndim == 3:
        if a.shape[0] in (1, 3, 4) and a.shape[-1] not in (1, 3, 4):
            a = np.moveaxis(a, 0, -1)                     # (C, H, W) -> (H, W, C)
        elif a.shape[-1] not in (1, 3, 4):
            return None
        if a.shape[-1] == 1:
            a = a[..., 0]
    if a.ndim not in (2, 3) or min(a.shape[:2]) < 2:
        return None
    if a.dtype == np.uint8:
        return a
    if a.dtype == np.bool_ or not np.issubdtype(a.dtype, np.number):
        a = a.astype(np.float32)
    a = a.astype(np.float32)
    lo, hi = float(np.nanmin(a)), float(np.nanmax(a))
    if lo < 0.0 or hi > 1.0:                              # not in [0, 1]: min-max per image
        a = (a - lo) / (hi - lo if hi > lo else 1.0)
    return (np.clip(np.nan_to_num(a), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def png_bytes(img: Any, max_px: int) -> bytes:
    """PNG of a PIL image or uint8 array, shrunk (never enlarged) so its longest side <= max_px."""
    from PIL import Image

    im = img if isinstance(img, Image.Image) else Image.fromarray(img)
    if im.mode not in ("L", "RGB", "RGBA"):
        im = im.convert("RGB")
    if max(im.size) > max_px:
        im = im.copy()
        im.thumbnail((max_px, max_px), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    im.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _fmt(v: Any) -> str:
    if isinstance(v, (float, np.floating)):
        return f"{float(v):.4g}"
    return str(v)


class Renderer:
    """Examples -> View, labels -> text. Caches nothing itself (the galleries cache Views by index).

    render: optional callable x -> PIL image | array | str | dict, used before the automatic choice.
    class_names: label i is shown as class_names[i]. feature_names: names for 1-D (tabular) examples.
    max_chars: text shown in a tile; max_features: table rows shown in a tile.
    """

    def __init__(self, render: Callable[[Any], Any] | None = None, class_names: Sequence[str] | None = None,
                 feature_names: Sequence[str] | None = None, max_chars: int = 120, max_features: int = 6):
        self.render = render
        self.class_names = list(class_names) if class_names is not None else None
        self.feature_names = list(feature_names) if feature_names is not None else None
        self.max_chars = max_chars
        self.max_features = max_features

    # -- labels -----------------------------------------------------------------------------------
    def label(self, y: Any) -> str:
        """Text for a label: class name for an integer class, the value for a scalar, '' for None."""
        if y is None:
            return ""
        a = _to_numpy(y)
        if a is not None:
            if a.size != 1:
                return "[" + ", ".join(_fmt(v) for v in a.reshape(-1)[:4]) + (", ...]" if a.size > 4 else "]")
            y = a.reshape(()).item()
        if isinstance(y, (int, np.integer)) and not isinstance(y, bool):
            if self.class_names is not None and 0 <= int(y) < len(self.class_names):
                return str(self.class_names[int(y)])
            return str(int(y))
        return _fmt(y)

    # -- examples ---------------------------------------------------------------------------------
    def view(self, x: Any, max_px: int = THUMB_PX) -> View:
        """The tile content of example x (see the module docstring for the rules)."""
        if self.render is not None:
            x = self.render(x)
        return self._auto(x, max_px)

    def _auto(self, x: Any, max_px: int) -> View:
        try:
            from PIL import Image
            if isinstance(x, Image.Image):
                return View(png=png_bytes(x, max_px))
        except ImportError:  # pragma: no cover - pillow is a dependency
            pass
        if isinstance(x, bytes) and x[:8] == b"\x89PNG\r\n\x1a\n":
            return View(png=x)
        if isinstance(x, str):
            return self._text(x)
        if isinstance(x, dict):
            return self._table([(str(k), _fmt(v)) for k, v in x.items()])
        a = _to_numpy(x)
        if a is None:
            a = np.asarray(x) if isinstance(x, (list, tuple, int, float)) else None
        if a is None:
            return self._text(repr(x))
        img = _image_array(a)
        if img is not None:
            return View(png=png_bytes(img, max_px))
        flat = a.reshape(-1)[:MAX_ROWS]
        names = self.feature_names or [f"x{i}" for i in range(flat.size)]
        return self._table([(str(n), _fmt(v)) for n, v in zip(names, flat.tolist())])

    def _text(self, s: str) -> View:
        short = s if len(s) <= self.max_chars else s[: self.max_chars - 1].rstrip() + "\u2026"
        return View(text=short, full_text=s)

    def _table(self, rows: list[tuple[str, str]]) -> View:
        shown = rows[: self.max_features]
        text = "\n".join(f"{k} = {v}" for k, v in shown) + ("\n\u2026" if len(rows) > len(shown) else "")
        return View(text=text, full_text="\n".join(f"{k} = {v}" for k, v in rows), rows=tuple(rows))

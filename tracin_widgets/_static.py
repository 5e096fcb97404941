"""Static views of gallery strips: HTML (for exported notebooks / GitHub) and matplotlib figures.

Example:
    >>> html = strips_html(gallery.strips)            # str: <figure> tiles with data-index and alt text
    >>> fig = strips_figure(gallery.strips)           # matplotlib.figure.Figure, one row per strip

Both read the same strips the widget shows (see _gallery.py for their shape); nothing is recomputed.
"""

from __future__ import annotations

import base64
import html
import io
import textwrap

POS, NEG = "#1a7f37", "#c62828"
COLORS = {"similarity": "#1f5fbf", "self": "#8a4b00"}   # one-colour bars (the widget's light theme)
_CSS = ("<style>.tw-static{font:12px sans-serif}.tw-static .tw-s-row{display:flex;flex-wrap:wrap;gap:4px;margin:2px 0 8px}"
        ".tw-static figure{margin:0;width:78px;text-align:center;border:1px solid #ddd;border-radius:4px;padding:3px}"
        ".tw-static figure:has(pre){width:150px}"
        ".tw-static img{width:64px;height:64px;object-fit:contain;image-rendering:pixelated;background:#000}"
        ".tw-static pre{width:100%;max-height:5.3em;overflow:hidden;font:11px/1.3 sans-serif;white-space:pre-wrap;"
        "word-break:normal;overflow-wrap:break-word;text-align:left;margin:0}"
        ".tw-static figcaption{font-size:10px;line-height:1.25}.tw-static .tw-s-bar{height:4px;background:#eee;position:relative}"
        ".tw-static .tw-s-fill{position:absolute;top:0;bottom:0}</style>")


def _fmt(score: float, signed: bool = True) -> str:
    return f"{score:+.3g}" if signed else f"{score:.3g}"


def _tile_html(t: dict, scale: float, signed: bool = True, color: str = "influence") -> str:
    alt = html.escape(t["alt"], quote=True)
    if t.get("png"):
        body = (f'<img src="data:image/png;base64,{base64.b64encode(t["png"]).decode()}" alt="{alt}">')
    else:
        body = f'<pre role="img" aria-label="{alt}">{html.escape(t.get("text") or "")}</pre>'
    attr = f'data-test-index="{t["index"]}"' if t["role"] == "test" else f'data-index="{t["index"]}"'
    head = ("test #" if t["role"] == "test" else "#") + str(t["index"])
    cap = f"{head} <b>{html.escape(t['label'])}</b>"
    if t.get("pred"):
        cap += f" &rarr; {html.escape(t['pred'])}"
    if t.get("sub"):
        cap += f"<br><span style='color:#555'>{html.escape(t['sub'])}</span>"
    s = t.get("score")
    if s is not None:
        frac = min(1.0, abs(s) / scale) if scale > 0 else 0.0
        half = 50 if signed else 100
        tone = COLORS.get(color, POS if s >= 0 else NEG)
        side = f"left:{100 - half}%;background:{tone}" if s >= 0 or not signed else f"right:50%;background:{tone}"
        cap += (f'<div class="tw-s-bar"><div class="tw-s-fill" style="{side};width:{half * frac:.1f}%"></div></div>'
                f'<span style="color:{tone}">{_fmt(s, signed)}</span>')
    return f"<figure {attr}>{body}<figcaption>{cap}</figcaption></figure>"


def strips_html(strips: list[dict], title: str = "") -> str:
    """A self-contained HTML grid of the strips: thumbnails (data: URLs), alt text, index, label, score."""
    parts = [f'<div class="tw-static">{_CSS}']
    if title:
        parts.append(f"<div><b>{html.escape(title)}</b></div>")
    for s in strips:
        note = f" <span style='color:#666'>{html.escape(s.get('note', ''))}</span>" if s.get("note") else ""
        parts.append(f"<div><b>{html.escape(s['title'])}</b>{note}</div>")
        scale = float(s.get("scale") or 0.0)
        tiles = "".join(_tile_html(t, scale, s.get("signed", True), s.get("color", "influence")) for t in s["tiles"])
        parts.append(f'<div class="tw-s-row">{tiles or "<i>nothing to show</i>"}</div>')
    parts.append("</div>")
    return "".join(parts)


def strips_figure(strips: list[dict], max_cols: int = 10, max_rows: int = 8, tile_inches: float = 1.2):
    """matplotlib Figure: one row per strip (up to max_rows), up to max_cols tiles, captions coloured by sign."""
    from matplotlib.figure import Figure
    from PIL import Image

    rows = [s for s in strips if s["tiles"]][:max_rows] or strips[:1]
    ncols = max(1, min(max_cols, max((len(s["tiles"]) for s in rows), default=1)))
    fig = Figure(figsize=(tile_inches * ncols + 1.2, (tile_inches + 0.45) * max(1, len(rows))), layout="constrained")
    axes = fig.subplots(max(1, len(rows)), ncols, squeeze=False)
    for r, s in enumerate(rows):
        for c in range(ncols):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(textwrap.fill(s["title"], 16), fontsize=8)
            if c >= len(s["tiles"]):
                ax.set_axis_off()
                continue
            t = s["tiles"][c]
            if t.get("png"):
                im = Image.open(io.BytesIO(t["png"]))
                ax.imshow(im, cmap="gray" if im.mode == "L" else None, interpolation="nearest")
            else:
                ax.text(0.02, 0.98, textwrap.fill(t.get("text") or "", 18), va="top", ha="left",
                        fontsize=6, family="monospace", transform=ax.transAxes)
            head = ("test #" if t["role"] == "test" else "#") + f"{t['index']} {t['label']}"
            score = t.get("score")
            color = "black" if score is None else (POS if score >= 0 else NEG)
            ax.set_title(head + ("" if score is None else f"\n{_fmt(score)}"), fontsize=7, color=color)
            for spine in ax.spines.values():
                spine.set_edgecolor(color)
    return fig

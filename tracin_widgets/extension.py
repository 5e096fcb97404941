"""`%load_ext tracin_widgets`: rich display of tracin results and the `%tracin` line magic.

Example (in a notebook):
    >>> %load_ext tracin_widgets
    >>> %tracin use split.train split.test     # the data that result indices refer to
    >>> index.top_k(split.test, k=6)[0]        # TopK -> proponent / opponent gallery
    >>> %tracin outliers index                 # self-influence as a ranked gallery
    >>> %tracin help

What is registered (text/html formatters, by type name, so nothing is imported until a result of
that type is displayed): tracin_engine.store.topk.TopK and Neighbors (a gallery: thumbnails when `%tracin use`
named the data, else a ranked table of indices and scores), tracin_engine.methods.index.GradientIndex (a summary
card), tracin_engine.analysis.clustering.Clusters (sizes and representatives). A self-influence result is a plain
torch.Tensor, which is not registered (that would change how every tensor displays); `%tracin outliers`
shows it as a ranked gallery instead. Loading twice is harmless; importing this module imports neither
torch nor the widgets.
"""

from __future__ import annotations

import html
import shlex
from typing import Any

from ._engine import RESULT_TYPES

_TYPES = {key: f"_{kind}_html" for key, kind in RESULT_TYPES.items()}  # (module, class) -> formatter in this module
MAX_ROWS = 5  # test examples shown per TopK before "... more"
_context: dict[str, Any] = {"train": None, "test": None, "renderer": None, "options": {}}
USE_OPTIONS = ("render", "class_names", "feature_names", "max_chars", "text", "test_text")

HELP = """%tracin: shortcuts for TracIn influence in notebooks.

  %tracin help                          this text
  %tracin use TRAIN [TEST] [render=f class_names=names feature_names=names text=texts test_text=texts]
                                        data the result indices refer to (TopK shows thumbnails);
                                        text= / test_text=: the original text of each example
  %tracin use off                       forget it (TopK shows a table of indices and scores)
  %tracin info INDEX                    checkpoints, learning rates, feature size, storage
  %tracin show RESULT [ROW]             row ROW of a TopK (default 0) with its test example's thumbnail
  %tracin explore INDEX [TRAIN TEST] [k=8]    InfluenceExplorer: a test example -> proponents / opponents
  %tracin outliers INDEX [TRAIN] [page_size=48]   SelfInfluenceGallery: highest self-influence first
  %tracin clusters INDEX [TRAIN] [n=8]        ClusterGallery: TracIn clusters as strips
  %tracin status                        what is registered, versions, device

Arguments are Python expressions in the notebook namespace (no spaces inside one); key=value
options go to the widget. TRAIN / TEST default to the data given with `%tracin use`.
Positive scores are proponents (training on them lowered the test loss), negative are opponents."""


# -- IPython entry points ------------------------------------------------------------------------
def load_ipython_extension(ip) -> None:
    """Register the display formatters and the %tracin magic (idempotent)."""
    formatter = ip.display_formatter.formatters["text/html"]
    for (module, name), func in _TYPES.items():
        formatter.for_type_by_name(module, name, globals()[func])
    ip.register_magic_function(_make_magic(ip), magic_kind="line", magic_name="tracin")


def unload_ipython_extension(ip) -> None:
    """Remove what load_ipython_extension registered (the magic stays, as IPython has no unregister)."""
    formatter = ip.display_formatter.formatters["text/html"]
    funcs = {globals()[f] for f in _TYPES.values()}
    for key, func in list(formatter.deferred_printers.items()):
        if func in funcs:
            del formatter.deferred_printers[key]
    for cls, func in list(formatter.type_printers.items()):
        if func in funcs:
            del formatter.type_printers[cls]
    _context.update(train=None, test=None, renderer=None, options={})


# -- the magic -------------------------------------------------------------------------------------
class _Usage(Exception):
    pass


def _make_magic(ip):
    def tracin(line: str):
        """%tracin SUBCOMMAND ...: see `%tracin help`."""
        from IPython.core.error import UsageError

        try:
            return run_command(line, ip.user_ns)
        except _Usage as exc:
            raise UsageError(f"{exc}\n\n{HELP}") from None

    tracin.__doc__ = HELP
    return tracin


def _parse(args: list[str], ns: dict) -> tuple[list[Any], dict[str, Any]]:
    import ast

    pos, opts = [], {}
    for arg in args:
        if "=" in arg and arg.split("=", 1)[0].isidentifier():
            key, value = arg.split("=", 1)
            try:
                opts[key] = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                opts[key] = _eval(value, ns)
        else:
            pos.append(_eval(arg, ns))
    return pos, opts


def _eval(expr: str, ns: dict) -> Any:
    try:
        return eval(expr, ns)  # noqa: S307 - the user's own notebook namespace
    except Exception as exc:  # noqa: BLE001
        raise _Usage(f"could not evaluate {expr!r}: {type(exc).__name__}: {exc}") from None


def _data(pos: list[Any], i: int, role: str) -> Any:
    if len(pos) > i:
        return pos[i]
    if _context[role] is None:
        raise _Usage(f"no {role} data given; pass it after the index or run `%tracin use TRAIN TEST` first.")
    return _context[role]


def run_command(line: str, ns: dict) -> Any:
    """Carry out one %tracin line; returns what the cell should display (or None)."""
    words = shlex.split(line, posix=False)  # keep quotes: arguments are Python expressions
    cmd, args = (words[0].lower(), words[1:]) if words else ("help", [])
    if cmd in ("help", "-h", "--help", "?"):
        print(HELP)
        return None
    if cmd == "use":
        if args == ["off"]:
            _context.update(train=None, test=None, renderer=None, options={})
            print("tracin: data forgotten; results display as tables")
            return None
        pos, opts = _parse(args, ns)
        if not 1 <= len(pos) <= 2:
            raise _Usage("`%tracin use` takes TRAIN and optionally TEST.")
        unknown = set(opts) - set(USE_OPTIONS)
        if unknown:
            raise _Usage(f"unknown option(s) {sorted(unknown)} for `%tracin use`; known: {list(USE_OPTIONS)}.")
        from .render import Renderer

        renderer = Renderer(**{k: v for k, v in opts.items() if k not in ("text", "test_text")})
        _context.update(train=pos[0], test=pos[1] if len(pos) > 1 else None, renderer=renderer, options=opts)
        print(f"tracin: results show thumbnails of {len(_source(pos[0]))} training examples")
        return None
    if cmd == "status":
        return _status()
    if cmd not in ("info", "explore", "outliers", "clusters", "show"):
        raise _Usage(f"unknown subcommand {cmd!r}.")
    pos, opts = _parse(args, ns)
    if cmd == "show":
        return _show(pos)
    if not pos:
        raise _Usage(f"`%tracin {cmd}` needs an index: `%tracin {cmd} index`.")
    index = pos[0]
    if not all(hasattr(index, a) for a in ("n_train", "top_k", "self_influence")):
        raise _Usage(f"the first argument must be an index (tracin.index(...), a SOURCE index or an ensemble), "
                     f"got {type(index).__name__}.")
    if cmd == "info":
        print(_index_text(index))
        return None
    train = _data(pos, 1, "train")
    import tracin_widgets as tw

    shared = {k: v for k, v in _context["options"].items() if k in ("render", "class_names", "feature_names", "text")}
    if cmd == "explore":
        known = {"k", "test_index", "target", "embeddings", "browse", "methods", "predictions"}
        _check_opts(cmd, opts, known)
        if "test_text" in _context["options"]:
            shared["test_text"] = _context["options"]["test_text"]
        return tw.InfluenceExplorer(index, train, _data(pos, 2, "test"), **{**shared, **opts})
    if cmd == "outliers":
        if "k" in opts:                           # `k=` (tiles per page) kept as another name for page_size
            opts["page_size"] = opts.pop("k")
        _check_opts(cmd, opts, {"page_size", "space", "weights", "marks_file", "scatter", "predictions"})
        return tw.SelfInfluenceGallery(index, train, **{**shared, **opts})
    _check_opts(cmd, opts, {"n", "per_cluster", "predictions"})
    return tw.ClusterGallery(index, train, n_clusters=opts.pop("n", 8), **{**shared, **opts})


def _check_opts(cmd: str, opts: dict, known: set[str]) -> None:
    unknown = set(opts) - known - {"render", "class_names", "feature_names", "text"}
    if unknown:
        raise _Usage(f"unknown option(s) {sorted(unknown)} for `%tracin {cmd}`; known: {sorted(known)}.")


def _show(pos: list[Any]):
    """`%tracin show RESULT [ROW]`: one row of a TopK, headed by that test example's thumbnail."""
    from IPython.display import HTML

    if not pos or not hasattr(pos[0], "proponents"):
        raise _Usage("`%tracin show` needs a TopK result: `%tracin show result 3`.")
    result, row = pos[0], int(pos[1]) if len(pos) > 1 else 0
    n = len(result.proponents.indices)
    if not 0 <= row < n:
        raise _Usage(f"row {row} is out of range; the result has {n} test example(s) (0..{n - 1}).")
    return HTML(_topk_html(result[row], rows=[row]))


def _status() -> None:
    import sys

    lines = [f"train data: {_describe(_context['train'])}", f"test data: {_describe(_context['test'])}"]
    torch = sys.modules.get("torch")
    if torch is not None:
        lines.append(f"torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}")
    lines.append("formatters: " + ", ".join(n for _, n in _TYPES))
    print("\n".join(lines))


def _describe(data: Any) -> str:
    return "not set" if data is None else f"{type(data).__name__} with {len(_source(data))} examples"


def _source(data: Any):
    from ._engine import as_source

    return as_source(data)


# -- formatters ------------------------------------------------------------------------------------
_CSS = ("<style>.tracin-x{font:12px sans-serif}.tracin-x table{border-collapse:collapse}"
        ".tracin-x td,.tracin-x th{padding:2px 6px;text-align:right}"
        ".tracin-x figure{display:inline-block;margin:2px;text-align:center;width:76px}"
        ".tracin-x img{image-rendering:pixelated;width:64px;height:64px;border:1px solid #ccc;margin:1px}"
        ".tracin-x figcaption{font-size:10px;line-height:1.2}.tracin-x .pro{color:#1a7f37}"
        ".tracin-x .opp{color:#c62828}.tracin-x .row{margin:4px 0}"
        ".tracin-x pre.tracin-text{white-space:pre-wrap;width:72px;height:64px;overflow:hidden;"
        "font-size:9px;margin:0;border:1px solid #ccc;text-align:left}</style>")


def _tiles(indices, scores, kind: str) -> str:
    train = _context["train"]
    cells = []
    for i, s in zip(indices.tolist(), scores.tolist()):
        caption = f"#{i}<br><span class='{kind}'>{s:+.3g}</span>"
        if train is not None:
            thumb, label = _thumbnail(train, i)
            caption = f"#{i} · {html.escape(label)}<br><span class='{kind}'>{s:+.3g}</span>"
            cells.append(f"<figure class='tracin-tile'>{thumb}<figcaption>{caption}</figcaption></figure>")
        else:
            cells.append(f"<td>{caption}</td>")
    if train is not None:
        return "".join(cells)
    return "<table><tr>" + "".join(cells) + "</tr></table>"


def _neighbors_html(nb) -> str:
    rows = []
    for r in range(min(len(nb.indices), MAX_ROWS)):
        kind = "pro" if bool((nb.scores[r] >= 0).all()) else "opp"
        rows.append(f"<div class='row'>{_tiles(nb.indices[r], nb.scores[r], kind)}</div>")
    more = len(nb.indices) - MAX_ROWS
    return (f"<div class='tracin-x tracin-neighbors'>{_CSS}{''.join(rows)}"
            f"{f'<div>... {more} more rows</div>' if more > 0 else ''}</div>")


def _topk_html(topk, rows: list[int] | None = None) -> str:
    """rows: the test example of each row (known for a full result, or given by `%tracin show`)."""
    pro, opp = topk.proponents, topk.opponents
    n, k = pro.indices.shape
    test = _context["test"]
    if rows is None and test is not None and n == len(_source(test)):
        rows = list(range(n))
    blocks = []
    for r in range(min(n, MAX_ROWS)):
        head = f"test example {r}" if n > 1 else "test example"
        if n == 1 and rows is None:
            head = "one test example (which one is not known here: `%tracin show result ROW` shows it with its image)"
        if test is not None and rows is not None:
            thumb, label = _thumbnail(test, rows[r], role="test")
            head = f"{thumb} test #{rows[r]} · {html.escape(label)}"
        pro_tiles = _tiles(pro.indices[r], pro.scores[r], "pro")
        opp_tiles = _tiles(opp.indices[r], opp.scores[r], "opp")
        blocks.append(f"<div class='tracin-query'><b>{head}</b>"
                      f"<div class='row tracin-proponents'><b class='pro'>proponents</b> {pro_tiles}</div>"
                      f"<div class='row tracin-opponents'><b class='opp'>opponents</b> {opp_tiles}</div></div>")
    more = f"<div>... {n - MAX_ROWS} more test examples (index the result: result[i])</div>" if n > MAX_ROWS else ""
    return (f"<div class='tracin-x tracin-topk'>{_CSS}<div>TopK: {n} test example(s), k={k}</div>"
            f"{''.join(blocks)}{more}</div>")


def _index_text(index) -> str:
    from . import _engine as eng

    lrs = ", ".join(f"{v:g}" for v in index.tracin.checkpoints.learning_rates.tolist())
    where = eng.store_path(index)
    dim = getattr(getattr(index, "store", None), "dim", None)
    return (f"{type(index).__name__}: {index.n_train} training examples x {len(index.tracin.checkpoints)} checkpoints\n"
            f"  learning rates: [{lrs}]\n  feature size per example and checkpoint: {dim if dim is not None else 'n/a'} "
            f"(proj_dim={index.tracin.proj_dim}, parameters={index.tracin.num_params})\n  stored in: {where or 'memory'}")


def _index_html(index) -> str:
    first, *lines = _index_text(index).splitlines()
    rows = "".join(f"<tr><th>{html.escape(k.strip())}</th><td style='text-align:left'>{html.escape(v.strip())}</td></tr>"
                   for k, v in (line.split(":", 1) for line in lines))
    return f"<div class='tracin-x tracin-index'>{_CSS}<b>{html.escape(first)}</b><table>{rows}</table></div>"


def _clusters_html(clusters) -> str:
    """One row per cluster: size, label mix (with `%tracin use` data), representatives."""
    train = _context["train"]
    labels = _source(train).labels() if train is not None else None
    renderer = _context.get("renderer")
    rows = []
    for c, size in enumerate(int(s) for s in clusters.sizes):
        reps = clusters.representatives[c]
        reps = [int(r) for r in (reps.reshape(-1).tolist() if hasattr(reps, "reshape") else [reps])][:4]
        mix = ""
        if labels is not None and labels.dim() == 1 and not labels.is_floating_point():
            counts = labels[clusters.labels == c].bincount()
            top = counts.argsort(descending=True)[:3]
            mix = ", ".join(f"{html.escape(renderer.label(int(t)) if renderer else str(int(t)))}: "
                            f"{int(counts[t]) / max(size, 1):.0%}" for t in top if counts[t] > 0)
        shown = "".join(_thumbnail(train, r)[0] for r in reps) if train is not None else \
            ", ".join(f"#{r}" for r in reps)
        rows.append(f"<tr><td>{c}</td><td>{size}</td><td style='text-align:left'>{mix}</td>"
                    f"<td style='text-align:left'>{shown}</td></tr>")
    head = "<tr><th>cluster</th><th>size</th><th>labels</th><th>representatives</th></tr>"
    return (f"<div class='tracin-x tracin-clusters'>{_CSS}<div>{len(rows)} TracIn clusters "
            f"({html.escape(str(getattr(clusters, 'method', '')))})</div><table>{head}{''.join(rows)}</table></div>")


def _thumbnail(data: Any, i: int, role: str = "train") -> tuple[str, str]:
    """(an <img> or <pre> snippet, the label text) for example i of data, drawn by render.Renderer
    (or the original text given with `%tracin use ... text=` / `test_text=`)."""
    import base64

    from .render import Renderer

    renderer = _context.get("renderer") or Renderer()
    x, y = _source(data).example(int(i))
    texts = _context["options"].get("text" if role == "train" else "test_text")
    if texts is not None:
        x = texts(int(i)) if callable(texts) else texts[int(i)]
    view = renderer.view(x)
    if view.png is not None:
        return f"<img src='data:image/png;base64,{base64.b64encode(view.png).decode()}'>", renderer.label(y)
    return f"<pre class='tracin-text'>{html.escape(view.text or '')}</pre>", renderer.label(y)

"""Widget responsiveness (issue 4): changing the query on a cached index of 50k examples.

Prints one JSON object. Run: .venv/bin/python benchmarks/bench_widgets.py [--n-train 50000] [--queries 20]
    [--proj-dim 512] [--threads 1]
Setup (not timed as responsiveness): the 1497 digits training images tiled with noise to n_train
examples, DigitsCNN(width=8, hidden=32) trained on the digits, 2 checkpoints, the index featurized once
(exact rows: 1900 numbers per example and checkpoint; or proj_dim numbers with --proj-dim).
Measured from Python, the time from a trait set to the new tiles (PNG thumbnails, labels, predictions,
scores) being in the Gallery's state and handed to the comm (ipywidgets serializes and sends
synchronously inside the set; without a kernel the comm is a no-op, so the browser's decode is not in it):
  engine_top_k_ms          index.top_k(one test example, k=8) alone (gradients + scan of all rows):
                           the engine's share of a cold query, timed on the same queries first
  explorer_query_cold_ms   ex.test_index = j for a never-seen test example: its gradients at every
                           checkpoint, top-k over n_train, new thumbnails and predictions
  explorer_query_warm_ms   the same query again later (query result and thumbnails cached)
  explorer_train_query_ms  a shown training example becomes the query (the Alt+click action)
  explorer_detail_ms       open a tile's detail (per-checkpoint scores, bar chart, the query beside it)
  explorer_browse_click_ms a test example in the test-example browser clicked (it becomes the query; cold)
  explorer_confusion_ms    a confusion-matrix cell clicked (the browser filtered to it)
  explorer_back_ms         the back action (a query seen before)
  outliers_mark_ms         s on the open tile: mark, save, the next tile's detail opens (auto-advance)
  outliers_brush_ms        a box brushed on the scatter (ranking restricted to it)
  outliers_page_cold_ms    SelfInfluenceGallery: next page (48 new thumbnails)
  outliers_page_warm_ms    back to a page already seen
  outliers_filter_ms       label filter changed (ranking restricted to one label)
Each is reported as median / p95 / max over the repetitions.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

import tracin_engine as te
import tracin_widgets as tw
from tracin_engine.examples import DigitsCNN, load_digits_split, train


def stats(times_s: list[float]) -> dict:
    ms = sorted(1000 * t for t in times_s)
    p95 = ms[min(len(ms) - 1, int(round(0.95 * (len(ms) - 1))))]
    return {"median": round(statistics.median(ms), 1), "p95": round(p95, 1), "max": round(ms[-1], 1), "n": len(ms)}


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n-train", type=int, default=50_000)
    ap.add_argument("--queries", type=int, default=20)
    ap.add_argument("--proj-dim", type=int, default=0, help="TracIn proj_dim (0: exact gradient rows)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    data = load_digits_split(seed=0)
    X, y = data.train
    reps = -(-args.n_train // len(y))
    Xb = (X.repeat(reps, 1, 1, 1)[: args.n_train] + 0.05 * torch.rand(reps * len(y), *X.shape[1:])[: args.n_train]).clamp(0, 1)
    big = (Xb, y.repeat(reps)[: args.n_train])
    model = DigitsCNN()
    run = tempfile.mkdtemp(prefix="bench_widgets_")
    train(model, data.train, run, epochs=6, n_checkpoints=2, lr=0.1)
    tracin = te.TracIn(model, te.Checkpoints.from_dir(run), loss_fn=F.cross_entropy, proj_dim=args.proj_dim or None)
    t0 = time.perf_counter()
    index = tracin.index(big, progress=False)
    featurize_s = time.perf_counter() - t0

    order = torch.randperm(len(data.test[1]), generator=torch.Generator().manual_seed(1))[1: args.queries + 1].tolist()
    Xt, yt = data.test
    engine = [timed(lambda j=j: index.top_k((Xt[j:j + 1], yt[j:j + 1]), k=8)) for j in order]

    t0 = time.perf_counter()
    ex = tw.InfluenceExplorer(index, big, data.test, k=8, class_names=data.class_names)
    explorer_open_s = time.perf_counter() - t0
    cold = [timed(lambda j=j: setattr(ex, "test_index", j)) for j in order]
    warm = [timed(lambda j=j: setattr(ex, "test_index", j)) for j in order]
    shown = [t["index"] for s in ex.gallery.strips if s["key"] == "proponents" for t in s["tiles"]]
    train_q = [timed(lambda i=i: ex.gallery.send_action({"action": "query", "index": i})) for i in shown[:5]]
    ex.test_index = order[0]
    detail = [timed(lambda i=i: setattr(ex.gallery, "active", i)) for i in shown]
    ex.gallery.active = -1
    ex.test_sort = "loss"                                     # other test examples than the ones timed above
    picks = [j for j in ex.browsed().tolist() if j not in order][:args.queries]
    browse = [timed(lambda j=j: ex.gallery.send_action({"action": "test", "index": j})) for j in picks]
    cm = ex.outcomes.confusion()
    cells = [(r, c) for r in range(len(cm)) for c in range(len(cm)) if cm[r, c] > 0][:args.queries]
    confusion = [timed(lambda r=r, c=c: ex.gallery.send_action({"action": "confusion", "strip": "tests", "row": r,
                                                                    "col": c})) for r, c in cells]
    back = [timed(lambda: ex.gallery.send_action({"action": "back"})) for _ in range(min(10, len(picks) - 1))]
    assert ex.last_error is None, ex.last_error

    t0 = time.perf_counter()
    g = tw.SelfInfluenceGallery(index, big, page_size=48, class_names=data.class_names)
    outliers_open_s = time.perf_counter() - t0
    pages = list(range(1, args.queries + 1))
    page_cold = [timed(lambda p=p: setattr(g, "page", p)) for p in pages]
    page_warm = [timed(lambda p=p: setattr(g, "page", p)) for p in pages]
    filt = [timed(lambda v=v: setattr(g, "label_filter", v)) for v in list(range(10)) + [None]]
    g.page = 0
    g.gallery.active = int(g.page_indices()[0])

    def mark_open() -> None:
        g.gallery.send_action({"action": "mark", "index": g.gallery.active, "mark": "suspicious", "advance": True})
    marks = [timed(mark_open) for _ in range(args.queries)]
    x, y = g.scatter_coords()
    qx, qy = torch.quantile(x.float(), torch.linspace(0.5, 0.95, args.queries)), torch.quantile(y.float(), 0.5)
    brush = [timed(lambda a=a: setattr(g, "brush", (float(a), float(x.max()), float(qy), float(y.max())))) for a in qx]
    assert g.last_error is None, g.last_error

    print(json.dumps({
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads; "
                   "2-core CPU container, no GPU",
        "torch": torch.__version__, "n_train": args.n_train, "checkpoints": len(tracin.checkpoints),
        "feature_dim": index.store.dim, "proj_dim": args.proj_dim or None, "k": 8, "featurize_s": round(featurize_s, 1),
        "explorer_open_s": round(explorer_open_s, 2), "outliers_open_s": round(outliers_open_s, 2),
        "engine_top_k_ms": stats(engine), "explorer_query_cold_ms": stats(cold), "explorer_query_warm_ms": stats(warm),
        "explorer_train_query_ms": stats(train_q), "explorer_detail_ms": stats(detail),
        "explorer_browse_click_ms": stats(browse), "explorer_confusion_ms": stats(confusion),
        "explorer_back_ms": stats(back), "outliers_mark_ms": stats(marks), "outliers_brush_ms": stats(brush),
        "outliers_page_cold_ms": stats(page_cold), "outliers_page_warm_ms": stats(page_warm),
        "outliers_filter_ms": stats(filt),
    }, indent=1))


if __name__ == "__main__":
    main()

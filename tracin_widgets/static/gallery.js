// tracin gallery front end: renders what Python sends; owns no data.
// The traits it reads, the fields of strips / tiles / the detail / the scatter, and the messages it
// sends are declared once in tracin_widgets/_schema.py (a test checks this file against it).
// Mouse: click a training tile = toggle it in `selected` and open its detail; Alt+click = use it as the
// query; click a test tile of the browser = make it the query. Keys on a focused tile: arrows move,
// Enter/Space = click, Escape = close the detail, q = use as query, s / f = mark suspicious / fine,
// a = relabel to the prediction, u = undo, b = back to the previous query.

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined && text !== null) e.textContent = String(text);
  return e;
}

function fmtScore(v, signed = true) {
  if (v === null || v === undefined) return "";
  const a = Math.abs(v);
  const t = a !== 0 && (a < 1e-3 || a >= 1e4) ? v.toExponential(2) : v.toPrecision(3);
  return (signed && v > 0 ? "+" : "") + t;
}

function floats(view) {   // float32 bytes (DataView / ArrayBuffer) -> Float32Array (copied: offsets may be unaligned)
  if (!view) return new Float32Array(0);
  const buf = view.buffer ? view.buffer.slice(view.byteOffset, view.byteOffset + view.byteLength) : view;
  return new Float32Array(buf);
}

function render({ model, el: host }) {
  const root = el("div", "tw-gallery");
  root.setAttribute("data-lm-suppress-shortcuts", "true");  // keep JupyterLab's keys off our tiles
  root.setAttribute("data-p-suppress-shortcuts", "true");
  const status = el("div", "tw-status");
  const counts = el("div", "tw-counts");
  const history = el("nav", "tw-history");
  history.setAttribute("aria-label", "query history");
  const plot = el("div", "tw-scatter");
  const body = el("div", "tw-strips");
  const detail = el("div", "tw-detail");
  detail.hidden = true;
  root.append(status, counts, history, plot, body, detail);
  host.appendChild(root);

  let urls = [];
  let detailUrls = [];
  let focusKey = null;   // "stripKey:role:index" of the tile that had focus, restored after a redraw
  let pending = 0;       // requestAnimationFrame id of a scheduled redraw (several trait changes -> one draw)

  const pngUrl = (view, list) => {
    const u = URL.createObjectURL(new Blob([view], { type: "image/png" }));
    list.push(u);
    return u;
  };
  const revokeLater = (list) => setTimeout(() => list.forEach((u) => URL.revokeObjectURL(u)), 4000);
  const actions = () => model.get("actions") || [];
  const send = (msg) => model.send(msg);
  const setActive = (i) => { model.set("active", i); model.save_changes(); };

  function toggle(index) {
    const sel = model.get("selected").slice();
    const at = sel.indexOf(index);
    if (at >= 0) sel.splice(at, 1); else sel.push(index);
    model.set("selected", sel);
    model.set("active", index);
    model.save_changes();
  }

  function activate(tile, event) {
    if (tile.dataset.pick === "1") { send({ action: "test", index: Number(tile.dataset.testIndex) }); return; }
    if (tile.dataset.index === undefined) return;           // the pinned query is not a training tile
    const index = Number(tile.dataset.index);
    if (event && event.altKey && actions().includes("query")) { send({ action: "query", index }); return; }
    toggle(index);
  }

  function thumb(t, cls) {
    if (t.png) {
      const img = el("img", cls);
      img.src = pngUrl(t.png, urls);
      img.alt = t.alt || "";
      img.draggable = false;
      return img;
    }
    const pre = el("div", "tw-snippet", t.text || "");
    pre.setAttribute("role", "img");
    pre.setAttribute("aria-label", t.alt || "");
    return pre;
  }

  function tileNode(strip, t) {
    const fig = el("figure", "tw-tile");
    if (t.pinned) {                        // the query on top: not a selectable training tile
      fig.classList.add("tw-query");
      fig.dataset[t.role === "test" ? "testIndex" : "queryIndex"] = String(t.index);
    } else if (t.pick) {                   // the test-example browser: a click makes it the query
      fig.classList.add("tw-pick");
      fig.dataset.testIndex = String(t.index);
      fig.dataset.pick = "1";
    } else fig.dataset.index = String(t.index);
    if (!t.png) fig.classList.add("tw-text-tile");
    fig.dataset.key = `${strip.key}:${t.role}:${t.index}`;
    fig.tabIndex = 0;
    fig.setAttribute("role", "button");
    fig.appendChild(thumb(t, "tw-thumb"));
    const cap = el("figcaption", "tw-caption");
    cap.append(el("span", "tw-idx", (t.role === "test" ? "test #" : "#") + t.index), el("span", "tw-label", t.label));
    if (t.pred !== null && t.pred !== undefined && t.pred !== "") {
      const p = el("span", "tw-pred", `pred ${t.pred}`);
      if (t.pred !== t.label) p.classList.add("tw-wrong");
      cap.appendChild(p);
    }
    fig.appendChild(cap);
    if (t.sub) fig.appendChild(el("div", "tw-sub", t.sub));
    let tip = t.alt || "";
    if (t.score !== null && t.score !== undefined) {
      const color = strip.color || "influence";
      const unsigned = strip.signed === false;
      const bar = el("div", "tw-bar" + (unsigned ? " tw-unsigned" : ""));
      const kind = color === "influence" ? (t.score >= 0 ? "tw-pos" : "tw-neg") : `tw-${color}`;
      const fill = el("div", `tw-fill ${kind}`);
      const frac = strip.scale > 0 ? Math.min(1, Math.abs(t.score) / strip.scale) : 0;
      fill.style.width = `${((unsigned ? 100 : 50) * frac).toFixed(1)}%`;
      bar.appendChild(fill);
      fig.append(bar, el("span", `tw-score ${kind}-text`, fmtScore(t.score, !unsigned)));
      tip += `, score ${fmtScore(t.score, !unsigned)}`;
    }
    if (t.sub) tip += `, ${t.sub}`;
    fig.title = tip;
    fig.appendChild(el("span", "tw-mark"));
    fig.addEventListener("click", (e) => { focusKey = fig.dataset.key; activate(fig, e); });
    fig.addEventListener("focus", () => { focusKey = fig.dataset.key; });
    return fig;
  }

  function mixNode(mix) {
    const total = mix.reduce((a, m) => a + m[1], 0) || 1;
    const bar = el("div", "tw-mix");
    mix.forEach(([label, n], i) => {
      const seg = el("span", `tw-mix-seg tw-c${i % 8}`, n / total > 0.12 ? label : "");
      seg.style.flexGrow = String(n);
      seg.title = `${label}: ${n} (${Math.round((100 * n) / total)}%)`;
      bar.appendChild(seg);
    });
    return bar;
  }

  function confusionNode(strip, cm) {   // rows: true label, columns: predicted; a click filters the strip
    const table = el("table", "tw-confusion");
    table.setAttribute("aria-label", "confusion matrix: rows true label, columns predicted");
    const act = cm.active || [null, null];
    const pick = (row, col) => send({ action: "confusion", strip: strip.key, row, col });
    const head = el("tr");
    const corner = el("th", "tw-cm-corner", "true \\ pred");
    corner.title = "show all test examples";
    corner.addEventListener("click", () => pick(null, null));
    head.appendChild(corner);
    cm.labels.forEach((lab, c) => {
      const th = el("th", "tw-cm-col" + (act[1] === c && act[0] === null ? " tw-cm-on" : ""), lab);
      th.title = `predicted ${lab}`;
      th.addEventListener("click", () => pick(null, c));
      head.appendChild(th);
    });
    table.appendChild(head);
    const max = Math.max(1, ...cm.counts.flatMap((r, i) => r.filter((_, j) => j !== i)));
    cm.counts.forEach((row, r) => {
      const tr = el("tr");
      const th = el("th", "tw-cm-row" + (act[0] === r && act[1] === null ? " tw-cm-on" : ""), cm.labels[r]);
      th.title = `true ${cm.labels[r]}`;
      th.addEventListener("click", () => pick(r, null));
      tr.appendChild(th);
      row.forEach((n, c) => {
        const td = el("td", "tw-cm-cell" + (r === c ? " tw-cm-diag" : n ? " tw-cm-err" : ""), n || "");
        td.dataset.row = String(r);
        td.dataset.col = String(c);
        if (r !== c && n) td.style.setProperty("--tw-cm-a", (0.15 + 0.85 * n / max).toFixed(2));
        if (act[0] === r && act[1] === c) td.classList.add("tw-cm-on");
        td.title = `${n} test example(s): true ${cm.labels[r]}, predicted ${cm.labels[c]}`;
        td.addEventListener("click", () => pick(r, c));
        tr.appendChild(td);
      });
      table.appendChild(tr);
    });
    return table;
  }

  function pagerNode(strip, p) {
    const nav = el("div", "tw-pager");
    const prev = el("button", "tw-btn tw-page-prev", "\u25c0 prev");
    const next = el("button", "tw-btn tw-page-next", "next \u25b6");
    prev.disabled = p.page <= 0;
    next.disabled = p.page >= p.n_pages - 1;
    prev.addEventListener("click", () => send({ action: "page", strip: strip.key, page: p.page - 1 }));
    next.addEventListener("click", () => send({ action: "page", strip: strip.key, page: p.page + 1 }));
    nav.append(prev, el("span", "tw-page-info", `page ${p.page + 1} of ${p.n_pages}`), next);
    return nav;
  }

  function drawHistory() {
    const h = model.get("history") || [];
    history.replaceChildren();
    history.hidden = h.length === 0;
    if (!h.length) return;
    const cur = h.findIndex((c) => c.current);
    const back = el("button", "tw-btn tw-back", "\u2190 back");
    back.title = "previous query (b)";
    back.disabled = cur <= 0;
    back.addEventListener("click", () => send({ action: "back" }));
    history.appendChild(back);
    h.forEach((c, i) => {
      const b = el("button", "tw-crumb" + (c.current ? " tw-current" : ""), c.label);
      if (c.current) b.setAttribute("aria-current", "true");
      b.addEventListener("click", () => send({ action: "history", at: i }));
      history.appendChild(b);
    });
  }

  // -- scatter (self-influence against loss): drag a box to brush, double-click to clear ------------
  function drawScatter() {
    const sc = model.get("scatter") || {};
    plot.replaceChildren();
    plot.hidden = !sc.x;
    if (!sc.x) return;
    const xs = floats(sc.x), ys = floats(sc.y);
    const W = 420, H = 240, L = 46, B = 32, T = 8, R = 8;
    const lo = (a) => a.reduce((m, v) => (Number.isFinite(v) && v < m ? v : m), Infinity);
    const hi = (a) => a.reduce((m, v) => (Number.isFinite(v) && v > m ? v : m), -Infinity);
    let [x0, x1, y0, y1] = [lo(xs), hi(xs), lo(ys), hi(ys)];
    if (!(x1 > x0)) x1 = x0 + 1;
    if (!(y1 > y0)) y1 = y0 + 1;
    const px = (v) => L + ((v - x0) / (x1 - x0)) * (W - L - R);
    const py = (v) => H - B - ((v - y0) / (y1 - y0)) * (H - B - T);
    const ux = (p) => x0 + ((p - L) / (W - L - R)) * (x1 - x0);
    const uy = (p) => y0 + ((H - B - p) / (H - B - T)) * (y1 - y0);
    const canvas = el("canvas", "tw-scatter-canvas");
    const dpr = window.devicePixelRatio || 1;
    canvas.width = W * dpr; canvas.height = H * dpr;
    canvas.style.width = `${W}px`; canvas.style.height = `${H}px`;
    canvas.setAttribute("role", "img");
    canvas.setAttribute("aria-label", `scatter of ${sc.ylabel} against ${sc.xlabel}; drag a box to show those examples`);
    const ctx = canvas.getContext("2d");
    const fg = getComputedStyle(root).color || "#222";      // the theme's resolved text colour
    const paint = (box) => {
      ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
      ctx.clearRect(0, 0, W, H);
      ctx.strokeStyle = fg; ctx.fillStyle = fg; ctx.lineWidth = 1;
      ctx.beginPath(); ctx.moveTo(L, T); ctx.lineTo(L, H - B); ctx.lineTo(W - R, H - B); ctx.stroke();
      ctx.font = "10px sans-serif";
      ctx.fillText(sc.xlabel || "", L, H - 6);
      ctx.fillText(x0.toPrecision(2), L, H - B + 12);
      ctx.fillText(x1.toPrecision(2), W - R - 28, H - B + 12);
      ctx.save(); ctx.translate(10, H - B); ctx.rotate(-Math.PI / 2); ctx.fillText(sc.ylabel || "", 0, 0); ctx.restore();
      ctx.fillText(y1.toPrecision(2), 14, T + 8);
      ctx.fillText(y0.toPrecision(2), 14, H - B);
      ctx.fillStyle = "rgba(110, 110, 200, 0.45)";
      for (let i = 0; i < xs.length; i++) {
        if (Number.isFinite(xs[i]) && Number.isFinite(ys[i])) ctx.fillRect(px(xs[i]) - 1, py(ys[i]) - 1, 2, 2);
      }
      ctx.fillStyle = "#e65100";
      (model.get("highlight") || []).forEach((i) => { if (i < xs.length) ctx.fillRect(px(xs[i]) - 2, py(ys[i]) - 2, 4, 4); });
      const b = box || (sc.brush ? { a: px(sc.brush[0]), b: px(sc.brush[1]), c: py(sc.brush[3]), d: py(sc.brush[2]) } : null);
      if (b) {
        ctx.strokeStyle = "#1565c0"; ctx.setLineDash([4, 3]);
        ctx.strokeRect(Math.min(b.a, b.b), Math.min(b.c, b.d), Math.abs(b.b - b.a), Math.abs(b.d - b.c));
        ctx.setLineDash([]);
      }
    };
    paint(null);
    let start = null;
    const pos = (e) => { const r = canvas.getBoundingClientRect(); return [e.clientX - r.left, e.clientY - r.top]; };
    canvas.addEventListener("pointerdown", (e) => { start = pos(e); canvas.setPointerCapture(e.pointerId); });
    canvas.addEventListener("pointermove", (e) => { if (start) { const p = pos(e); paint({ a: start[0], b: p[0], c: start[1], d: p[1] }); } });
    canvas.addEventListener("pointerup", (e) => {
      if (!start) return;
      const p = pos(e);
      const [a, b] = [start, p];
      start = null;
      if (Math.abs(a[0] - b[0]) < 3 && Math.abs(a[1] - b[1]) < 3) return;
      send({ action: "brush", x0: ux(Math.min(a[0], b[0])), x1: ux(Math.max(a[0], b[0])),
             y0: uy(Math.max(a[1], b[1])), y1: uy(Math.min(a[1], b[1])) });
    });
    canvas.addEventListener("dblclick", () => send({ action: "brush" }));
    const clear = el("button", "tw-btn tw-brush-clear", "clear brush");
    clear.disabled = !sc.brush;
    clear.addEventListener("click", () => send({ action: "brush" }));
    plot.append(canvas, clear);
  }

  function drawHeader() {   // status, counts and breadcrumbs: cheap, never touches the tiles (or the focus)
    status.textContent = model.get("status") || "";
    status.title = model.get("help") || "";
    counts.textContent = model.get("counts") || "";
    counts.hidden = !counts.textContent;
    drawHistory();
  }

  function draw() {
    pending = 0;
    const hadFocus = root.contains(document.activeElement) || root.dataset.hadFocus === "1";
    revokeLater(urls);
    urls = [];
    drawHeader();
    const strips = model.get("strips") || [];
    const nodes = strips.map((s) => {
      const sec = el("section", "tw-strip");
      sec.dataset.key = s.key;
      const head = el("div", "tw-strip-head");
      const title = el("span", "tw-strip-title", s.title);
      if (s.help) { title.title = s.help; title.classList.add("tw-has-help"); }
      head.append(title, el("span", "tw-note", s.note || ""));
      sec.appendChild(head);
      if (s.mix && s.mix.length) sec.appendChild(mixNode(s.mix));
      const main = el("div", "tw-strip-main");   // pager + tiles; beside the confusion matrix when there is one
      if (s.pager && s.pager.n_pages > 1) main.appendChild(pagerNode(s, s.pager));
      const row = el("div", "tw-tiles" + (s.wrap ? " tw-wrap" : ""));
      row.setAttribute("role", "list");
      s.tiles.forEach((t) => row.appendChild(tileNode(s, t)));
      if (!s.tiles.length) row.appendChild(el("div", "tw-empty", "nothing to show"));
      main.appendChild(row);
      if (s.confusion && s.confusion.labels) {
        const both = el("div", "tw-strip-body");
        both.append(confusionNode(s, s.confusion), main);
        sec.appendChild(both);
      } else sec.appendChild(main);
      return sec;
    });
    body.replaceChildren(...nodes);
    decorate();
    drawDetail();
    if (hadFocus && !root.contains(document.activeElement) && host.isConnected) {
      const again = (focusKey && body.querySelector(`.tw-tile[data-key="${CSS.escape(focusKey)}"]`))
        || body.querySelector(".tw-tile.tw-query") || body.querySelector(".tw-tile");
      if (again) again.focus({ preventScroll: true });
    }
  }
  const schedule = () => { if (!pending) pending = requestAnimationFrame(draw); };

  function decorate() {   // selection, marks and the open tile, without rebuilding the strips
    const sel = new Set(model.get("selected") || []);
    const marks = model.get("marks") || {};
    const active = model.get("active");
    body.querySelectorAll(".tw-tile[data-index]").forEach((fig) => {
      const i = Number(fig.dataset.index);
      fig.classList.toggle("tw-selected", sel.has(i));
      fig.setAttribute("aria-pressed", sel.has(i) ? "true" : "false");
      fig.classList.toggle("tw-active", i === active);
      const m = marks[String(i)] || "";
      fig.dataset.mark = m;
      fig.querySelector(".tw-mark").textContent = m === "suspicious" ? "!" : m === "fine" ? "\u2713" : m === "relabel" ? "\u21bb" : "";
      fig.querySelector(".tw-mark").title = m;
    });
  }

  function barsNode(b) {   // per-checkpoint terms as horizontal bars, signed, scaled to the largest
    const box = el("div", "tw-bars");
    box.appendChild(el("div", "tw-bars-title", b.title || ""));
    const max = Math.max(1e-300, ...b.values.map((v) => Math.abs(v)));
    const signed = b.values.some((v) => v < 0);
    b.values.forEach((v, i) => {
      const row = el("div", "tw-bars-row");
      const track = el("div", "tw-bars-track" + (signed ? "" : " tw-unsigned"));
      const fill = el("div", "tw-bars-fill " + (b.color === "self" ? "tw-self" : v >= 0 ? "tw-pos" : "tw-neg"));
      fill.style.width = `${((signed ? 50 : 100) * Math.abs(v) / max).toFixed(1)}%`;
      track.appendChild(fill);
      row.append(el("span", "tw-bars-label", b.labels[i]), track, el("span", "tw-bars-value", fmtScore(v, signed)));
      box.appendChild(row);
    });
    return box;
  }

  function placeDetail(active) {   // right after the clicked tile's row (wrapped strips) or strip, in view
    const fig = body.querySelector(`.tw-tile[data-index="${active}"].tw-active`) || body.querySelector(`.tw-tile[data-index="${active}"]`);
    if (!fig) { if (detail.parentNode !== root) root.appendChild(detail); return; }
    const row = fig.parentNode;
    if (row.classList.contains("tw-wrap")) {
      const tiles = Array.from(row.querySelectorAll(":scope > .tw-tile"));
      let last = fig;
      for (const node of tiles.slice(tiles.indexOf(fig) + 1)) { if (node.offsetTop > fig.offsetTop + 2) break; last = node; }
      last.after(detail);
    } else {
      row.closest(".tw-strip-main").after(detail);
    }
  }

  function drawDetail() {
    const d = model.get("detail") || {};
    const active = model.get("active");
    revokeLater(detailUrls);
    detailUrls = [];
    if (active < 0 || d.index === undefined || d.index !== active) { detail.hidden = true; detail.replaceChildren(); return; }
    detail.hidden = false;
    const close = el("button", "tw-close", "\u00d7");
    close.title = "close (Escape)";
    close.setAttribute("aria-label", "close details");
    close.addEventListener("click", () => setActive(-1));
    const views = el("div", "tw-detail-views");
    const one = (title, png, text, alt) => {
      const box = el("figure", "tw-detail-view");
      if (png) {
        const img = el("img", "tw-detail-img");
        img.src = pngUrl(png, detailUrls);
        img.alt = alt || title;
        box.appendChild(img);
      } else box.appendChild(el("div", "tw-detail-text", text || ""));
      box.appendChild(el("figcaption", null, title));
      return box;
    };
    if (d.compare) views.appendChild(one(d.compare.title, d.compare.png, d.compare.text, d.compare.title));
    views.appendChild(one(d.title || "", d.png, d.text, d.alt));
    const info = el("div", "tw-detail-info");
    info.appendChild(el("div", "tw-detail-title", d.title || ""));
    const table = el("table", "tw-detail-rows");
    (d.rows || []).forEach(([k, v]) => {
      const tr = el("tr");
      tr.append(el("th", null, k), el("td", null, v));
      table.appendChild(tr);
    });
    info.appendChild(table);
    if (d.bars && d.bars.values && d.bars.values.length) info.appendChild(barsNode(d.bars));
    const btns = el("div", "tw-actions");
    const sel = (model.get("selected") || []).includes(d.index);
    const selBtn = el("button", "tw-btn tw-act-select", sel ? "deselect" : "select");
    selBtn.addEventListener("click", () => toggle(d.index));
    btns.appendChild(selBtn);
    const labels = { query: "use as query (q)", suspicious: "suspicious (s)", fine: "fine (f)", clear: "clear mark" };
    actions().forEach((a) => {
      if (a === "relabel") {
        if (!d.relabel || !d.relabel.options) return;
        const pickBox = el("select", "tw-relabel-pick");
        pickBox.setAttribute("aria-label", "new label");
        d.relabel.options.forEach(([v, lab]) => { const o = el("option", null, lab); o.value = String(v); pickBox.appendChild(o); });
        if (d.relabel.current !== null && d.relabel.current !== undefined) pickBox.value = String(d.relabel.current);
        const b = el("button", "tw-btn tw-act-relabel", "relabel (a: to prediction)");
        b.addEventListener("click", () => send({ action: "mark", index: d.index, mark: "relabel", value: Number(pickBox.value) }));
        btns.append(pickBox, b);
        return;
      }
      const b = el("button", `tw-btn tw-act-${a}`, labels[a] || a);
      b.addEventListener("click", () => send(a === "query" ? { action: "query", index: d.index }
                                                             : { action: "mark", index: d.index, mark: a }));
      btns.appendChild(b);
    });
    info.appendChild(btns);
    detail.replaceChildren(close, views, info);
    placeDetail(active);
    if (host.isConnected && detail.scrollIntoView) detail.scrollIntoView({ block: "nearest", inline: "nearest" });
  }

  function neighbour(fig, key) {
    const tiles = Array.from(body.querySelectorAll(".tw-tile"));
    const at = tiles.indexOf(fig);
    if (key === "ArrowLeft") return tiles[at - 1];
    if (key === "ArrowRight") return tiles[at + 1];
    const r = fig.getBoundingClientRect();
    const cx = r.left + r.width / 2;
    const down = key === "ArrowDown";
    let best = null, bestRow = Infinity, bestDx = Infinity;
    for (const node of tiles) {
      const q = node.getBoundingClientRect();
      const dy = down ? q.top - r.top : r.top - q.top;
      if (dy < r.height / 2) continue;                    // same row or the wrong way
      const dx = Math.abs(q.left + q.width / 2 - cx);
      if (dy < bestRow - 1 || (Math.abs(dy - bestRow) <= 1 && dx < bestDx)) { best = node; bestRow = dy; bestDx = dx; }
    }
    return best;
  }

  // Keys are caught on window in the capture phase, for events aimed inside this gallery only:
  // Notebook 7 (and JupyterLab in some modes) grab arrows/Enter at the document before our elements see them.
  const onKey = (e) => {
    if (!(e.target instanceof Node) || !root.contains(e.target)) return;
    if (e.target.tagName === "SELECT" || e.target.tagName === "INPUT") return;
    const fig = e.target.closest && e.target.closest(".tw-tile");
    const train = fig && fig.dataset.index !== undefined ? Number(fig.dataset.index) : null;
    const review = actions().includes("suspicious");
    let handled = true;
    if (e.key === "Escape") {
      if (model.get("active") >= 0) setActive(-1);
      else if (fig) fig.blur();
    } else if (e.key === "b" && (model.get("history") || []).length > 1) {
      send({ action: "back" });
    } else if (e.key === "u" && review) {
      send({ action: "undo" });
    } else if (!fig) {
      handled = false;
    } else if (e.key.startsWith("Arrow")) {
      const next = neighbour(fig, e.key);
      if (next) { next.focus(); next.scrollIntoView({ block: "nearest", inline: "nearest" }); }
    } else if (e.key === "Enter" || e.key === " ") {
      activate(fig, e);
    } else if (e.key === "q" && actions().includes("query") && train !== null) {
      send({ action: "query", index: train });
    } else if ((e.key === "s" || e.key === "f") && review && train !== null) {
      send({ action: "mark", index: train, mark: e.key === "s" ? "suspicious" : "fine", advance: true });
    } else if (e.key === "a" && actions().includes("relabel") && train !== null) {
      send({ action: "mark", index: train, mark: "relabel", advance: true });
    } else {
      handled = false;
    }
    if (handled) { e.preventDefault(); e.stopPropagation(); }
  };
  window.addEventListener("keydown", onKey, true);
  root.addEventListener("focusin", () => { root.dataset.hadFocus = "1"; });
  root.addEventListener("focusout", (e) => { if (!root.contains(e.relatedTarget)) root.dataset.hadFocus = "0"; });

  const onActive = () => {
    decorate();
    drawDetail();
    const a = model.get("active");   // the keyboard follows the open tile (auto-advance after s / f / a)
    if (a >= 0 && root.contains(document.activeElement)) {
      const fig = body.querySelector(`.tw-tile[data-index="${a}"]`);
      if (fig && document.activeElement !== fig && document.activeElement.closest(".tw-tile")) fig.focus({ preventScroll: true });
    }
  };
  const handlers = [["change:strips", schedule], ["change:status", drawHeader], ["change:help", drawHeader],
    ["change:counts", drawHeader], ["change:history", drawHeader], ["change:selected", onActive],
    ["change:marks", decorate], ["change:active", onActive], ["change:detail", drawDetail],
    ["change:actions", drawDetail], ["change:scatter", drawScatter], ["change:highlight", drawScatter]];
  handlers.forEach(([event, fn]) => model.on(event, fn));
  draw();
  drawScatter();
  // A live view hides the static copy displayed beside it (GalleryBase._ipython_display_), which is
  // there for exported notebooks and notebooks opened without a kernel.
  const hideFallback = () => {
    const area = host.closest(".jp-OutputArea, .output");
    if (!area) return false;
    area.querySelectorAll(".tw-static-fallback").forEach((f) => {
      const out = f.closest(".jp-OutputArea-child, .output_area") || f;
      out.style.display = "none";
      out.classList.add("tw-fallback-hidden");
    });
    return true;
  };
  let fallbackWatch = null;
  const watchFallback = (tries) => {   // the output area exists once the view is attached; the copy may come later
    const area = host.closest(".jp-OutputArea, .output");
    if (!area) { if (tries < 40) setTimeout(() => watchFallback(tries + 1), 250); return; }
    hideFallback();
    fallbackWatch = new MutationObserver(hideFallback);
    fallbackWatch.observe(area, { childList: true, subtree: true });
  };
  watchFallback(0);
  const themeWatch = new MutationObserver(() => drawScatter());   // axes follow a theme change
  themeWatch.observe(document.body, { attributes: true, attributeFilter: ["data-jp-theme-light"] });
  return () => {
    themeWatch.disconnect();
    if (fallbackWatch) fallbackWatch.disconnect();
    window.removeEventListener("keydown", onKey, true);
    if (pending) cancelAnimationFrame(pending);
    handlers.forEach(([event, fn]) => model.off(event, fn));
    urls.concat(detailUrls).forEach((u) => URL.revokeObjectURL(u));
  };
}

export default { render };

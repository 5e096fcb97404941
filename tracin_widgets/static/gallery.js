// tracin gallery front end: renders what Python sends; owns no data.
// Model traits: strips (list of {key, title, note, scale, mix, tiles}), selected (list of training
// indices), active (training index whose detail is open, -1 none), detail (dict), marks ({index: mark}),
// actions (detail buttons), status (a line above the strips).
// Mouse: click a tile = toggle it in `selected` and open its detail; Alt+click = use it as the query.
// Keys on a focused tile: arrows move, Enter/Space = click, Escape = close detail,
// q = use as query, s / f = mark suspicious / fine (when the gallery offers those actions).

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined && text !== null) e.textContent = String(text);
  return e;
}

function fmtScore(s) {
  if (s === null || s === undefined) return "";
  const a = Math.abs(s);
  const t = a !== 0 && (a < 1e-3 || a >= 1e4) ? s.toExponential(2) : s.toPrecision(3);
  return (s > 0 ? "+" : "") + t;
}

function render({ model, el: host }) {
  const root = el("div", "tw-gallery");
  root.setAttribute("data-lm-suppress-shortcuts", "true");  // keep JupyterLab's keys off our tiles
  root.setAttribute("data-p-suppress-shortcuts", "true");
  const status = el("div", "tw-status");
  const body = el("div", "tw-strips");
  const detail = el("div", "tw-detail");
  detail.hidden = true;
  root.append(status, body, detail);
  host.appendChild(root);

  let urls = [];
  let detailUrl = null;
  let focusKey = null;   // "stripKey:index" of the tile that had focus, restored after a redraw

  const pngUrl = (view) => {
    const blob = new Blob([view], { type: "image/png" });
    return URL.createObjectURL(blob);
  };
  const actions = () => model.get("actions") || [];
  const send = (msg) => model.send(msg);

  function toggle(index) {
    const sel = model.get("selected").slice();
    const at = sel.indexOf(index);
    if (at >= 0) sel.splice(at, 1); else sel.push(index);
    model.set("selected", sel);
    model.set("active", index);
    model.save_changes();
  }

  function activate(tile, event) {
    if (tile.dataset.index === undefined) return;           // the pinned query is not a training tile
    const index = Number(tile.dataset.index);
    if (event && event.altKey && actions().includes("query")) { send({ action: "query", index }); return; }
    toggle(index);
  }

  function tileNode(strip, t, scale) {
    const fig = el("figure", "tw-tile");
    if (t.pinned) {                        // the query on top: not a selectable training tile
      fig.classList.add("tw-query");
      fig.dataset[t.role === "test" ? "testIndex" : "queryIndex"] = String(t.index);
    } else fig.dataset.index = String(t.index);
    fig.dataset.key = `${strip.key}:${t.role}:${t.index}`;
    fig.tabIndex = 0;
    fig.setAttribute("role", "button");
    if (t.png) {
      const img = el("img", "tw-thumb");
      const u = pngUrl(t.png);
      urls.push(u);
      img.src = u;
      img.alt = t.alt;
      img.draggable = false;
      fig.appendChild(img);
    } else {
      const pre = el("pre", "tw-snippet", t.text || "");
      pre.setAttribute("role", "img");
      pre.setAttribute("aria-label", t.alt);
      fig.appendChild(pre);
    }
    const cap = el("figcaption", "tw-caption");
    const idx = el("span", "tw-idx", (t.role === "test" ? "test #" : "#") + t.index);
    const lab = el("span", "tw-label", t.label);
    cap.append(idx, lab);
    if (t.pred !== null && t.pred !== undefined && t.pred !== "") {
      const p = el("span", "tw-pred", `pred ${t.pred}`);
      if (t.pred !== t.label) p.classList.add("tw-wrong");
      cap.appendChild(p);
    }
    fig.appendChild(cap);
    if (t.score !== null && t.score !== undefined) {
      const bar = el("div", "tw-bar" + (strip.signed === false ? " tw-unsigned" : ""));
      const fill = el("div", "tw-fill " + (t.score >= 0 ? "tw-pos" : "tw-neg"));
      const frac = scale > 0 ? Math.min(1, Math.abs(t.score) / scale) : 0;
      fill.style.width = `${((strip.signed === false ? 100 : 50) * frac).toFixed(1)}%`;
      bar.appendChild(fill);
      const num = el("span", "tw-score " + (t.score >= 0 ? "tw-pos-text" : "tw-neg-text"), fmtScore(t.score));
      fig.append(bar, num);
      fig.title = `${t.alt}, score ${fmtScore(t.score)}`;
    } else {
      fig.title = t.alt;
    }
    const badge = el("span", "tw-mark");
    fig.appendChild(badge);
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

  function draw() {
    urls.forEach((u) => URL.revokeObjectURL(u));
    urls = [];
    status.textContent = model.get("status") || "";
    const strips = model.get("strips") || [];
    const nodes = strips.map((s) => {
      const sec = el("section", "tw-strip");
      sec.dataset.key = s.key;
      const head = el("div", "tw-strip-head");
      head.append(el("span", "tw-strip-title", s.title), el("span", "tw-note", s.note || ""));
      sec.appendChild(head);
      if (s.mix && s.mix.length) sec.appendChild(mixNode(s.mix));
      const row = el("div", "tw-tiles" + (s.wrap ? " tw-wrap" : ""));
      row.setAttribute("role", "list");
      s.tiles.forEach((t) => row.appendChild(tileNode(s, t, s.scale)));
      if (!s.tiles.length) row.appendChild(el("div", "tw-empty", "nothing to show"));
      sec.appendChild(row);
      return sec;
    });
    body.replaceChildren(...nodes);
    decorate();
    if (focusKey && root.contains(document.activeElement) === false) {
      const again = body.querySelector(`.tw-tile[data-key="${CSS.escape(focusKey)}"]`);
      if (again && host.isConnected && root.dataset.hadFocus === "1") again.focus({ preventScroll: true });
    }
  }

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
      fig.querySelector(".tw-mark").textContent = m === "suspicious" ? "!" : m === "fine" ? "\u2713" : "";
    });
  }

  function drawDetail() {
    const d = model.get("detail") || {};
    const active = model.get("active");
    if (detailUrl) { URL.revokeObjectURL(detailUrl); detailUrl = null; }
    if (active < 0 || d.index === undefined || d.index !== active) { detail.hidden = true; detail.replaceChildren(); return; }
    detail.hidden = false;
    const close = el("button", "tw-close", "\u00d7");
    close.title = "close (Escape)";
    close.addEventListener("click", () => { model.set("active", -1); model.save_changes(); });
    const view = el("div", "tw-detail-view");
    if (d.png) {
      const img = el("img", "tw-detail-img");
      detailUrl = pngUrl(d.png);
      img.src = detailUrl;
      img.alt = d.alt || "";
      view.appendChild(img);
    } else {
      view.appendChild(el("pre", "tw-detail-text", d.text || ""));
    }
    const info = el("div", "tw-detail-info");
    info.appendChild(el("div", "tw-detail-title", d.title || ""));
    const table = el("table", "tw-detail-rows");
    (d.rows || []).forEach(([k, v]) => {
      const tr = el("tr");
      tr.append(el("th", null, k), el("td", null, v));
      table.appendChild(tr);
    });
    info.appendChild(table);
    const btns = el("div", "tw-actions");
    const sel = (model.get("selected") || []).includes(d.index);
    const selBtn = el("button", "tw-btn tw-act-select", sel ? "deselect" : "select");
    selBtn.addEventListener("click", () => toggle(d.index));
    btns.appendChild(selBtn);
    const labels = { query: "use as query (q)", suspicious: "suspicious (s)", fine: "fine (f)", clear: "clear mark" };
    actions().forEach((a) => {
      const b = el("button", `tw-btn tw-act-${a}`, labels[a] || a);
      b.addEventListener("click", () => send(a === "query" ? { action: "query", index: d.index }
                                                             : { action: "mark", index: d.index, mark: a }));
      btns.appendChild(b);
    });
    info.appendChild(btns);
    detail.replaceChildren(close, view, info);
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
    for (const t of tiles) {
      const q = t.getBoundingClientRect();
      const dy = down ? q.top - r.top : r.top - q.top;
      if (dy < r.height / 2) continue;                    // same row or the wrong way
      const dx = Math.abs(q.left + q.width / 2 - cx);
      if (dy < bestRow - 1 || (Math.abs(dy - bestRow) <= 1 && dx < bestDx)) { best = t; bestRow = dy; bestDx = dx; }
    }
    return best;
  }

  // Keys are caught on window in the capture phase, for events aimed inside this gallery only:
  // Notebook 7 (and JupyterLab in some modes) grab arrows/Enter at the document before our elements see them.
  const onKey = (e) => {
    if (!(e.target instanceof Node) || !root.contains(e.target)) return;
    const fig = e.target.closest && e.target.closest(".tw-tile");
    let handled = true;
    if (e.key === "Escape") {
      if (model.get("active") >= 0) { model.set("active", -1); model.save_changes(); }
      else if (fig) fig.blur();
    } else if (!fig) {
      handled = false;
    } else if (e.key.startsWith("Arrow")) {
      const next = neighbour(fig, e.key);
      if (next) { next.focus(); next.scrollIntoView({ block: "nearest", inline: "nearest" }); }
    } else if (e.key === "Enter" || e.key === " ") {
      activate(fig, e);
    } else if (e.key === "q" && actions().includes("query") && fig.dataset.index !== undefined) {
      send({ action: "query", index: Number(fig.dataset.index) });
    } else if ((e.key === "s" || e.key === "f") && actions().includes("suspicious") && fig.dataset.index !== undefined) {
      send({ action: "mark", index: Number(fig.dataset.index), mark: e.key === "s" ? "suspicious" : "fine" });
    } else {
      handled = false;
    }
    if (handled) { e.preventDefault(); e.stopPropagation(); }
  };
  window.addEventListener("keydown", onKey, true);
  root.addEventListener("focusin", () => { root.dataset.hadFocus = "1"; });
  root.addEventListener("focusout", (e) => { if (!root.contains(e.relatedTarget)) root.dataset.hadFocus = "0"; });

  const onStrips = () => { draw(); drawDetail(); };
  const onMarks = () => decorate();
  const onSel = () => { decorate(); drawDetail(); };
  const handlers = [["change:strips", onStrips], ["change:status", onStrips], ["change:selected", onSel],
    ["change:marks", onMarks], ["change:active", onSel], ["change:detail", drawDetail],
    ["change:actions", drawDetail]];
  handlers.forEach(([event, fn]) => model.on(event, fn));
  draw();
  drawDetail();
  return () => {
    window.removeEventListener("keydown", onKey, true);
    handlers.forEach(([event, fn]) => model.off(event, fn));
    urls.forEach((u) => URL.revokeObjectURL(u));
    if (detailUrl) URL.revokeObjectURL(detailUrl);
  };
}

export default { render };

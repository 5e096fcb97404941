"""notebooks/01_quickstart.ipynb in real JupyterLab (headless Chromium): every cell runs, the TopK gallery
of the %load_ext tracin_widgets formatter and the InfluenceExplorer render, and agree with the engine.

A copy of the notebook is served from a temporary folder (JupyterLab autosaves; the committed notebook
must stay without outputs). Screenshots: artifacts/quickstart_explorer.png (for the README) and
artifacts/quickstart_page.png.
"""

from __future__ import annotations

import json
import shutil

import pytest
from playwright.sync_api import expect

pytestmark = pytest.mark.browser

PRO = '.tw-explorer .tw-strip[data-key="proponents"] .tw-tile'
OPP = '.tw-explorer .tw-strip[data-key="opponents"] .tw-tile'
TOPK_PRO = ".tracin-topk .tracin-proponents img"
TOPK_OPP = ".tracin-topk .tracin-opponents img"


def _images_decoded(page, selector: str) -> None:
    page.wait_for_function(
        "sel => { const im = Array.from(document.querySelectorAll(sel));"
        " return im.length > 0 && im.every(i => i.complete && i.naturalWidth > 0); }", arg=selector, timeout=20_000)


def test_quickstart_runs_and_its_galleries_render(jupyter_server, page, jl, tmp_path):
    shutil.copy(jl.REPO / "notebooks" / "01_quickstart.ipynb", tmp_path / "01_quickstart.ipynb")
    server = jupyter_server(tmp_path)
    jl.open_notebook(page, server.url("01_quickstart.ipynb", "lab"))
    assert jl.run_all(page, 240) == []
    py = lambda code: json.loads(jl.kernel_exec(page, code))  # noqa: E731

    # the extension's TopK formatter: 6 proponent and 6 opponent thumbnails, decoded, in engine order
    expect(page.locator(TOPK_PRO)).to_have_count(6, timeout=30_000)
    expect(page.locator(TOPK_OPP)).to_have_count(6)
    _images_decoded(page, ".tracin-topk img")
    captions = page.locator(".tracin-topk .tracin-proponents figcaption").all_inner_texts()
    engine = py("import json\nprint(json.dumps(result.proponents.indices[0].tolist()))")
    assert [int(c.split("·")[0].strip().lstrip("#")) for c in captions] == engine

    # the InfluenceExplorer: 8 + 8 tiles whose indices are the engine's top_k for test example 0
    expect(page.locator(PRO)).to_have_count(8, timeout=30_000)
    expect(page.locator(OPP)).to_have_count(8)
    _images_decoded(page, ".tw-explorer .tw-thumb")
    dom = page.locator(PRO).evaluate_all("els => els.map(e => Number(e.dataset.index))")
    assert dom == py("print(json.dumps(index.top_k(split.test, k=8).proponents.indices[0].tolist()))")
    dom_opp = page.locator(OPP).evaluate_all("els => els.map(e => Number(e.dataset.index))")
    assert dom_opp == py("print(json.dumps(index.top_k(split.test, k=8).opponents.indices[0].tolist()))")

    # a click reaches Python
    page.locator(PRO).nth(2).click()
    jl.wait_kernel(page, "print(json.dumps(explorer.selected))", lambda v: v == [dom[2]])

    # the %tracin help output is there
    expect(page.locator(".jp-OutputArea-output").filter(has_text="%tracin explore")).to_have_count(1)

    page.set_viewport_size({"width": 1280, "height": 2200})   # the explorer with its detail panel fits whole
    page.locator(".tw-explorer").scroll_into_view_if_needed()
    jl.shot(page, "quickstart_explorer", page.locator(".tw-explorer"))
    page.set_viewport_size({"width": 1280, "height": 900})
    page.locator(".tracin-topk").scroll_into_view_if_needed()
    jl.shot(page, "quickstart_page")
    errors = [e for e in page.console_errors if any(w in e.lower() for w in ("widget", "anywidget", "tw-", "gallery"))]
    assert not errors, errors

"""The three galleries in real JupyterLab and Notebook 7 (headless Chromium): render, click, keys, sync.

Each frontend opens its own copy of a notebook that trains a tiny CNN, builds an index and shows
InfluenceExplorer, SelfInfluenceGallery and ClusterGallery. The test reads tiles from the DOM and the
Python state from the kernel (kernel_exec), and checks they agree after every interaction.
Screenshots go to artifacts/widgets_<frontend>*.png.
"""

from __future__ import annotations

import json

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook
from playwright.sync_api import expect

pytestmark = pytest.mark.browser

SETUP = """\
import json, tempfile, torch, torch.nn.functional as F
torch.set_num_threads(1)  # tiny model; the test machine is shared
import tracin_engine as te
import tracin_widgets as tw
from tracin_engine.examples import DigitsCNN, load_digits_split, train
split = load_digits_split(seed=0)
train_data = (split.train[0][:300], split.train[1][:300])
test_data = (split.test[0][:40], split.test[1][:40])
torch.manual_seed(0)
model = DigitsCNN(width=4, hidden=16)
run = tempfile.mkdtemp()
train(model, train_data, run, epochs=8, n_checkpoints=2, lr=0.3)
index = te.TracIn(model, te.Checkpoints.from_dir(run), loss_fn=F.cross_entropy).index(train_data, progress=False)
def ids(w, key):
    return [t["index"] for s in w.gallery.strips if s["key"] == key for t in s["tiles"]]
"""
CELLS = [
    "explorer = tw.InfluenceExplorer(index, train_data, test_data, k=6, class_names=split.class_names)\nexplorer",
    "outliers = tw.SelfInfluenceGallery(index, train_data, page_size=24, class_names=split.class_names)\noutliers",
    "clusters = tw.ClusterGallery(index, train_data, n_clusters=4, per_cluster=8, class_names=split.class_names)\n"
    "clusters",
]


def _notebook(path):
    nb = new_notebook(cells=[new_markdown_cell("# tracin widgets browser test"), new_code_cell(SETUP),
                             *[new_code_cell(c) for c in CELLS]],
                      metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}})
    path.write_text(nbformat.writes(nb))


@pytest.fixture(scope="module")
def server(jupyter_server, tmp_path_factory):
    root = tmp_path_factory.mktemp("nb_root")
    for frontend in ("lab", "notebook7"):
        _notebook(root / f"widgets_{frontend}.ipynb")
    return jupyter_server(root)


def dom_ids(page, selector):
    return page.locator(selector).evaluate_all("els => els.map(e => Number(e.dataset.index))")


def wait_dom_ids(page, selector, expected, timeout_ms=15_000):
    page.wait_for_function(
        "([sel, want]) => JSON.stringify(Array.from(document.querySelectorAll(sel)).map(e => Number(e.dataset.index)))"
        " === JSON.stringify(want)", arg=[selector, expected], timeout=timeout_ms)


def images_loaded(page, selector):
    page.wait_for_function(
        "sel => { const im = Array.from(document.querySelectorAll(sel));"
        " return im.length > 0 && im.every(i => i.complete && i.naturalWidth > 0); }", arg=selector, timeout=15_000)


PRO = '.tw-explorer .tw-strip[data-key="proponents"] .tw-tile'
OPP = '.tw-explorer .tw-strip[data-key="opponents"] .tw-tile'


@pytest.mark.parametrize("frontend", ["lab", "notebook7"])
def test_galleries_in_browser(server, page, jl, frontend):
    jl.open_notebook(page, server.url(f"widgets_{frontend}.ipynb", frontend))
    assert jl.run_all(page, 150) == []
    expect(page.locator(".tw-gallery")).to_have_count(3, timeout=30_000)
    py = lambda code: json.loads(jl.kernel_exec(page, code))  # noqa: E731

    # -- InfluenceExplorer: tiles match Python's top_k, images decoded, alt text names index and label
    expect(page.locator(PRO)).to_have_count(6, timeout=15_000)
    images_loaded(page, ".tw-explorer .tw-thumb")
    pro = py("print(json.dumps(ids(explorer, 'proponents')))")
    assert dom_ids(page, PRO) == pro
    assert dom_ids(page, OPP) == py("print(json.dumps(ids(explorer, 'opponents')))")
    alt = page.locator(PRO).first.locator("img").get_attribute("alt")
    assert alt.startswith(f"training example {pro[0]}, label ")
    assert page.locator(".tw-explorer .tw-query[data-test-index='0']").count() == 1

    # click a tile -> Python's `selected`, and the detail shows per-checkpoint scores
    page.locator(PRO).nth(1).click()
    jl.wait_kernel(page, "print(json.dumps(explorer.selected))", lambda v: v == [pro[1]])
    detail = page.locator(".tw-explorer .tw-detail")
    expect(detail).to_be_visible()
    expect(detail).to_contain_text("checkpoint 1")
    expect(page.locator(PRO).nth(1)).to_have_class("tw-tile tw-selected tw-active")
    jl.shot(page, f"widgets_{frontend}_explorer_detail", page.locator(".tw-explorer"))

    # keyboard: Right moves focus, Enter toggles, Down reaches the opponents strip, Escape closes the detail
    page.locator(PRO).nth(1).focus()
    page.keyboard.press("ArrowRight")
    assert page.evaluate("document.activeElement.dataset.index") == str(pro[2])
    page.keyboard.press("Enter")
    jl.wait_kernel(page, "print(json.dumps(explorer.selected))", lambda v: v == [pro[1], pro[2]])
    page.keyboard.press("ArrowDown")
    assert page.evaluate("document.activeElement.closest('.tw-strip').dataset.key") == "opponents"
    page.keyboard.press("Escape")
    expect(detail).to_be_hidden()

    # set test_index from Python -> the strips change to the new query's proponents
    new = py("explorer.test_index = 7\nprint(json.dumps(ids(explorer, 'proponents')))")
    assert new != pro
    wait_dom_ids(page, PRO, new)
    expect(page.locator(".tw-explorer .tw-query[data-test-index='7']")).to_have_count(1)
    expect(page.locator(".tw-explorer .tw-picker input")).to_have_value("7")

    # Alt+click a proponent -> it becomes the query (a training example)
    page.locator(PRO).nth(3).click(modifiers=["Alt"])
    jl.wait_kernel(page, "print(json.dumps(explorer.query))", lambda v: v == ["train", new[3]])
    expect(page.locator(f".tw-explorer .tw-query[data-query-index='{new[3]}']")).to_have_count(1)

    # embedding-neighbour toggle adds a strip
    page.locator(".tw-emb-toggle").click()
    expect(page.locator('.tw-explorer .tw-strip[data-key="embedding"] .tw-tile')).to_have_count(6, timeout=15_000)

    # -- SelfInfluenceGallery: ranked page, paging, click -> selected, s -> suspicious mark
    tiles = ".tw-outliers .tw-tile"
    expect(page.locator(tiles)).to_have_count(24, timeout=15_000)
    assert dom_ids(page, tiles) == py("print(json.dumps(outliers.page_indices().tolist()))")
    page.locator(".tw-outliers .tw-next").click()
    wait_dom_ids(page, tiles, py("import time; time.sleep(0.3)\nprint(json.dumps(outliers.page_indices().tolist()))"))
    assert py("print(outliers.page)") == 1
    first = dom_ids(page, tiles)[0]
    page.locator(tiles).first.click()
    jl.wait_kernel(page, "print(json.dumps(outliers.selected))", lambda v: v == [first])
    page.locator(tiles).first.focus()
    page.keyboard.press("s")
    jl.wait_kernel(page, "print(json.dumps(outliers.marks))", lambda v: v == {str(first): "suspicious"})
    expect(page.locator(f".tw-outliers .tw-tile[data-index='{first}']")).to_have_attribute("data-mark", "suspicious")
    images_loaded(page, ".tw-outliers .tw-thumb")
    jl.shot(page, f"widgets_{frontend}_outliers", page.locator(".tw-outliers"))

    # -- ClusterGallery: one strip per cluster, representatives first, label mix bar
    n = py("print(len(clusters.clusters.sizes))")
    expect(page.locator(".tw-clusters .tw-strip")).to_have_count(n, timeout=15_000)
    expect(page.locator(".tw-clusters .tw-mix")).to_have_count(n)
    k0 = py("print(clusters.order[0])")
    strip0 = f'.tw-clusters .tw-strip[data-key="cluster-{k0}"] .tw-tile'
    assert dom_ids(page, strip0) == py(f"print(json.dumps(clusters.shown({k0})))")
    page.locator(strip0).first.click()
    jl.wait_kernel(page, "print(json.dumps(clusters.selected))", lambda v: v == [dom_ids(page, strip0)[0]])
    images_loaded(page, ".tw-clusters .tw-thumb")
    jl.shot(page, f"widgets_{frontend}_clusters", page.locator(".tw-clusters"))

    page.locator(".tw-explorer").scroll_into_view_if_needed()
    jl.shot(page, f"widgets_{frontend}_page")
    assert py("print(json.dumps([repr(w.last_error) for w in (explorer, outliers, clusters)]))") == ["None"] * 3
    errors = [e for e in page.console_errors if any(w in e.lower() for w in ("widget", "anywidget", "tw-", "gallery"))]
    assert not errors, errors

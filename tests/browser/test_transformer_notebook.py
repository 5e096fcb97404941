"""notebooks/08_transformer_text.ipynb in real JupyterLab (headless Chromium): every cell runs (a
Hugging Face Trainer run, its checkpoint folders, tokenizer dicts as data), the InfluenceExplorer shows
text tiles decoded from dict examples, in the engine's order, and a click reaches Python.
Screenshot: artifacts/transformer_explorer.png."""

from __future__ import annotations

import json
import shutil

import pytest
from playwright.sync_api import expect

pytestmark = pytest.mark.browser

PRO = '.tw-explorer .tw-strip[data-key="proponents"] .tw-tile:not(.tw-query)'


def test_transformer_notebook_shows_text_tiles(jupyter_server, page, jl, tmp_path):
    pytest.importorskip("transformers")
    shutil.copy(jl.REPO / "notebooks" / "08_transformer_text.ipynb", tmp_path / "08_transformer_text.ipynb")
    server = jupyter_server(tmp_path)
    jl.open_notebook(page, server.url("08_transformer_text.ipynb", "lab"))
    assert jl.run_all(page, 400) == []
    py = lambda code: json.loads(jl.kernel_exec(page, code))  # noqa: E731

    expect(page.locator(PRO)).to_have_count(6, timeout=30_000)
    dom = page.locator(PRO).evaluate_all("els => els.map(e => Number(e.dataset.index))")
    assert dom == py("import json\nprint(json.dumps(index.top_k(test, k=6).proponents.indices[0].tolist()))")
    texts = page.locator(PRO + " .tw-snippet").all_inner_texts()
    want = py("print(json.dumps([render({k: v[j] for k, v in train.items()}) for j in %s]))" % dom)
    assert texts == want and all(t.strip() for t in texts)

    page.locator(PRO).nth(1).click()
    jl.wait_kernel(page, "print(json.dumps(explorer.selected))", lambda v: v == [dom[1]])
    page.locator(".tw-explorer").scroll_into_view_if_needed()
    jl.shot(page, "transformer_explorer", page.locator(".tw-explorer"))

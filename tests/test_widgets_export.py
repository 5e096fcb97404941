"""Exported notebooks show the galleries: `jupyter nbconvert --execute` then `--to html` (no network, so no
widget manager) shows the static copy each gallery displays beside its live view; the saved notebook
keeps that copy as a text/html output (what a notebook reopened without a kernel shows)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_notebook

REPO = Path(__file__).resolve().parents[1]

CELLS = ["""\
import tempfile, torch, torch.nn.functional as F
torch.set_num_threads(1)
import tracin_engine as te, tracin_widgets as tw
from tracin_engine.examples import MLP, load_digits_split, train
split = load_digits_split(seed=0)
tr = (split.train[0][:80], split.train[1][:80]); ts = (split.test[0][:10], split.test[1][:10])
torch.manual_seed(0); model = MLP(64, 10, hidden=16); run = tempfile.mkdtemp()
train(model, (tr[0].flatten(1), tr[1]), run, epochs=2, n_checkpoints=2, lr=0.1)
flat = lambda d: (d[0].flatten(1), d[1])
index = te.TracIn(model, te.Checkpoints.from_dir(run), loss_fn=F.cross_entropy).index(flat(tr), progress=False)
render = lambda x: x.reshape(8, 8)""",
         "tw.InfluenceExplorer(index, flat(tr), flat(ts), k=3, browse=4, render=render)",
         "tw.SelfInfluenceGallery(index, flat(tr), page_size=6, render=render)"]


@pytest.mark.slow
def test_nbconvert_html_shows_the_static_galleries(tmp_path):
    nb = new_notebook(cells=[new_code_cell(c) for c in CELLS],
                      metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}})
    src = tmp_path / "export.ipynb"
    src.write_text(nbformat.writes(nb))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    jup = [sys.executable, "-m", "jupyter", "nbconvert"]
    subprocess.run([*jup, "--execute", "--to", "notebook", "--output", "executed.ipynb", str(src)],
                   check=True, env=env, cwd=tmp_path, capture_output=True, timeout=300)
    executed = nbformat.read(tmp_path / "executed.ipynb", as_version=4)
    assert "application/vnd.jupyter.widget-state+json" in executed.metadata.get("widgets", {})   # state was saved
    for cell in executed.cells[1:]:
        kinds = [set(o.get("data", {})) for o in cell.outputs]
        assert any("application/vnd.jupyter.widget-view+json" in k for k in kinds)
        fallback = [o for o in cell.outputs if "tw-static-fallback" in o.get("data", {}).get("text/html", "")]
        assert len(fallback) == 1                  # shown by a frontend that cannot draw the widget
    subprocess.run([*jup, "--to", "html", "executed.ipynb"], check=True, env=env, cwd=tmp_path,
                   capture_output=True, timeout=120)
    html = (tmp_path / "executed.html").read_text()
    assert html.count('class="tw-static-fallback"') == 2
    assert len(re.findall(r'<figure data-index="\d+"', html)) >= 3 + 3 + 6      # proponents, opponents, a page
    assert len(re.findall(r'data-test-index="\d+"', html)) >= 1 + 4             # the query and the browsed tests
    assert html.count("data:image/png;base64,") >= 3 + 3 + 6 + 5

"""The tutorials: built from notebooks/src, committed without outputs, and each runs top to bottom in
under two minutes on a 2-core CPU (executed headlessly with nbclient in a real IPython kernel)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NB_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(NB_DIR.glob("[0-9][0-9]_*.ipynb"))
BUDGET_S = 120          # per notebook, whole run
CELL_TIMEOUT_S = 120    # per cell (nbclient kills the cell and fails the test)

# Something each notebook must show (beyond running without an error): a string in some output.
EXPECT = {
    "01_quickstart": ["tracin-topk", "top proponent has the test label", "application/vnd.jupyter.widget-view+json"],
    "02_mislabeled_examples": ["found in the top 10%", "self-influence 30% reviewed", "image/png"],
    "03_clusters_and_similarity": ["adjusted Rand index", "application/vnd.jupyter.widget-view+json"],
    "04_text_classification": ["predicted topic", "application/vnd.jupyter.widget-view+json"],
    "05_tabular_regression": ["proponents removed", "image/png"],
    "06_theory": ["image/png", "Spearman"],
    "07_gpu_scale": ["reopened from disk", "queries per second"],
    "08_transformer_text": ["top proponent has the test sentence's topic", "generated:", "application/vnd.jupyter.widget-view+json"],
}


def test_every_source_has_a_notebook_built_from_it_without_outputs():
    sources = sorted(p.stem for p in (NB_DIR / "src").glob("[0-9][0-9]_*.py"))
    assert sources == [p.stem for p in NOTEBOOKS]
    check = subprocess.run([sys.executable, str(NB_DIR / "build.py"), "--check"], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        assert path.stat().st_size < 100_000, f"{path.name} is larger than 100 kB"
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert not cell.outputs and cell.execution_count is None, f"{path.name} holds outputs"


def _outputs_text(nb) -> str:
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            parts.append(out.get("text", "") if out.get("output_type") == "stream" else json.dumps(out.get("data", {})))
    return "\n".join(parts)


@pytest.mark.notebooks
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_top_to_bottom_in_budget(path, tmp_path):
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    env_before = os.environ.get("MPLBACKEND")
    os.environ["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"  # inherited by the kernel
    try:
        client = NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                                resources={"metadata": {"path": str(tmp_path)}})
        start = time.perf_counter()
        client.execute()
        elapsed = time.perf_counter() - start
    finally:
        if env_before is None:
            os.environ.pop("MPLBACKEND", None)
        else:
            os.environ["MPLBACKEND"] = env_before
    nbformat.write(nb, tmp_path / path.name)  # executed copy, for a look when something fails
    print(f"{path.name}: {elapsed:.1f} s")
    assert elapsed < BUDGET_S, f"{path.name} took {elapsed:.0f} s (budget {BUDGET_S} s)"
    text = _outputs_text(nb)
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    for needle in EXPECT.get(path.stem, []):
        assert needle in text, f"{path.name}: no output contains {needle!r}"

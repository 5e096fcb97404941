"""The tutorials: built from notebooks/src, committed without outputs, and each runs top to bottom in
under two minutes on a 2-core CPU (executed headlessly with nbclient in a real IPython kernel)."""

from __future__ import annotations

import json
import os
import resource
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
    "09_when_tracin_misleads": ["distinct top-1 opponents", "image/png", "application/vnd.jupyter.widget-view+json"],
    "10_projection_error": ["top-10 overlap", "image/png"],
    "11_is_the_attribution_right": ["proponents removed", "LDS", "image/png"],
    "12_debug_my_dataset": ["patched non-7s classified as 7", "truly leaked", "application/vnd.jupyter.widget-view+json"],
}
HTML_DIR = ROOT / "docs" / "notebooks"
LEARNER_MARKS = {"**Predict first.**": 2, "**Try": 2, "## Questions": 1}


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


def test_every_notebook_asks_the_learner_to_act():
    """At least two predict-first questions, two try-this cells and closing questions per notebook."""
    for path in NOTEBOOKS:
        text = "\n".join(c.source for c in nbformat.read(path, as_version=4).cells if c.cell_type == "markdown")
        for mark, at_least in LEARNER_MARKS.items():
            assert text.count(mark) >= at_least, f"{path.name}: fewer than {at_least} x {mark!r}"


def test_every_notebook_has_a_published_executed_copy():
    """docs/notebooks/<name>.html and .ipynb: written by `python notebooks/build.py --html`, committed, each
    < 2 MB, with outputs (an image or a table) and no error. Staleness (source changed since) is reported
    by build.py --check, not failed here: regenerating every copy takes minutes of CPU."""
    for path in NOTEBOOKS:
        html = HTML_DIR / f"{path.stem}.html"
        assert html.exists(), f"{html.relative_to(ROOT)} is missing; run python notebooks/build.py --html {path.stem[:2]}"
        assert html.stat().st_size < 2_000_000, f"{html.name} is larger than 2 MB"
        text = html.read_text(errors="replace")
        assert "tracin-source-sha256:" in text
        assert "jp-OutputArea-output" in text and ("data:image/png" in text or "<table" in text), f"{html.name} has no outputs"
        assert "Traceback (most recent call last)" not in text, f"{html.name} holds an error"
        assert "application/vnd.jupyter.widget-view+json" not in text, f"{html.name} holds a live widget, not its static view"
        executed = HTML_DIR / f"{path.stem}.ipynb"   # the copy GitHub renders
        assert executed.exists() and executed.stat().st_size < 2_000_000, f"{executed.name} is missing or too large"
        nb = nbformat.read(executed, as_version=4)
        assert nb.metadata["tracin"]["source_sha256"] in text, f"{executed.name} and {html.name} come from different sources"
        assert not [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]


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
    env_before = os.environ.get("MPLBACKEND"), os.environ.get("OMP_NUM_THREADS")
    os.environ["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"  # inherited by the kernel
    # The tutorials' models are tiny: one thread is fastest, and on a CPU shared with other jobs
    # several threads per kernel thrash (a 4x slowdown measured on a loaded 2-core machine).
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        client = NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                                resources={"metadata": {"path": str(tmp_path)}})
        r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        client.execute()
        elapsed = time.perf_counter() - start
        r1 = resource.getrusage(resource.RUSAGE_CHILDREN)   # the kernel's CPU time, once it has exited
    finally:
        for name, value in zip(("MPLBACKEND", "OMP_NUM_THREADS"), env_before):
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    nbformat.write(nb, tmp_path / path.name)  # executed copy, for a look when something fails
    cpu = (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)
    print(f"{path.name}: {elapsed:.1f} s wall, kernel CPU {cpu:.1f} s")
    assert elapsed < BUDGET_S, f"{path.name} took {elapsed:.0f} s (budget {BUDGET_S} s)"
    text = _outputs_text(nb)
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    for needle in EXPECT.get(path.stem, []):
        assert needle in text, f"{path.name}: no output contains {needle!r}"

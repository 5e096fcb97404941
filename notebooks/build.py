"""Build the tutorial notebooks from their reviewable sources in notebooks/src/*.py.

    python notebooks/build.py            # write notebooks/NN_name.ipynb (no outputs)
    python notebooks/build.py --check    # exit 1 if a notebook is missing, stale, or holds outputs
    python notebooks/build.py --html [NN ...]   # execute notebooks, write docs/notebooks/NN_name.{html,ipynb}

The executed copies are what readers see with outputs (plots, tables, galleries as their static HTML
fallback): the .ipynb renders on GitHub, the .html anywhere else (a browser, GitHub Pages). They are committed, not built in CI (CI already executes every notebook in
tests/test_notebooks.py; building HTML there too would double its time): after changing a notebook,
run `--html NN` for it and commit the result. Each copy records the SHA-256 of its source;
`--check` lists copies whose source has changed since (a note, not a failure).

A source is a Python file in "percent" format: `# %%` opens a code cell, `# %% [markdown]` opens a
markdown cell whose lines are written as comments (`# text`). Text before the first marker is dropped
(use it for a module docstring). The .py files run as plain scripts too, except IPython magics
(lines starting with `%`), which are written as comments `# %load_ext ...` and uncommented here.
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
import time
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent
SRC = HERE / "src"
HTML_DIR = HERE.parent / "docs" / "notebooks"
HTML_LIMIT = 2_000_000   # bytes per published copy
WIDGET_MIME = "application/vnd.jupyter.widget-view+json"
MAGIC = "# %"  # "# %load_ext x" in a code cell becomes "%load_ext x" (but "# %%" is a cell marker)


def parse(text: str) -> list[tuple[str, str]]:
    """Source text -> [(kind, body)], kind "code" or "markdown"."""
    cells: list[tuple[str, list[str]]] = []
    for line in text.splitlines():
        if line.startswith("# %%"):
            cells.append(("markdown" if "[markdown]" in line else "code", []))
        elif cells:
            cells[-1][1].append(line)
    out = []
    for kind, lines in cells:
        if kind == "markdown":
            lines = [l[2:] if l.startswith("# ") else l.lstrip("#") for l in lines]
        else:
            lines = [l[2:] if l.startswith(MAGIC) and not l.startswith("# %%") else l for l in lines]
        body = "\n".join(lines).strip("\n")
        if body:
            out.append((kind, body))
    return out


def build_one(src: Path) -> nbformat.NotebookNode:
    cells = [new_markdown_cell(b) if k == "markdown" else new_code_cell(b) for k, b in parse(src.read_text())]
    nb = new_notebook(cells=cells, metadata={
        "kernelspec": {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"},
        "language_info": {"name": "python"},
    })
    for i, cell in enumerate(nb.cells):
        cell["id"] = f"{src.stem[:2]}-{i:03d}"  # stable ids: rebuilding gives identical files
    nbformat.validate(nb)
    return nb


def target(src: Path) -> Path:
    return HERE / f"{src.stem}.ipynb"


def source_hash(src: Path) -> str:
    return hashlib.sha256(src.read_bytes()).hexdigest()


def html_path(src: Path) -> Path:
    return HTML_DIR / f"{src.stem}.html"


def html_is_current(src: Path) -> bool:
    path = html_path(src)
    return path.exists() and f"tracin-source-sha256: {source_hash(src)}" in path.read_text(errors="replace")


def static_outputs(nb: nbformat.NotebookNode) -> None:
    """Keep widgets as their static fallback (text/html from _repr_html_): no live widget state."""
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            data = out.get("data", {})
            if WIDGET_MIME in data and ("text/html" in data or "text/plain" in data):
                del data[WIDGET_MIME]
        cell.get("metadata", {}).pop("execution", None)
    nb.metadata.pop("widgets", None)


def children_cpu_s() -> float:
    """CPU seconds used by finished child processes (the kernels): a figure that the load of a shared
    machine does not inflate, unlike wall-clock time."""
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def execute_to_html(src: Path, timeout: int = 300) -> tuple[Path, float, float]:
    """Build `src`, run it top to bottom in a fresh kernel, write docs/notebooks/<stem>.html."""
    from nbclient import NotebookClient
    from nbconvert import HTMLExporter

    nb = build_one(src)
    env_before = os.environ.get("MPLBACKEND")
    os.environ["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"
    # one thread: the published numbers do not depend on the machine's core count, and small models
    # run fastest this way on a shared CPU (the kernel inherits the variable)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            start, cpu_start = time.perf_counter(), children_cpu_s()
            NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": tmp}}).execute()
            elapsed, cpu = time.perf_counter() - start, children_cpu_s() - cpu_start
    finally:
        if env_before is None:
            os.environ.pop("MPLBACKEND", None)
        else:
            os.environ["MPLBACKEND"] = env_before
    static_outputs(nb)
    nb.metadata["tracin"] = {"source_sha256": source_hash(src)}
    dest_nb = HTML_DIR / f"{src.stem}.ipynb"   # GitHub renders this one in the browser, with outputs
    HTML_DIR.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, dest_nb)
    body, _ = HTMLExporter(template_name="lab").from_notebook_node(nb)
    note = (f"<!-- tracin-source-sha256: {source_hash(src)} -->\n"
            f"<!-- executed copy of notebooks/{src.stem}.ipynb; regenerate with python notebooks/build.py --html {src.stem[:2]} -->\n")
    dest = html_path(src)
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(note + body)
    return dest, elapsed, cpu


def main(argv: list[str]) -> int:
    if "--html" in argv:
        wanted = [a for a in argv if a != "--html"]
        sources = [s for s in sorted(SRC.glob("[0-9][0-9]_*.py")) if not wanted or s.stem[:2] in wanted or s.stem in wanted]
        too_big = []
        for src in sources:
            dest, elapsed, cpu = execute_to_html(src)
            size = dest.stat().st_size
            print(f"{src.stem}: ran in {elapsed:.1f} s (kernel CPU {cpu:.1f} s), "
                  f"wrote {dest.relative_to(HERE.parent)} ({size / 1e6:.2f} MB)", flush=True)
            if size > HTML_LIMIT:
                too_big.append(dest.name)
        for name in too_big:
            print(f"{name} is larger than {HTML_LIMIT / 1e6:.0f} MB", file=sys.stderr)
        return 1 if too_big else 0
    check = "--check" in argv
    problems = []
    for src in sorted(SRC.glob("[0-9][0-9]_*.py")):
        text = nbformat.writes(build_one(src)) + "\n"
        dest = target(src)
        if check:
            if not dest.exists() or dest.read_text() != text:
                problems.append(f"{dest.name} is missing or out of date; run python notebooks/build.py")
        else:
            dest.write_text(text)
            print("wrote", dest.relative_to(HERE.parent))
    if check:
        stale = [s.stem for s in sorted(SRC.glob("[0-9][0-9]_*.py")) if not html_is_current(s)]
        if stale:
            print("note: published HTML missing or older than its source (python notebooks/build.py --html NN): "
                  + ", ".join(stale), file=sys.stderr)
    for problem in problems:
        print(problem, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
